import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.domain.document import (
    LegalBasisInstrument,
    Measure,
    PersonRole,
    RequestDocument,
    RequestType,
    Urgency,
)
from app.domain.messages import MessageDocument, MessageType

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "request.json"


def _body() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    return body


@pytest.fixture
def doc() -> dict[str, Any]:
    document: dict[str, Any] = _body()["document"]
    return document


def _errors(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        RequestDocument.model_validate(data)
    return [(tuple(e["loc"]), e["type"]) for e in caught.value.errors()]


# --- the example ---------------------------------------------------------------------------


def test_example_document_validates(doc: dict[str, Any]) -> None:
    document = RequestDocument.model_validate(doc)

    assert document.requesting_authority == "ES/MJ"
    assert document.requested_authority == "AR/MPF"
    assert document.urgency.level is Urgency.URGENT
    assert {b.instrument for b in document.legal_basis} == {
        LegalBasisInstrument.UNTOC_18,
        LegalBasisInstrument.BUDAPEST,
    }
    assert {p.role for p in document.persons} >= {
        PersonRole.SUSPECT,
        PersonRole.VICTIM,
        PersonRole.ACCOUNT_HOLDER,
    }
    assert {i.measure for i in document.assistance_sought} >= {
        Measure.RECORDS_PRODUCTION,
        Measure.SUBSCRIBER_INFORMATION,
    }


def test_example_body_matches_the_submit_shape() -> None:
    body = _body()

    assert set(body) == {"to", "document", "attachments"}
    assert body["to"] == body["document"]["requested_authority"]
    [attachment] = body["attachments"]
    assert set(attachment) == {"name", "media_type", "content_base64"}
    letter = base64.b64decode(attachment["content_base64"], validate=True).decode("utf-8")
    assert "SGCJI-CR-2026-04518" in letter


def test_round_trip_is_stable(doc: dict[str, Any]) -> None:
    first = RequestDocument.model_validate(doc)
    dumped = first.model_dump(mode="json")
    second = RequestDocument.model_validate(dumped)

    assert second == first
    assert second.model_dump(mode="json") == dumped
    assert RequestDocument.model_validate_json(first.model_dump_json()) == first


@settings(max_examples=60, deadline=None, database=None)
@given(facts=st.text(max_size=300), name=st.text(max_size=40))
def test_round_trip_holds_for_any_text_the_schema_accepts(facts: str, name: str) -> None:
    data = _body()["document"]
    data["summary_of_facts"] = facts
    data["persons"][0]["family_names"] = name
    try:
        document = RequestDocument.model_validate(data)
    except ValidationError:
        return
    assert RequestDocument.model_validate(document.model_dump(mode="json")) == document


def test_json_schema_is_generated() -> None:
    schema = RequestDocument.model_json_schema()

    assert schema["additionalProperties"] is False
    assert "summary_of_facts" in schema["required"]


def test_documents_are_immutable(doc: dict[str, Any]) -> None:
    document = RequestDocument.model_validate(doc)

    with pytest.raises(ValidationError):
        document.language = "en"  # type: ignore[misc]  # the assignment is what is under test


# --- strict schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        ((), ("priority",)),
        (("proceeding",), ("proceeding", "priority")),
        (("persons", 0), ("persons", 0, "priority")),
        (("electronic_data", 1, "period"), ("electronic_data", 1, "period", "priority")),
        (("contact_officer",), ("contact_officer", "priority")),
    ],
)
def test_unknown_fields_are_refused(
    doc: dict[str, Any], path: tuple[str | int, ...], loc: tuple[str | int, ...]
) -> None:
    target: Any = doc
    for key in path:
        target = target[key]
    target["priority"] = "high"

    assert _errors(doc) == [(loc, "extra_forbidden")]


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_schema_version_that_only_equals_1_is_refused(
    doc: dict[str, Any], version: object
) -> None:
    doc["schema_version"] = version  # `true == 1` in Python: taken for version 1 before
    assert [loc for loc, _ in _errors(doc)] == [("schema_version",)]


def test_unknown_schema_version_is_refused(doc: dict[str, Any]) -> None:
    doc["schema_version"] = 2

    assert _errors(doc) == [(("schema_version",), "literal_error")]


# --- field-level rules -------------------------------------------------------------------


@pytest.mark.parametrize("level", [Urgency.URGENT, Urgency.EMERGENCY])
def test_urgency_needs_reason_and_date(doc: dict[str, Any], level: Urgency) -> None:
    doc["urgency"] = {"level": level}

    assert _errors(doc) == [
        (("urgency", "reason"), "urgency_reason_required"),
        (("urgency", "requested_date"), "urgency_date_required"),
    ]


def test_urgency_needs_date_even_with_reason(doc: dict[str, Any]) -> None:
    del doc["urgency"]["requested_date"]

    assert _errors(doc) == [(("urgency", "requested_date"), "urgency_date_required")]


def test_routine_needs_neither_reason_nor_date(doc: dict[str, Any]) -> None:
    doc["urgency"] = {"level": "routine"}

    assert RequestDocument.model_validate(doc).urgency.reason is None


def test_urgency_defaults_to_routine(doc: dict[str, Any]) -> None:
    del doc["urgency"]

    assert RequestDocument.model_validate(doc).urgency.level is Urgency.ROUTINE


def test_unknown_legal_basis_is_refused(doc: dict[str, Any]) -> None:
    doc["legal_basis"][1]["instrument"] = "HAGUE_1970"

    assert _errors(doc) == [(("legal_basis", 1, "instrument"), "enum")]


@pytest.mark.parametrize("instrument", ["BILATERAL_TREATY", "OTHER"])
def test_bilateral_or_other_legal_basis_needs_treaty_name(
    doc: dict[str, Any], instrument: str
) -> None:
    doc["legal_basis"][0] = {"instrument": instrument, "article": "5"}

    assert _errors(doc) == [(("legal_basis", 0, "treaty_name"), "treaty_name_required")]

    doc["legal_basis"][0]["treaty_name"] = (
        "Tratado bilateral de asistencia judicial en materia penal"
    )
    RequestDocument.model_validate(doc)


def test_legal_basis_must_not_be_empty(doc: dict[str, Any]) -> None:
    doc["legal_basis"] = []

    assert _errors(doc) == [(("legal_basis",), "too_short")]


def test_person_without_role_is_refused(doc: dict[str, Any]) -> None:
    del doc["persons"][2]["role"]

    assert _errors(doc) == [(("persons", 2, "role"), "missing")]


def test_person_with_unknown_role_is_refused(doc: dict[str, Any]) -> None:
    doc["persons"][0]["role"] = "informant"

    assert _errors(doc) == [(("persons", 0, "role"), "enum")]


def test_legal_person_needs_organisation_name(doc: dict[str, Any]) -> None:
    del doc["persons"][1]["organisation_name"]

    assert _errors(doc) == [(("persons", 1, "organisation_name"), "organisation_name_required")]


def test_person_with_nothing_to_identify_them_is_refused(doc: dict[str, Any]) -> None:
    doc["persons"][0] = {"ref": "P1", "role": "suspect"}

    assert _errors(doc) == [(("persons", 0), "person_unidentifiable")]


def test_person_known_only_by_an_identifier_is_accepted(doc: dict[str, Any]) -> None:
    doc["persons"][0] = {
        "ref": "P1",
        "role": "suspect",
        "identifiers": [{"type": "email", "value": "pagos.deltasur@correo.example"}],
    }

    RequestDocument.model_validate(doc)


def test_time_range_must_be_ordered(doc: dict[str, Any]) -> None:
    period = doc["electronic_data"][1]["period"]
    period["start"], period["end"] = period["end"], period["start"]

    assert _errors(doc) == [(("electronic_data", 1, "period", "end"), "time_range_reversed")]


def test_naive_timestamps_are_refused(doc: dict[str, Any]) -> None:
    doc["electronic_data"][1]["identifiers"][1]["observed_at"] = "2026-09-14T10:42:17"

    assert _errors(doc) == [
        (("electronic_data", 1, "identifiers", 1, "observed_at"), "timezone_aware")
    ]


def test_unknown_references_are_refused(doc: dict[str, Any]) -> None:
    doc["assistance_sought"][0]["person_refs"] = ["P1", "P9"]
    doc["assistance_sought"][1]["data_refs"] = ["D7"]

    assert _errors(doc) == [
        (("assistance_sought", 0, "person_refs", 1), "unknown_person_ref"),
        (("assistance_sought", 1, "data_refs", 0), "unknown_data_ref"),
    ]


def test_duplicate_refs_are_refused(doc: dict[str, Any]) -> None:
    doc["persons"][2]["ref"] = "P1"

    assert _errors(doc) == [
        (("persons", 0, "ref"), "duplicate_ref"),
        (("persons", 2, "ref"), "duplicate_ref"),
    ]


def test_data_measures_must_name_their_data(doc: dict[str, Any]) -> None:
    del doc["assistance_sought"][2]["data_refs"]

    assert _errors(doc) == [(("assistance_sought", 2, "data_refs"), "data_refs_required")]


def test_extradition_needs_a_person_sought(doc: dict[str, Any]) -> None:
    doc["request_type"] = RequestType.EXTRADITION

    assert _errors(doc) == [(("persons",), "person_sought_required")]

    doc["persons"][0]["role"] = PersonRole.PERSON_SOUGHT
    RequestDocument.model_validate(doc)


def test_emergency_assistance_needs_emergency_urgency(doc: dict[str, Any]) -> None:
    doc["request_type"] = RequestType.EMERGENCY_ASSISTANCE

    assert _errors(doc) == [(("urgency", "level"), "emergency_level_required")]


def test_an_authority_cannot_request_itself(doc: dict[str, Any]) -> None:
    doc["requested_authority"] = "ES/MJ"

    assert _errors(doc) == [(("requested_authority",), "same_authority")]


def test_confidentiality_level_requires_confidential(doc: dict[str, Any]) -> None:
    doc["confidentiality"]["confidential"] = False

    assert _errors(doc) == [(("confidentiality", "confidential"), "confidentiality_inconsistent")]


def test_confidentiality_defaults_to_confidential(doc: dict[str, Any]) -> None:
    del doc["confidentiality"]

    assert RequestDocument.model_validate(doc).confidentiality.confidential is True


# --- formats and bounds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "authority", ["DE/BFJ", "FR/DACG_BEPI", "US/DOJ-OIA", "CL/FN", "BR/DRCI", "PT/PGR_2"]
)
def test_authority_ids_accepted(doc: dict[str, Any], authority: str) -> None:
    doc["requested_authority"] = authority

    RequestDocument.model_validate(doc)


@pytest.mark.parametrize(
    "authority",
    ["es/MJ", "ESP/MJ", "ES/", "ES/mj", "ES MJ", "ES/MJ\n", " ES/MJ", "ES/" + "A" * 33],
)
def test_authority_ids_refused(doc: dict[str, Any], authority: str) -> None:
    doc["requested_authority"] = authority

    [(loc, _)] = _errors(doc)
    assert loc == ("requested_authority",)


@pytest.mark.parametrize("tag", ["es", "en", "es-AR", "es-419", "pt-BR", "zh-Hant-TW", "fil"])
def test_language_tags_accepted(doc: dict[str, Any], tag: str) -> None:
    doc["language"] = tag

    RequestDocument.model_validate(doc)


@pytest.mark.parametrize("tag", ["ES", "spanish", "es_AR", "es-ar", "", "e"])
def test_language_tags_refused(doc: dict[str, Any], tag: str) -> None:
    doc["language"] = tag

    assert _errors(doc) == [(("language",), "string_pattern_mismatch")]


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("summary_of_facts",), "x" * 20_001, "string_too_long"),
        (("summary_of_facts",), "   ", "string_too_short"),
        (("purpose",), "x" * 4_001, "string_too_long"),
        (("proceeding", "file_number"), "x" * 65, "string_too_long"),
        (("persons", 0, "family_names"), "x" * 301, "string_too_long"),
        (("persons", 0, "family_names"), "Rivas\x00", "string_pattern_mismatch"),
        (("persons", 0, "family_names"), "Rivas\nRivas", "string_pattern_mismatch"),
        (("summary_of_facts",), "hechos\x1b[2J", "string_pattern_mismatch"),
        (("persons", 0, "nationalities", 0), "ARG", "string_too_long"),
        (("contact_officer", "email"), "not-an-address", "string_pattern_mismatch"),
        (("contact_officer", "phone"), "+34 91 000 00 00", "string_pattern_mismatch"),
        (("classification", "code"), "tlp:amber", "string_pattern_mismatch"),
        (("persons", 0, "ref"), "P 1", "string_pattern_mismatch"),
    ],
)
def test_string_bounds_and_formats(
    doc: dict[str, Any], path: tuple[str | int, ...], value: str, error: str
) -> None:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value

    assert _errors(doc) == [(path, error)]


def test_free_text_keeps_line_breaks(doc: dict[str, Any]) -> None:
    doc["summary_of_facts"] = "Primer hecho.\n\n\tSegundo hecho.\r\n"

    assert (
        RequestDocument.model_validate(doc).summary_of_facts == "Primer hecho.\n\n\tSegundo hecho."
    )


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("legal_basis", 10),
        ("offences", 50),
        ("assistance_sought", 50),
        ("persons", 200),
        ("electronic_data", 100),
        ("deadlines", 20),
    ],
)
def test_list_bounds(doc: dict[str, Any], field: str, limit: int) -> None:
    doc[field] = [doc[field][0]] * (limit + 1)

    assert ((field,), "too_long") in _errors(doc)


def test_nested_list_bounds(doc: dict[str, Any]) -> None:
    identifier = doc["persons"][0]["identifiers"][0]
    doc["persons"][0]["identifiers"] = [identifier] * 21
    doc["contact_officer"]["languages"] = []

    assert _errors(doc) == [
        (("persons", 0, "identifiers"), "too_long"),
        (("contact_officer", "languages"), "too_short"),
    ]


def test_errors_do_not_echo_case_content(doc: dict[str, Any]) -> None:
    secret = "Rivas-SECRET-NAME"
    doc["persons"][0]["family_names"] = secret + "\x00"

    with pytest.raises(ValidationError) as caught:
        RequestDocument.model_validate(doc)

    assert secret not in str(caught.value)


# --- conversation messages -------------------------------------------------------------------


def test_message_validates_and_round_trips() -> None:
    message = MessageDocument.model_validate(
        {
            "type": "additional_information_request",
            "text": "Sírvanse precisar el periodo exacto de los extractos solicitados.",
            "references": {"requesting": "SGCJI-CR-2026-04518", "requested": "MPF-AJI-2026-771"},
        }
    )

    assert message.type is MessageType.ADDITIONAL_INFORMATION_REQUEST
    assert MessageDocument.model_validate(message.model_dump(mode="json")) == message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"type": "verdict", "text": "x"}, [(("type",), "enum")]),
        ({"type": "note", "text": "x", "status": "done"}, [(("status",), "extra_forbidden")]),
        ({"type": "note", "text": "x" * 20_001}, [(("text",), "string_too_long")]),
        ({"type": "note"}, [(("text",), "missing")]),
        (
            {"type": "note", "text": "x", "references": {}},
            [(("references", "requesting"), "missing")],
        ),
    ],
)
def test_message_refusals(
    data: dict[str, Any], expected: list[tuple[tuple[str | int, ...], str]]
) -> None:
    with pytest.raises(ValidationError) as caught:
        MessageDocument.model_validate(data)

    assert [(tuple(e["loc"]), e["type"]) for e in caught.value.errors()] == expected


def test_the_example_for_the_command_line_is_the_apis_example() -> None:
    """`entraide requests send` takes attachments as files (README): docs/examples/send.json
    and letter-of-request.txt are request.json's request and its inline letter, kept the
    same."""
    body = _body()
    (inline,) = body.pop("attachments")
    folder = EXAMPLE.parent
    assert json.loads((folder / "send.json").read_text(encoding="utf-8")) == body
    letter = (folder / "letter-of-request.txt").read_bytes()
    assert letter == base64.b64decode(inline["content_base64"])
    assert inline["name"] == "letter-of-request.txt"

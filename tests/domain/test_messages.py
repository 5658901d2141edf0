"""Typed conversation messages: what each type must and may carry, and evidence items."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from pydantic import ValidationError

from app.domain.messages import MessageDocument, MessageType, RefusalGround
from app.migrate import ROOT
from app.requests.schemas import SubmitMessage

REPORT = b"bank records, 12 pages"
REPORT_SHA = hashlib.sha256(REPORT).hexdigest()


def _evidence(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "ref": "E1",
        "description": "Account opening file and statements",
        "obtained_at": "2026-11-19T15:00:00-03:00",
        "obtained_from": "Banco Ejemplo Argentino S.A.",
        "sha256": REPORT_SHA,
        "attachment": 1,
        "use_limitation": "Only in proceedings DP 1873/2026.",
        "custody": [
            {"at": "2026-11-19T16:30:00-03:00", "action": "received", "by": "Fiscalía n.º 12"},
            {"at": "2026-11-20T09:00:00-03:00", "action": "copied", "by": "Fiscalía n.º 12"},
        ],
    }
    item.update(changes)
    return item


def _errors(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        MessageDocument.model_validate(data)
    return [(tuple(e["loc"]), e["type"]) for e in caught.value.errors()]


def test_a_refusal_needs_reasons() -> None:
    assert _errors({"type": "refusal", "text": "Refused."}) == [
        (("reasons",), "refusal_reasons_required")
    ]
    assert _errors({"type": "refusal", "text": "Refused.", "reasons": []}) == [
        (("reasons",), "refusal_reasons_required")
    ]


def test_each_refusal_reason_needs_a_ground_and_an_explanation() -> None:
    data = {"type": "refusal", "text": "Refused.", "reasons": [{"ground": "fiscal_offence"}]}
    assert _errors(data) == [
        (("reasons", 0, "ground"), "enum"),
        (("reasons", 0, "explanation"), "missing"),
    ]
    refusal = MessageDocument.model_validate(
        {
            "type": "refusal",
            "text": "Refused.",
            "reasons": [
                {"ground": "no_dual_criminality", "explanation": "Not an offence here."},
                {"ground": "essential_interests", "explanation": "National security."},
            ],
        }
    )
    assert [r.ground for r in refusal.reasons] == [
        RefusalGround.NO_DUAL_CRIMINALITY,
        RefusalGround.ESSENTIAL_INTERESTS,
    ]


def test_a_postponement_needs_a_reason_and_a_date() -> None:
    assert _errors({"type": "postponement", "text": "Postponed."}) == [
        (("reason",), "postponement_reason_required"),
        (("until",), "postponement_until_required"),
    ]
    assert _errors(
        {"type": "postponement", "text": "Postponed.", "reason": "Trial", "until": "soon"}
    ) == [(("until",), "date_from_datetime_parsing")]
    postponement = MessageDocument.model_validate(
        {
            "type": "postponement",
            "text": "Postponed.",
            "reason": "It would interfere with an ongoing investigation here (UNTOC 18(25)).",
            "until": "2027-01-15",
        }
    )
    assert postponement.until is not None
    assert postponement.until.isoformat() == "2027-01-15"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"type": "acknowledgement", "until": "2027-01-15"}, "until"),
        ({"type": "note", "conditions": "none"}, "conditions"),
        ({"type": "acceptance", "reason": "why not"}, "reason"),
        ({"type": "result", "reasons": [{"ground": "other", "explanation": "x"}]}, "reasons"),
        ({"type": "status_answer", "evidence": [_evidence()]}, "evidence"),
        ({"type": "closure", "reason": "done"}, "reason"),
    ],
)
def test_a_field_that_does_not_belong_to_the_type_is_refused(
    data: dict[str, Any], field: str
) -> None:
    assert _errors({"text": "x", **data}) == [((field,), "field_not_allowed")]


def test_a_field_not_allowed_names_the_type_with_the_right_article() -> None:
    with pytest.raises(ValidationError) as caught:
        MessageDocument.model_validate(
            {"type": "acknowledgement", "text": "x", "until": "2027-01-15"}
        )
    assert caught.value.errors()[0]["msg"] == "an acknowledgement message does not carry until"


@pytest.mark.parametrize(
    "data",
    [
        {"type": "acceptance", "conditions": "Use limited to DP 1873/2026."},
        {"type": "withdrawal", "reason": "The proceedings were closed."},
        {"type": "withdrawal"},
        {"type": "partial_result", "evidence": [_evidence()]},
        {"type": "result"},
    ],
)
def test_optional_typed_fields(data: dict[str, Any]) -> None:
    message = MessageDocument.model_validate({"text": "x", **data})
    assert MessageDocument.model_validate(message.model_dump(mode="json")) == message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"use_limitation": None}, [(("evidence", 0, "use_limitation"), "string_type")]),
        ({"sha256": "ABC"}, [(("evidence", 0, "sha256"), "string_pattern_mismatch")]),
        (
            {"obtained_at": "2026-11-19T15:00:00"},
            [(("evidence", 0, "obtained_at"), "timezone_aware")],
        ),
        ({"attachment": 0}, [(("evidence", 0, "attachment"), "greater_than_equal")]),
        ({"description": " "}, [(("evidence", 0, "description"), "string_too_short")]),
        (
            {"obtained_at": "2026-11-21T00:00:00Z"},
            [
                (("evidence", 0, "custody", 0, "at"), "custody_out_of_order"),
                (("evidence", 0, "custody", 1, "at"), "custody_out_of_order"),
            ],
        ),
        (
            {"custody": [{"at": "2026-11-19T16:30:00-03:00", "action": "stolen", "by": "x"}]},
            [(("evidence", 0, "custody", 0, "action"), "enum")],
        ),
    ],
)
def test_evidence_items_attest_what_when_and_hash(
    changes: dict[str, Any], expected: list[tuple[tuple[str | int, ...], str]]
) -> None:
    item = _evidence(**changes)
    if changes.get("use_limitation", "") is None:
        del item["use_limitation"]
        expected = [(("evidence", 0, "use_limitation"), "missing")]
    assert _errors({"type": "result", "text": "x", "evidence": [item]}) == expected


def test_evidence_refs_are_unique() -> None:
    data = {"type": "result", "text": "x", "evidence": [_evidence(), _evidence()]}
    assert _errors(data) == [
        (("evidence", 0, "ref"), "duplicate_ref"),
        (("evidence", 1, "ref"), "duplicate_ref"),
    ]


def test_evidence_must_match_the_attachment_it_names() -> None:
    message = MessageDocument.model_validate(
        {
            "type": "result",
            "text": "x",
            "evidence": [_evidence(), _evidence(ref="E2", attachment=2), _evidence(ref="E3")],
        }
    )
    assert list(message.attachment_problems([REPORT_SHA, REPORT_SHA])) == []
    problems = [(loc, code) for loc, code, _, _ in message.attachment_problems(["0" * 64])]
    assert problems == [
        (("evidence", 0, "sha256"), "evidence_hash_mismatch"),
        (("evidence", 1, "attachment"), "unknown_attachment"),
        (("evidence", 2, "sha256"), "evidence_hash_mismatch"),
    ]
    # An item that travels outside the envelope (on paper, by courier) names no attachment.
    unattached = MessageDocument.model_validate(
        {"type": "result", "text": "x", "evidence": [_evidence(attachment=None)]}
    )
    assert list(unattached.attachment_problems([])) == []


def test_evidence_names_attachments_1_to_32_as_protocol_v1_has_it() -> None:
    """An earlier change let an item name attachments up to 63; peers of earlier releases
    refuse that, and the result never arrived (from review, with a peer of the earlier
    release): the protocol's limit stays 32 until every peer takes more."""
    last = MessageDocument.model_validate(
        {"type": "result", "text": "x", "evidence": [_evidence(attachment=32)]}
    )
    assert list(last.attachment_problems([REPORT_SHA] * 32)) == []
    beyond = {"type": "result", "text": "x", "evidence": [_evidence(attachment=33)]}
    assert _errors(beyond) == [(("evidence", 0, "attachment"), "less_than_equal")]


def test_wire_form_omits_defaults_so_older_nodes_read_older_types() -> None:
    note = MessageDocument.model_validate({"type": "note", "text": "Hola."})
    assert note.wire_form() == {"type": "note", "text": "Hola."}
    result = MessageDocument.model_validate(
        {"type": "result", "text": "x", "evidence": [_evidence()]}
    )
    assert MessageDocument.model_validate(result.wire_form()) == result


def test_every_type_is_accepted_with_only_its_required_fields() -> None:
    required: dict[MessageType, dict[str, Any]] = {
        MessageType.REFUSAL: {"reasons": [{"ground": "other", "explanation": "x"}]},
        MessageType.POSTPONEMENT: {"reason": "x", "until": "2027-01-01"},
    }
    for message_type in MessageType:
        data = {"type": message_type.value, "text": "x", **required.get(message_type, {})}
        assert MessageDocument.model_validate(data).type is message_type


def test_refusals_do_not_echo_content() -> None:
    secret = "SECRET-EXPLANATION"
    with pytest.raises(ValidationError) as caught:
        MessageDocument.model_validate(
            {
                "type": "refusal",
                "text": "x",
                "reasons": [{"ground": "other", "explanation": secret + "\x00"}],
            }
        )
    assert secret not in str(caught.value)


@pytest.mark.parametrize("name", ["message-acknowledgement.json", "message-result.json"])
def test_the_documented_examples_are_valid_submissions(name: str) -> None:
    body = json.loads((ROOT / "docs" / "examples" / name).read_text(encoding="utf-8"))
    submission = SubmitMessage.model_validate(body)
    if submission.document.type is MessageType.RESULT:
        [item] = submission.document.evidence
        assert item.sha256 == hashlib.sha256(submission.attachments[0].content()).hexdigest()

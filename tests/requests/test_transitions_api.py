"""The lifecycle through the API: field-level validation, and forbidden moves refused on both
sides (the sender at submission, the receiver when the envelope arrives), storing nothing."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

import pytest

from tests.requests.conftest import Harness, example_document

ACK = {"type": "acknowledgement", "text": "Registered."}


def _fields(response: Any) -> list[tuple[tuple[str | int, ...], str]]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    return [(tuple(field["loc"]), field["type"]) for field in body["fields"]]


def _outbound(**changes: Any) -> dict[str, Any]:
    document = example_document(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    document.update(changes)
    return {"to": "ES/MJ", "document": document}


# --- validation: every refusal names the field -----------------------------------------------


def test_an_urgent_request_without_reason_or_date_is_refused(ar: Harness) -> None:
    response = ar.post("/api/v1/requests", _outbound(urgency={"level": "urgent"}))
    assert _fields(response) == [
        (("body", "document", "urgency", "reason"), "urgency_reason_required"),
        (("body", "document", "urgency", "requested_date"), "urgency_date_required"),
    ]


def test_an_unknown_legal_basis_is_refused(ar: Harness) -> None:
    body = _outbound()
    body["document"]["legal_basis"][0]["instrument"] = "HAGUE_1970"
    assert _fields(ar.post("/api/v1/requests", body)) == [
        (("body", "document", "legal_basis", 0, "instrument"), "enum")
    ]


def test_a_person_without_a_role_is_refused(ar: Harness) -> None:
    body = _outbound()
    del body["document"]["persons"][1]["role"]
    assert _fields(ar.post("/api/v1/requests", body)) == [
        (("body", "document", "persons", 1, "role"), "missing")
    ]


def test_a_refusal_without_reasons_is_refused(ar: Harness) -> None:
    request_id = ar.receive_request()
    assert ar.reply(request_id, ACK).status_code == 201
    refusal = ar.reply(request_id, {"type": "refusal", "text": "We refuse."})
    assert _fields(refusal) == [(("body", "document", "reasons"), "refusal_reasons_required")]
    postponement = ar.reply(request_id, {"type": "postponement", "text": "Later."})
    assert _fields(postponement) == [
        (("body", "document", "reason"), "postponement_reason_required"),
        (("body", "document", "until"), "postponement_until_required"),
    ]
    assert ar.status(request_id) == "acknowledged"
    assert ar.messages(request_id) == 2


def test_evidence_must_attest_the_hash_of_its_attachment(ar: Harness) -> None:
    request_id = ar.receive_request()
    for document in (ACK, {"type": "acceptance", "text": "Accepted."}):
        assert ar.reply(request_id, document).status_code == 201
    data = b"bank statements"
    item = {
        "ref": "E1",
        "description": "Statements",
        "obtained_at": "2026-11-19T15:00:00-03:00",
        "sha256": hashlib.sha256(b"other bytes").hexdigest(),
        "attachment": 1,
        "use_limitation": "Proceedings DP 1873/2026 only.",
    }
    attachment = {"name": "s.txt", "content_base64": "YmFuayBzdGF0ZW1lbnRz"}
    body = {"document": {"type": "result", "text": "x", "evidence": [item]}}
    path = f"/api/v1/requests/{request_id}/messages"
    refused = ar.post(path, {**body, "attachments": [attachment]})
    assert _fields(refused) == [
        (("body", "document", "evidence", 0, "sha256"), "evidence_hash_mismatch")
    ]
    assert _fields(ar.post(path, body)) == [
        (("body", "document", "evidence", 0, "attachment"), "unknown_attachment")
    ]
    item["sha256"] = hashlib.sha256(data).hexdigest()
    accepted = ar.post(path, {**body, "attachments": [attachment]})
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["status"] == "executed"


def _item(obtained_at: str, *custody_at: str) -> dict[str, Any]:
    return {
        "ref": "E1",
        "description": "Statements",
        "obtained_at": obtained_at,
        "sha256": "0" * 64,
        "use_limitation": "Proceedings DP 1873/2026 only.",
        "custody": [{"at": at, "action": "sealed", "by": "Officer"} for at in custody_at],
    }


def test_dates_are_judged_by_the_nodes_clock_at_submission(ar: Harness) -> None:
    """From review: a postponement until 2020-01-01 made the request overdue at once, and
    evidence could be obtained in the future. Refused at the field, audited; what the
    clock skew allows, and the first day after today, are taken."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    today = now.date()
    ar.clock.now = now
    try:
        request_id = ar.receive_request()
        for document in (ACK, {"type": "acceptance", "text": "Accepted."}):
            assert ar.reply(request_id, document).status_code == 201
        refused = len(ar.audit("api.refused"))
        for until in ("2020-01-01", str(today - dt.timedelta(days=1)), str(today)):
            postponement = {"type": "postponement", "text": "Later.", "reason": "A trial."}
            answer = ar.reply(request_id, {**postponement, "until": until})
            assert _fields(answer) == [(("body", "document", "until"), "postponement_until_past")]
            assert answer.json()["fields"][0]["msg"] == (
                "a postponement lasts until a date after today (UTC)"
            )
        later = (now + dt.timedelta(minutes=6)).isoformat()  # past the 5 minutes of skew
        result = {"type": "partial_result", "text": "Part."}
        answer = ar.reply(request_id, {**result, "evidence": [_item(later, later)]})
        assert _fields(answer) == [
            (("body", "document", "evidence", 0, "obtained_at"), "evidence_in_future"),
            (("body", "document", "evidence", 0, "custody", 0, "at"), "custody_in_future"),
        ]
        earlier = (now - dt.timedelta(days=2)).isoformat()
        answer = ar.reply(request_id, {**result, "evidence": [_item(earlier, earlier, later)]})
        assert _fields(answer) == [
            (("body", "document", "evidence", 0, "custody", 1, "at"), "custody_in_future")
        ]
        assert [entry[1] for entry in ar.audit("api.refused")[refused:]] == ["invalid_request"] * 5
        assert ar.status(request_id) == "accepted"
        assert ar.messages(request_id) == 3  # nothing sealed, nothing queued
        # Tomorrow, and within the clock skew (a case system's clock a little ahead): taken.
        tomorrow = str(today + dt.timedelta(days=1))
        answer = ar.reply(request_id, {**postponement, "until": tomorrow})
        assert answer.status_code == 201, answer.text
        assert ar.status(request_id) == "postponed"
        assert ar.reply(request_id, {"type": "acceptance", "text": "Resumed."}).status_code == 201
        soon = (now + dt.timedelta(minutes=4)).isoformat()
        answer = ar.reply(request_id, {**result, "evidence": [_item(soon, soon)]})
        assert answer.status_code == 201, answer.text
        assert ar.status(request_id) == "partially_executed"
    finally:
        ar.clock.now = None


def test_a_received_postponement_already_over_is_taken(ar: Harness) -> None:
    """A peer's message is dated by its clock, and may arrive days after it was sealed (its
    delivery retried): a correct peer can send a postponement whose date has passed by then,
    or evidence a few minutes ahead of this clock. Taken as sent; the request is overdue at
    once, which is so: the postponement is over."""
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)).isoformat()
    postponement = {"type": "postponement", "text": "Later.", "reason": "A trial."}
    conversations = {
        "postponed": [ACK, {**postponement, "until": "2020-01-01"}],
        "partially_executed": [
            ACK,
            {"type": "acceptance", "text": "Accepted."},
            {"type": "partial_result", "text": "Part.", "evidence": [_item(later, later)]},
        ],
    }
    ids = {}
    for status, documents in conversations.items():
        sent = ar.post("/api/v1/requests", _outbound())
        assert sent.status_code == 201, sent.text
        request_id = ids[status] = sent.json()["id"]
        ar.last_msg[request_id] = request_id
        for document in documents:
            answer = ar.peer_sends(request_id, document)
            assert answer.status_code == 201, answer.text
        assert ar.status(request_id) == status
    detail = ar.get(f"/api/v1/requests/{ids['postponed']}").json()
    assert detail["deadlines"]["postponed_until"] == "2020-01-01"
    overdue = [item["id"] for item in ar.get("/api/v1/requests", overdue="true").json()["items"]]
    assert ids["postponed"] in overdue


# --- forbidden moves, at the sender ------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "code"),
    [
        ({"type": "result", "text": "Done."}, "transition_not_allowed"),
        ({"type": "acceptance", "text": "Accepted."}, "transition_not_allowed"),
        ({"type": "withdrawal", "text": "We withdraw."}, "message_not_allowed"),
        ({"type": "status_query", "text": "News?"}, "message_not_allowed"),
    ],
)
def test_the_sender_refuses_a_forbidden_move_before_sealing(
    ar: Harness, document: dict[str, Any], code: str
) -> None:
    request_id = ar.receive_request()
    response = ar.reply(request_id, document)
    assert response.status_code == 409
    assert response.json()["error"] == code
    assert ar.status(request_id) == "delivered"
    assert ar.messages(request_id) == 1  # nothing sealed, nothing queued
    detail = ar.get(f"/api/v1/requests/{request_id}").json()
    assert detail["allowed_messages"] == [
        "acknowledgement",
        "consultation",
        "status_answer",
        "note",
    ]


def test_nothing_moves_a_closed_request(ar: Harness) -> None:
    request_id = ar.receive_request()
    for document in (
        ACK,
        {"type": "acceptance", "text": "Accepted."},
        {"type": "result", "text": "Done."},
    ):
        assert ar.reply(request_id, document).status_code == 201
    assert ar.peer_sends(request_id, {"type": "closure", "text": "Thanks."}).status_code == 201
    note = ar.reply(request_id, {"type": "note", "text": "One more thing."})
    assert (note.status_code, note.json()["error"]) == (409, "transition_not_allowed")
    assert ar.get(f"/api/v1/requests/{request_id}").json()["allowed_messages"] == []


# --- forbidden moves, at the receiver -----------------------------------------------------------


def _refused(
    ar: Harness, request_id: str, document: dict[str, Any], code: str, status: int
) -> None:
    before = (ar.status(request_id), ar.messages(request_id), len(ar.audit("envelope.refused")))
    response = ar.peer_sends(request_id, document)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert (ar.status(request_id), ar.messages(request_id)) == before[:2], "something was stored"
    refusals = ar.audit("envelope.refused")
    assert len(refusals) == before[2] + 1
    assert refusals[-1] == ("peer:ES/MJ", code, None)


def test_the_receiver_refuses_a_forbidden_move_and_stores_nothing(ar: Harness) -> None:
    request_id = ar.receive_request()
    assert ar.reply(request_id, ACK).status_code == 201
    # A requesting authority never accepts or sends results ...
    _refused(ar, request_id, {"type": "acceptance", "text": "x"}, "message_not_allowed", 409)
    _refused(ar, request_id, {"type": "result", "text": "x"}, "message_not_allowed", 409)
    # ... answers only a question that was asked, and closes only what was decided.
    _refused(
        ar,
        request_id,
        {"type": "additional_information", "text": "x"},
        "transition_not_allowed",
        409,
    )
    _refused(ar, request_id, {"type": "closure", "text": "x"}, "transition_not_allowed", 409)
    # An allowed move still goes through afterwards.
    assert (
        ar.peer_sends(request_id, {"type": "withdrawal", "text": "No longer needed."}).status_code
        == 201
    )
    assert ar.status(request_id) == "withdrawn"
    _refused(ar, request_id, {"type": "status_query", "text": "x"}, "transition_not_allowed", 409)


def test_a_message_that_overtook_its_predecessor_is_deferred_not_refused(ar: Harness) -> None:
    request_id = ar.receive_request()
    assert ar.reply(request_id, ACK).status_code == 201
    assert (
        ar.reply(request_id, {"type": "additional_information_request", "text": "?"}).status_code
        == 201
    )
    # ES/MJ answers, then withdraws; the withdrawal arrives first (its answer is backing off).
    answer = ar.seal_message(request_id, {"type": "additional_information", "text": "Here."})
    answer_id = json.loads(answer.header)["msg_id"]
    withdrawal = ar.seal_message(
        request_id, {"type": "withdrawal", "text": "Withdrawn."}, in_reply_to=answer_id
    )
    early = ar.post_envelope(withdrawal)
    assert (early.status_code, early.json()["error"]) == (425, "predecessor_missing")
    assert ar.status(request_id) == "additional_information_requested"
    assert ar.post_envelope(answer).status_code == 201
    assert ar.status(request_id) == "additional_information_supplied"
    assert ar.post_envelope(withdrawal).status_code == 201  # the sender's retry
    assert ar.status(request_id) == "withdrawn"


@pytest.mark.parametrize("decision", ["acceptance", "postponement"])
def test_an_answer_that_crossed_a_newer_question_is_not_taken_for_its_answer(
    ar: Harness, decision: str
) -> None:
    """ES/MJ answers the first question while AR/MPF decides and asks a second one: the
    answer arrives after both. Taken as the answer, AR/MPF would read 'supplied' while ES/MJ,
    once both messages reach it, reads 'requested' (docs/domain.md promises equal ends)."""
    request_id = ar.receive_request()
    assert ar.reply(request_id, ACK).status_code == 201
    first = {"type": "additional_information_request", "text": "Which account?"}
    assert ar.reply(request_id, first).status_code == 201
    first_id = ar.last_msg[request_id]
    answer = ar.seal_message(request_id, {"type": "additional_information", "text": "This."})
    document = {"type": decision, "text": "Decided."}
    if decision == "postponement":
        document.update(until="2030-01-01", reason="An investigation here.")
    assert ar.reply(request_id, document).status_code == 201, document
    second = {"type": "additional_information_request", "text": "And the other one?"}
    assert ar.reply(request_id, second).status_code == 201
    crossed = ar.post_envelope(answer)
    assert (crossed.status_code, crossed.json()["error"]) == (409, "transition_not_allowed")
    assert ar.status(request_id) == "additional_information_requested"
    # A note sent before the second question reached ES/MJ, then an answer after the note:
    # that answer had not seen the question either.
    note = ar.seal_message(request_id, {"type": "note", "text": "By the way."}, first_id)
    assert ar.post_envelope(note).status_code == 201
    note_id = json.loads(note.header)["msg_id"]
    after_note = ar.seal_message(
        request_id, {"type": "additional_information", "text": "That."}, in_reply_to=note_id
    )
    refused = ar.post_envelope(after_note)
    assert (refused.status_code, refused.json()["error"]) == (409, "transition_not_allowed")
    # The answer sent after the second question is its answer.
    taken = ar.peer_sends(request_id, {"type": "additional_information", "text": "The other."})
    assert taken.status_code == 201, taken.text
    assert ar.status(request_id) == "additional_information_supplied"


def test_evidence_from_a_peer_must_match_its_attachment(ar: Harness) -> None:
    # Here AR/MPF is the requesting side: ES/MJ executes and sends results.
    body = {
        "to": "ES/MJ",
        "document": example_document(requesting_authority="AR/MPF", requested_authority="ES/MJ"),
    }
    sent = ar.post("/api/v1/requests", body)
    assert sent.status_code == 201, sent.text
    request_id = sent.json()["id"]
    ar.last_msg[request_id] = sent.json()["msg_id"]
    for document in (ACK, {"type": "acceptance", "text": "Accepted."}):
        assert ar.peer_sends(request_id, document).status_code == 201
    item = {
        "ref": "E1",
        "description": "The letter",
        "obtained_at": "2026-11-19T15:00:00Z",
        "sha256": "0" * 64,  # the harness attaches "letter of request"
        "attachment": 1,
        "use_limitation": "Proceedings only.",
    }
    result = {"type": "result", "text": "x", "evidence": [item]}
    _refused(ar, request_id, result, "invalid_content", 422)
    item["sha256"] = hashlib.sha256(b"letter of request").hexdigest()
    assert ar.peer_sends(request_id, result).status_code == 201
    assert ar.status(request_id) == "executed"
    shown = ar.get(f"/api/v1/requests/{request_id}").json()
    assert shown["messages"][-1]["content"]["evidence"][0]["sha256"] == item["sha256"]
    assert shown["allowed_messages"] == [
        "consultation",
        "closure",
        "withdrawal",
        "status_query",
        "note",
    ]

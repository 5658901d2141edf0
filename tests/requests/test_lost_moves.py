"""A message lost for good does not leave this node where the peer never went.

AR/MPF acknowledges a request: its own status moves to `acknowledged` as the message is sealed.
If the acknowledgement is then refused for good, given up or cancelled, with no attempt that
may have left it with ES/MJ, ES/MJ is still at `delivered`: AR/MPF stayed at `acknowledged`
for good, and every decision it sent next was refused by ES/MJ as not allowed from
`delivered` (the conversation was stuck). The move is now put back, audited, and the message
can be sent again; a message that came after it keeps the move; a delivery whose move was put
back is not retried (it would move the peer only).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from app.cli import _cancelled_says
from app.crypto.encoding import utc_now
from app.crypto.receipts import issue_receipt, verify_receipt
from app.db import unit_of_work
from app.delivery import outbox
from app.delivery.settle import Outcome, settle
from app.delivery.worker import classify
from app.models import AuditEntry, Message, OutboxItem
from tests.requests.conftest import EXAMPLE, Harness

ACK = {"type": "acknowledgement", "text": "Registered."}
ACCEPT = {"type": "acceptance", "text": "Accepted."}
REFUSED_FOR_GOOD = (400, {"error": "unknown_recipient_key", "detail": "x"})
POSTPONE = {
    "type": "postponement",
    "text": "Postponed.",
    "reason": "Pending a court order.",
    "until": str((utc_now() + timedelta(days=90)).date()),  # after today, as it must be
}


def _claim_and_settle(ar: Harness, msg_id: str, status: int | None, body: Any) -> None:
    """The worker's attempt at `msg_id`'s delivery, answered with `status` and `body` (None:
    no answer at all, a transport error)."""
    outcome = Outcome(outbox.RETRY, "transport: ReadTimeout") if status is None else None
    _settle_with(ar, msg_id, outcome or classify(status or 0, body))


def _settle_with(ar: Harness, msg_id: str, outcome: Outcome) -> None:
    with unit_of_work(ar.node.sessions) as session:
        session.execute(  # due now, whatever its back-off said
            update(OutboxItem)
            .where(
                OutboxItem.message_id
                == select(Message.id).where(Message.msg_id == msg_id).scalar_subquery()
            )
            .values(next_attempt_at=utc_now() - timedelta(seconds=1))
        )
    with unit_of_work(ar.node.sessions) as session:
        claims = outbox.claim_due(
            session, now=utc_now(), lease=timedelta(seconds=300), limit=100, owner="test"
        )
        ids = dict(
            session.execute(
                select(Message.msg_id, OutboxItem.id).join(
                    OutboxItem, OutboxItem.message_id == Message.id
                )
            ).all()
        )
    mine = [claim for claim in claims if claim.outbox_id == ids[msg_id]]
    assert len(mine) == 1
    with unit_of_work(ar.node.sessions) as session:
        assert settle(session, mine[0], outcome, worker="test")
    others = [claim for claim in claims if claim.outbox_id != ids[msg_id]]
    if others:  # handed back untouched
        with unit_of_work(ar.node.sessions) as session:
            outbox.release_owned(session, owner="test", now=utc_now())


def _delivery_id(ar: Harness, msg_id: str) -> int:
    with unit_of_work(ar.node.sessions) as session:
        found = session.scalar(
            select(OutboxItem.id)
            .join(Message, Message.id == OutboxItem.message_id)
            .where(Message.msg_id == msg_id)
        )
    assert found is not None
    return int(found)


def _details(ar: Harness, action: str, msg_id: str) -> list[dict[str, Any]]:
    with unit_of_work(ar.node.sessions) as session:
        entries = session.scalars(
            select(AuditEntry.entry)
            .where(AuditEntry.action == action, AuditEntry.msg_id == msg_id)
            .order_by(AuditEntry.idx)
        )
        return [json.loads(entry)["details"] for entry in entries]


def test_an_acknowledgement_refused_for_good_puts_the_status_back(ar: Harness) -> None:
    request_id = ar.receive_request()
    sent = ar.reply(request_id, ACK)
    assert sent.status_code == 201, sent.text
    msg_id = sent.json()["msg_id"]
    assert ar.status(request_id) == "acknowledged"

    _claim_and_settle(ar, msg_id, 400, {"error": "unknown_recipient_key", "detail": "x"})

    detail = ar.get(f"/api/v1/requests/{request_id}").json()
    assert detail["status"] == "delivered"  # where ES/MJ still is
    assert "acknowledgement" in detail["allowed_messages"]
    assert _details(ar, "request.move_undone", msg_id) == [
        {"lost": "failed", "from": "acknowledged", "to": "delivered"}
    ]
    # The conversation goes on: the acknowledgement can be sent again, as a new message.
    again = ar.reply(request_id, ACK)
    assert again.status_code == 201, again.text
    assert ar.status(request_id) == "acknowledged"
    # The lost one is not retried: it would move ES/MJ and not this node.
    retried = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, msg_id)}/retry", {}, "admin")
    assert (retried.status_code, retried.json()["error"]) == (409, "move_undone")


def test_a_cancelled_postponement_puts_back_the_status_and_the_date_before_it(
    ar: Harness,
) -> None:
    request_id = ar.receive_request()
    assert ar.reply(request_id, ACK).status_code == 201
    postponed = ar.reply(request_id, POSTPONE)
    assert postponed.status_code == 201, postponed.text
    msg_id = postponed.json()["msg_id"]
    shown = ar.get(f"/api/v1/requests/{request_id}").json()
    assert (shown["status"], shown["deadlines"]["postponed_until"]) == (
        "postponed",
        POSTPONE["until"],
    )

    cancelled = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, msg_id)}/cancel", {}, "admin")
    assert cancelled.status_code == 200, cancelled.text

    detail = ar.get(f"/api/v1/requests/{request_id}").json()
    assert detail["status"] == "acknowledged"
    assert detail["deadlines"]["postponed_until"] is None
    assert _details(ar, "request.move_undone", msg_id) == [
        {"lost": "cancelled", "from": "postponed", "to": "acknowledged"}
    ]
    # `entraide deliveries cancel` says what happened to the request, not just the delivery.
    with unit_of_work(ar.node.sessions) as session:
        item = session.get(OutboxItem, _delivery_id(ar, msg_id))
        assert item is not None
        said = _cancelled_says(session, item)
    assert "status is put back: postponed -> acknowledged" in said


def test_a_message_that_may_have_reached_the_peer_keeps_its_move(ar: Harness) -> None:
    request_id = ar.receive_request()
    msg_id = ar.reply(request_id, ACK).json()["msg_id"]
    _claim_and_settle(ar, msg_id, None, None)  # no answer: ES/MJ may hold it
    cancelled = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, msg_id)}/cancel", {}, "admin")
    assert cancelled.status_code == 200, cancelled.text
    assert ar.status(request_id) == "acknowledged"
    assert _details(ar, "request.move_undone", msg_id) == []
    with unit_of_work(ar.node.sessions) as session:
        item = session.get(OutboxItem, _delivery_id(ar, msg_id))
        assert item is not None
        assert "may have reached the peer" in _cancelled_says(session, item)


def test_a_move_the_peer_answered_stays(ar: Harness) -> None:
    """A message of ES/MJ replies to the acknowledgement: ES/MJ holds it, whatever our
    attempts said. The move stays, and the log says why."""
    request_id = ar.receive_request()
    ack_id = ar.reply(request_id, ACK).json()["msg_id"]
    query = ar.peer_sends(request_id, {"type": "status_query", "text": "Any news?"})
    assert query.status_code == 201, query.text
    _claim_and_settle(ar, ack_id, 400, {"error": "unknown_recipient_key", "detail": "x"})
    assert ar.status(request_id) == "acknowledged"
    assert _details(ar, "request.move_undone", ack_id) == []
    assert _details(ar, "request.move_kept", ack_id) == [
        {"lost": "failed", "from": "acknowledged", "to": "delivered"}
    ]


def test_a_peer_message_that_did_not_see_the_lost_one_does_not_keep_its_move(
    ar: Harness,
) -> None:
    """ES/MJ, never reached by the acknowledgement, asks how things stand (its query
    follows its own request): the acknowledgement is lost all the same, and undone."""
    request_id = ar.receive_request()
    ack_id = ar.reply(request_id, ACK).json()["msg_id"]
    ar.last_msg[request_id] = request_id  # ES/MJ has seen only its request
    query = ar.peer_sends(request_id, {"type": "status_query", "text": "Any news?"})
    assert query.status_code == 201, query.text
    _claim_and_settle(ar, ack_id, 400, {"error": "unknown_recipient_key", "detail": "x"})
    assert ar.status(request_id) == "delivered"
    assert len(_details(ar, "request.move_undone", ack_id)) == 1


def test_a_retried_message_is_not_undone_with_a_later_lost_one(ar: Harness) -> None:
    """The acknowledgement was refused and kept (the acceptance after it was pending); an
    operator retries it, then cancels the acceptance: only the acceptance is undone."""
    request_id = ar.receive_request()
    ack_id = ar.reply(request_id, ACK).json()["msg_id"]
    accept_id = ar.reply(request_id, ACCEPT).json()["msg_id"]
    _claim_and_settle(ar, ack_id, 400, {"error": "unknown_recipient_key", "detail": "x"})
    retried = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, ack_id)}/retry", {}, "admin")
    assert retried.status_code == 200, retried.text
    cancel = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, accept_id)}/cancel", {}, "admin")
    assert cancel.status_code == 200, cancel.text
    assert ar.status(request_id) == "acknowledged"
    assert _details(ar, "request.move_undone", ack_id) == []


def test_a_chain_of_lost_messages_goes_back_to_before_the_first(ar: Harness) -> None:
    """An acknowledgement, then an acceptance that follows it, both refused for good: the
    first was settled while the second was still to come (its move kept), then the second
    was lost too. The request goes back to `delivered`, not to the acknowledgement's
    `acknowledged` (where the peer never was)."""
    request_id = ar.receive_request()
    ack_id = ar.reply(request_id, ACK).json()["msg_id"]
    accept_id = ar.reply(request_id, ACCEPT).json()["msg_id"]
    assert ar.status(request_id) == "accepted"
    _claim_and_settle(ar, ack_id, *REFUSED_FOR_GOOD)
    assert ar.status(request_id) == "accepted"  # the acceptance may still arrive
    _claim_and_settle(ar, accept_id, *REFUSED_FOR_GOOD)
    detail = ar.get(f"/api/v1/requests/{request_id}").json()
    assert detail["status"] == "delivered"
    assert "acknowledgement" in detail["allowed_messages"]
    assert [d["to"] for d in _details(ar, "request.move_undone", accept_id)] == ["acknowledged"]
    assert [d["to"] for d in _details(ar, "request.move_undone", ack_id)] == ["delivered"]


def test_a_successor_refused_until_a_lost_predecessor_comes_is_undone_with_it(
    ar: Harness,
) -> None:
    """The acceptance once went unanswered (the peer may hold it), then the peer answered
    425: it waits for the acknowledgement, refused for good. It can never hold the
    acceptance: both moves are undone, although an attempt of the acceptance timed out."""
    request_id = ar.receive_request()
    ack_id = ar.reply(request_id, ACK).json()["msg_id"]
    accept_id = ar.reply(request_id, ACCEPT).json()["msg_id"]
    _claim_and_settle(ar, ack_id, *REFUSED_FOR_GOOD)
    # Posted after the acknowledgement is settled (a conversation's messages go in order).
    _claim_and_settle(ar, accept_id, None, None)  # no answer: a timeout
    waiting = {"error": "predecessor_missing", "detail": "x"}
    _claim_and_settle(ar, accept_id, 425, waiting)
    assert ar.status(request_id) == "delivered"
    assert len(_details(ar, "request.move_undone", accept_id)) == 1
    assert len(_details(ar, "request.move_undone", ack_id)) == 1


def test_a_request_whose_receipt_came_goes_back_to_delivered_not_queued(
    ar: Harness,
) -> None:
    """Here the requesting side: a withdrawal sent while the request was `queued`, then the
    request's receipt came, then the withdrawal was refused for good. Back to `delivered`."""
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    submitted = ar.post("/api/v1/requests", body)
    assert submitted.status_code == 201, submitted.text
    request_id = submitted.json()["id"]
    ar.last_msg[request_id] = request_id
    withdrawn = ar.reply(request_id, {"type": "withdrawal", "text": "No longer needed."})
    assert withdrawn.status_code == 201, withdrawn.text
    assert ar.status(request_id) == "withdrawn"
    with unit_of_work(ar.node.sessions) as session:
        envelope_hash = session.scalar(
            select(Message.envelope_hash).where(Message.msg_id == request_id)
        )
    assert envelope_hash is not None
    # As ES/MJ signs it (every read of the request verifies it again).
    signed = issue_receipt(
        ar.peer_keys.signing,
        signer_kid=ar.peer_keys.signing_kid,
        msg_id=request_id,
        envelope_hash=envelope_hash,
        from_authority="AR/MPF",
        to_authority="ES/MJ",
        received_at=utc_now(),
        checkpoint=None,
    )
    receipt = verify_receipt(
        signed,
        signer_public=ar.peer_keys.signing_public,
        msg_id=request_id,
        envelope_hash=envelope_hash,
        from_authority="AR/MPF",
        to_authority="ES/MJ",
    )
    _settle_with(
        ar,
        request_id,
        Outcome(outbox.DELIVERED, http_status=201, signed=signed, receipt=receipt),
    )
    assert ar.status(request_id) == "withdrawn"
    _claim_and_settle(ar, withdrawn.json()["msg_id"], *REFUSED_FOR_GOOD)
    assert ar.status(request_id) == "delivered"


def test_a_lost_note_undoes_the_move_kept_for_it(ar: Harness) -> None:
    """The acknowledgement was refused for good and its move kept, a note being on its way
    after it; the note is lost too (cancelled): the acknowledgement's move goes, although the
    note itself moved nothing."""
    request_id = ar.receive_request()
    ack_id = ar.reply(request_id, ACK).json()["msg_id"]
    note_id = ar.reply(request_id, {"type": "note", "text": "Working on it."}).json()["msg_id"]
    _claim_and_settle(ar, ack_id, *REFUSED_FOR_GOOD)
    assert ar.status(request_id) == "acknowledged"
    cancel = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, note_id)}/cancel", {}, "admin")
    assert cancel.status_code == 200, cancel.text
    assert ar.status(request_id) == "delivered"
    assert len(_details(ar, "request.move_undone", ack_id)) == 1

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

from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import outbox
from app.delivery.settle import Outcome, settle
from app.delivery.worker import classify
from app.models import AuditEntry, Message, OutboxItem
from tests.requests.conftest import Harness

ACK = {"type": "acknowledgement", "text": "Registered."}
POSTPONE = {
    "type": "postponement",
    "text": "Postponed.",
    "reason": "Pending a court order.",
    "until": "2027-03-01",
}


def _claim_and_settle(ar: Harness, msg_id: str, status: int | None, body: Any) -> None:
    """The worker's attempt at `msg_id`'s delivery, answered with `status` and `body` (None:
    no answer at all, a transport error)."""
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
    outcome = Outcome(outbox.RETRY, "transport: ReadTimeout") if status is None else None
    outcome = outcome or classify(status or 0, body)
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
    assert (shown["status"], shown["deadlines"]["postponed_until"]) == ("postponed", "2027-03-01")

    cancelled = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, msg_id)}/cancel", {}, "admin")
    assert cancelled.status_code == 200, cancelled.text

    detail = ar.get(f"/api/v1/requests/{request_id}").json()
    assert detail["status"] == "acknowledged"
    assert detail["deadlines"]["postponed_until"] is None
    assert _details(ar, "request.move_undone", msg_id) == [
        {"lost": "cancelled", "from": "postponed", "to": "acknowledged"}
    ]


def test_a_message_that_may_have_reached_the_peer_keeps_its_move(ar: Harness) -> None:
    request_id = ar.receive_request()
    msg_id = ar.reply(request_id, ACK).json()["msg_id"]
    _claim_and_settle(ar, msg_id, None, None)  # no answer: ES/MJ may hold it
    cancelled = ar.post(f"/api/v1/admin/deliveries/{_delivery_id(ar, msg_id)}/cancel", {}, "admin")
    assert cancelled.status_code == 200, cancelled.text
    assert ar.status(request_id) == "acknowledged"
    assert _details(ar, "request.move_undone", msg_id) == []


def test_a_move_with_a_message_after_it_stays(ar: Harness) -> None:
    request_id = ar.receive_request()
    ack_id = ar.reply(request_id, ACK).json()["msg_id"]
    # A message of ES/MJ arrives after it (here it follows the acknowledgement): it was
    # judged from `acknowledged`, and undoing the move under it would split the nodes
    # another way. The move stays, and the log says why.
    query = ar.peer_sends(request_id, {"type": "status_query", "text": "Any news?"})
    assert query.status_code == 201, query.text
    _claim_and_settle(ar, ack_id, 400, {"error": "unknown_recipient_key", "detail": "x"})
    assert ar.status(request_id) == "acknowledged"
    assert _details(ar, "request.move_undone", ack_id) == []
    assert _details(ar, "request.move_kept", ack_id) == [
        {"lost": "failed", "from": "acknowledged", "to": "delivered", "status": "acknowledged"}
    ]


ACCEPT = {"type": "acceptance", "text": "Accepted."}
REFUSED_FOR_GOOD = (400, {"error": "unknown_recipient_key", "detail": "x"})


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

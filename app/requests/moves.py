"""A sent message's move of its request, kept with its delivery and put back if it is lost.

This node moves its request's status when its officer sends a message (the lifecycle judges
the move before anything is sealed, app/requests/lifecycle.py); the peer moves its own when
the message arrives. A message lost for good (refused with a final answer, given up at its
deadline, cancelled) with no attempt that may have left it with the peer never moved the
peer: left alone, this node stays where the peer never went, and every later decision is
refused by the peer as not allowed from where it is. So the move is kept with the delivery
(`OutboxItem.moved_*`) and put back when the message is lost, if nothing came after it in
the conversation (a later message was judged from the moved status: undoing under it would
split the nodes another way, so the move stays, and the entry says so).

A delivery whose move was put back is not retried: the message would move the peer and not
this node. The officer sends it again, as a new message, judged from where the request is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session

from app.audit.log import Event
from app.delivery.outbox import CANCELLED, FAILED, peer_may_hold
from app.errors import Conflict
from app.models import CaseFile, Message, OutboxItem, Receipt
from app.requests import deadlines, lifecycle
from app.requests.status import QUEUED, status_after_receipt

OUTBOUND, INBOUND = "outbound", "inbound"


@dataclass(frozen=True)
class Before:
    """What a message may change of its request, as it was before the message."""

    status: str
    postponed_until: date | None
    question: str | None

    @classmethod
    def of(cls, case: CaseFile) -> Before:
        return cls(case.status, case.postponed_until, case.question_msg_id)


def move_columns(before: Before, case: CaseFile) -> dict[str, object]:
    """The delivery's record of the move from `before` to the request as it is now; none
    for a message that moved nothing."""
    if Before.of(case) == before:
        return {}
    return {
        "moved_from": before.status,
        "moved_to": case.status,
        "postponed_before": before.postponed_until,
        "question_before": before.question,
    }


def undo_if_lost(
    session: Session,
    item: OutboxItem,
    message: Message,
    *,
    now: datetime,
    why: str,
) -> list[Event]:
    """Put the request back where it was before `message`, lost for good (the caller knows
    no attempt may have left it with the peer). Returns the audit entries to record: none
    if the message moved nothing. Earlier lost messages whose move was kept for this one
    (it came after them) are undone with it, newest first: a chain of lost messages leaves
    the request where it was before the first."""
    if item.move_undone_at is not None:
        return []
    # Locks in the order every writer takes them: the deliveries a chain may undo, in id
    # order, then the request (an arriving message of the peer locks it too, so it is
    # judged before or after this, never against a status changing underneath).
    kept = list(
        session.scalars(
            select(OutboxItem)
            .join(Message, Message.id == OutboxItem.message_id)
            .where(
                Message.request_id == message.request_id,
                OutboxItem.move_kept_at.is_not(None),
                OutboxItem.move_undone_at.is_(None),
            )
            .order_by(OutboxItem.id)
            .with_for_update(of=OutboxItem)
        )
    )
    case = session.get(CaseFile, message.request_id, with_for_update=True, populate_existing=True)
    if case is None:  # pragma: no cover - requests are never deleted
        return []
    events: list[Event] = []
    if item.moved_to is None or item.moved_from is None:
        # It moved nothing itself (a note, a status query), but a move kept for it, earlier
        # in the conversation, may be undone now that it is lost too.
        if _peer_has_it(session, case, message):
            return []
        earlier = _kept_before(session, kept, message)
        if earlier is None:
            return []
        item, message = earlier
        why = "failed" if item.state == FAILED else "cancelled"
    while True:
        details: dict[str, object] = {"lost": why, "from": item.moved_to, "to": item.moved_from}
        if _peer_has_it(session, case, message):
            # The peer answered after it: it holds it, whatever our attempts said.
            events.append(_event("request.move_kept", "peer_has_it", case, message, details))
            return events
        if case.status != item.moved_to or _followed(session, case, message):
            # A message of ours came after it, judged from the moved status: the move stays,
            # until what came after is lost too.
            item.move_kept_at = now
            details = {**details, "status": case.status}
            events.append(_event("request.move_kept", "later_messages", case, message, details))
            return events
        _undo(session, case, item, now)
        events.append(_event("request.move_undone", "ok", case, message, details))
        earlier = _kept_before(session, kept, message)
        if earlier is None:
            return events
        item, message = earlier
        why = "failed" if item.state == FAILED else "cancelled"


def _kept_before(
    session: Session, kept: list[OutboxItem], message: Message
) -> tuple[OutboxItem, Message] | None:
    """The latest earlier delivery whose move was kept for a later message and which is
    still lost for good (not retried since, not possibly with the peer)."""
    for item in sorted(kept, key=lambda row: row.message_id, reverse=True):
        if (
            item.message_id < message.id
            and item.move_undone_at is None
            and item.state in (FAILED, CANCELLED)
            and not peer_may_hold(session, item.id)
        ):
            earlier = session.get(Message, item.message_id)
            if earlier is not None:
                return item, earlier
    return None


def _followed(session: Session, case: CaseFile, message: Message) -> bool:
    """Whether a message of ours came after `message` and still counts (one lost itself
    moved nothing at the peer). The peer's later messages do not count: one that moved this
    request already changed its status, and one that moved nothing (a status query, a
    note) was judged from where the peer was, without `message`."""
    lost = exists().where(
        and_(
            OutboxItem.message_id == Message.id,
            or_(OutboxItem.state == FAILED, OutboxItem.state == CANCELLED),
        )
    )
    return bool(
        session.scalar(
            select(
                exists().where(
                    Message.request_id == case.id,
                    Message.id > message.id,
                    Message.direction == OUTBOUND,
                    ~lost,
                )
            )
        )
    )


def _peer_has_it(session: Session, case: CaseFile, message: Message) -> bool:
    """Whether a message of the peer replies to `message` or to a later one of ours: the
    peer took it (it takes a message only after the one it follows)."""
    ours = select(Message.msg_id).where(
        Message.request_id == case.id,
        Message.id >= message.id,
        Message.direction == OUTBOUND,
    )
    return bool(
        session.scalar(
            select(
                exists().where(
                    Message.request_id == case.id,
                    Message.direction == INBOUND,
                    Message.in_reply_to.in_(ours),
                )
            )
        )
    )


def _undo(session: Session, case: CaseFile, item: OutboxItem, now: datetime) -> None:
    status = item.moved_from or case.status
    if status == QUEUED and _first_receipted(session, case):
        status = status_after_receipt(status)  # the request's receipt came meanwhile
    case.status = status
    case.postponed_until = item.postponed_before
    case.question_msg_id = item.question_before
    stored = deadlines.Deadlines(case.acknowledge_by, case.decide_by, case.execute_by)
    case.due_at = deadlines.due_at(lifecycle.parse_state(case.status), stored, case.postponed_until)
    case.updated_at = now
    item.move_undone_at = now


def _first_receipted(session: Session, case: CaseFile) -> bool:
    return bool(
        session.scalar(
            select(exists().where(Receipt.message_id == Message.id, Message.msg_id == case.id))
        )
    )


def _event(
    action: str, outcome: str, case: CaseFile, message: Message, details: dict[str, object]
) -> Event:
    return Event(
        actor="node",
        action=action,
        outcome=outcome,
        request_id=case.id,
        msg_id=message.msg_id,
        peer=case.peer_authority,
        details=details,
    )


def kept_move_retried(item: OutboxItem) -> None:
    """A delivery retried by an operator is no longer lost: its kept move is not undone."""
    item.move_kept_at = None


def check_retry(item: OutboxItem) -> None:
    """A delivery whose move was put back is not sent again: it would move the peer only."""
    if item.move_undone_at is not None:
        raise Conflict(
            "this message was lost and the request's status put back to where it was before "
            "it: send the message again, as a new one",
            code="move_undone",
        )

"""What an operator does with deliveries: find the stuck and failed ones, retry or cancel."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.audit.log import Event, record, record_many
from app.crypto.encoding import utc_now
from app.db import driver_error_name
from app.delivery import outbox
from app.delivery.retry import delivery_deadline
from app.errors import Conflict, NotFound
from app.models import CaseFile, DeliveryAttempt, Message, OutboxItem
from app.requests import moves


@dataclass(frozen=True)
class DeliveryRow:
    item: OutboxItem
    message: Message
    attempts: list[DeliveryAttempt]


def list_deliveries(
    session: Session,
    *,
    state: str | None,
    stuck_for: timedelta | None,
    peer: str | None,
    limit: int,
    before: int | None,
) -> tuple[list[DeliveryRow], int | None]:
    """Newest first. `stuck_for`: undelivered rows queued longer than that."""
    statement = select(OutboxItem, Message).join(Message, Message.id == OutboxItem.message_id)
    if state is not None:
        statement = statement.where(OutboxItem.state == state)
    if stuck_for is not None:
        statement = statement.where(
            OutboxItem.state.in_(outbox.PENDING), OutboxItem.created_at <= utc_now() - stuck_for
        )
    if peer is not None:
        statement = statement.where(OutboxItem.peer_authority == peer)
    if before is not None:
        statement = statement.where(OutboxItem.id < before)
    rows = list(session.execute(statement.order_by(OutboxItem.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    result = [DeliveryRow(item, message, _attempts(session, item.id)) for item, message in rows]
    return result, (rows[-1][0].id if more and rows else None)


def _attempts(session: Session, outbox_id: int) -> list[DeliveryAttempt]:
    return list(
        session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.outbox_id == outbox_id)
            .order_by(DeliveryAttempt.attempt.desc())
            .limit(20)
        )
    )


def _locked(session: Session, delivery_id: int) -> tuple[OutboxItem, Message]:
    # populate_existing: a copy read before the lock (cancel_delivery's) is read again, or
    # the state checked would be the one before a worker's claim committed meanwhile.
    item = session.get(OutboxItem, delivery_id, with_for_update=True, populate_existing=True)
    message = session.get(Message, item.message_id) if item is not None else None
    if item is None or message is None:
        raise NotFound(f"no delivery {delivery_id}", code="unknown_delivery")
    return item, message


def retry_delivery(
    session: Session, *, delivery_id: int, actor: str, now: datetime | None = None
) -> OutboxItem:
    """Make a waiting or failed delivery due now, with a fresh deadline (never past the
    envelope's own expiry: an expired envelope must be sent again as a new message)."""
    moment = now or utc_now()
    item, message = _locked(session, delivery_id)
    if item.state not in (outbox.RETRY, outbox.FAILED, outbox.QUEUED):
        raise Conflict(f"a delivery in state {item.state} cannot be retried", code="not_retryable")
    _refuse_if_overtaken(session, item)
    moves.check_retry(item)
    moves.kept_move_retried(item)
    if message.expires_at <= moment:
        raise Conflict(
            "the envelope has expired; send the request or message again",
            code="envelope_expired",
        )
    previous = item.state
    item.state = outbox.QUEUED
    item.next_attempt_at = moment
    # The urgency's own deadline from now, as for a delivery just queued: an emergency
    # retried gives up (loudly) within hours, not when its envelope expires days later.
    case = session.get(CaseFile, message.request_id)
    urgency = case.urgency if case is not None else "routine"
    item.expires_at = delivery_deadline(moment, urgency, message.expires_at)
    item.updated_at = moment
    record(
        session,
        actor=actor,
        action="delivery.retried",
        request_id=message.request_id,
        msg_id=message.msg_id,
        peer=item.peer_authority,
        details={"delivery": item.id, "from_state": previous},
    )
    return item


# SQLSTATE lock_not_available: a row a NOWAIT lock found held.
LOCK_NOT_AVAILABLE = "55P03"


def _refuse_if_overtaken(session: Session, item: OutboxItem) -> None:
    """A conversation's messages reach the peer in the order they were written (claim_due):
    once a later one is delivered or being posted, this one, retried, would be applied on
    top of it, to a state its sender never had (from review).

    The later rows are locked: read unlocked, a worker's claim of one, not yet committed,
    was not seen, nor this retry by the claim, and both committed (PostgreSQL; from review).
    Locked, a claim after this skips them. One held by another transaction now (a claim or
    a settlement under way) is not waited for: a settlement locks this request's earlier
    rows after its own, and waiting made a cycle (from review: a deadlock); the retry is
    refused as busy (NOWAIT: one statement, no window for a row committed meanwhile to
    pass for a locked one), to be asked again in a moment."""
    if item.request_id is None:
        return
    try:
        later_rows = session.execute(
            select(OutboxItem.id, OutboxItem.state)
            .where(OutboxItem.request_id == item.request_id, OutboxItem.id > item.id)
            .order_by(OutboxItem.id)
            .with_for_update(nowait=True)
        ).all()
    except OperationalError as exc:
        if driver_error_name(exc) != f"SQLSTATE {LOCK_NOT_AVAILABLE}":
            raise
        raise Conflict(
            "a later message of this request is being posted or settled at this moment: "
            "ask again in a few seconds",
            code="delivery_busy",
        ) from exc
    later = next(
        (row.id for row in later_rows if row.state in (outbox.IN_FLIGHT, outbox.DELIVERED)), None
    )
    if later is not None:
        raise Conflict(
            f"a later message of this request (delivery {later}) has reached the peer or is "
            "being posted: this one, retried now, would arrive after it, out of order; if it "
            "is still needed, write it again as a new message",
            code="overtaken",
        )


def cancel_delivery(session: Session, *, delivery_id: int, actor: str) -> OutboxItem:
    # Locked with the deliveries whose kept moves the cancel may undo, in id order, as the
    # undo (app/requests/moves.py) and every other writer take them: two cancels, or a cancel
    # and a settlement, of one request never wait on each other in a cycle.
    found = session.get(OutboxItem, delivery_id)
    request_id = (
        session.scalar(select(Message.request_id).where(Message.id == found.message_id))
        if found is not None
        else None
    )
    if request_id is not None:
        session.scalars(
            select(OutboxItem.id)
            .join(Message, Message.id == OutboxItem.message_id)
            .where(
                (OutboxItem.id == delivery_id)
                | (
                    (Message.request_id == request_id)
                    & OutboxItem.move_kept_at.is_not(None)
                    & OutboxItem.move_undone_at.is_(None)
                )
            )
            .order_by(OutboxItem.id)
            .with_for_update(of=OutboxItem)
        ).all()
    item, message = _locked(session, delivery_id)
    if item.state not in (outbox.QUEUED, outbox.RETRY, outbox.FAILED):
        raise Conflict(
            f"a delivery in state {item.state} cannot be cancelled", code="not_cancellable"
        )
    previous = item.state
    item.state = outbox.CANCELLED
    item.updated_at = utc_now()
    # Cancelling stops our attempts; it cannot recall an envelope the peer may already hold
    # (an earlier answer was lost): the record says so rather than imply it was never sent.
    may_hold = outbox.peer_may_hold(session, item.id)
    # The request's lock (for the undo) before the audit log's, as every writer takes them.
    undone = (
        []
        if may_hold  # it may have reached the peer: its move stays
        else moves.undo_if_lost(session, item, message, now=item.updated_at, why="cancelled")
    )
    cancelled = Event(
        actor=actor,
        action="delivery.cancelled",
        request_id=message.request_id,
        msg_id=message.msg_id,
        peer=item.peer_authority,
        details={"delivery": item.id, "from_state": previous, "peer_may_hold_it": may_hold},
    )
    record_many(session, [cancelled, *undone])
    return item

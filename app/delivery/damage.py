"""Outbox rows the database cannot give back, set aside so that the others go on.

From review: one waiting row holding a value the database driver cannot read failed every
claim, since the claim reads each row it weighs; nothing was delivered any more, while the
worker's log said only "OperationalError". Such a value is SQLite text that is not UTF-8 or a
time that is no time, or on PostgreSQL a time its driver cannot load ('infinity', past the
year 9999: from review, only SQLite's text was handled, and such a row still failed every
round). When a round meets one, the worker finds the rows a claim weighs by their ids alone
(integers, always readable), reads them a chunk at a time (a chunk that fails, row by row),
each with its message, each read in a savepoint, and marks each row it cannot read `failed`:
its last error names the column (never the value), an audit entry and the log say so. The
operator repairs the value, then retries the delivery (`POST
/api/v1/admin/deliveries/{id}/retry`) or cancels it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from app.audit.log import Event, record_many
from app.db import Unreadable, UnreadableValue, unreadable
from app.delivery import outbox
from app.errors import StoredDataCorrupt
from app.models import Message, OutboxItem

MESSAGES = cast(Table, Message.__table__)
CHUNK = 500
# The outcome of the audit entry and the prefix of the row's last error.
DAMAGED = StoredDataCorrupt.code


@dataclass(frozen=True)
class DamagedRow:
    outbox_id: int
    column: str  # "table.column"
    why: str  # the kind of value, never the value


def weighed_ids(session: Session, *, now: datetime) -> list[int]:
    """The rows a claim may read, due or not yet (a row waiting for its retry would fail a
    later round): waiting, or in flight under a lease run out."""
    return list(
        session.scalars(
            select(OutboxItem.id)
            .where(
                or_(
                    outbox.waiting(session),
                    (OutboxItem.state == outbox.IN_FLIGHT) & (OutboxItem.lease_until < now),
                )
            )
            .order_by(OutboxItem.id)
        )
    )


def _reads(session: Session, statement: Select[tuple[object, ...]]) -> Unreadable | None:
    """What of these rows cannot be read, if anything. In a savepoint: a failed read ends no
    transaction. Any other failure (the database out of reach) is raised."""
    try:
        with session.begin_nested():
            session.execute(statement).all()
    except (DBAPIError, UnreadableValue) as exc:
        found = unreadable(exc)
        if found is None:
            raise
        return found
    return None


def _message_of(ids: list[int]) -> Select[tuple[int]]:
    return select(outbox.OUTBOX.c.message_id).where(outbox.OUTBOX.c.id.in_(ids))


def _unreadable(session: Session, ids: list[int]) -> Unreadable | None:
    """The first value of these rows (or their messages) that cannot be read."""
    return _reads(session, select(outbox.OUTBOX).where(outbox.OUTBOX.c.id.in_(ids))) or _reads(
        session, select(MESSAGES).where(MESSAGES.c.id.in_(_message_of(ids)))
    )


def _column(session: Session, outbox_id: int) -> str:
    """The column that cannot be read, one read each, where the driver did not say which."""
    for table, row in (
        (outbox.OUTBOX, outbox.OUTBOX.c.id == outbox_id),
        (MESSAGES, MESSAGES.c.id.in_(_message_of([outbox_id]))),
    ):
        for column in table.c:
            if _reads(session, select(column).where(row)) is not None:
                return f"{table.name}.{column.name}"
    return "unknown"  # the row read whole failed, each column alone read: not seen


def find_damaged(session: Session, *, now: datetime) -> list[DamagedRow]:
    found = []
    ids = weighed_ids(session, now=now)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        if _unreadable(session, chunk) is None:
            continue
        for outbox_id in chunk:
            damage = _unreadable(session, [outbox_id])
            if damage is not None:
                column = damage.column or _column(session, outbox_id)
                found.append(DamagedRow(outbox_id, column, damage.why))
    return found


def set_aside_damaged(session: Session, *, now: datetime) -> list[DamagedRow]:
    """Mark `failed` each row a claim would read whose stored values cannot be read, with an
    audit entry each (what of its message can still be read names it there)."""
    damaged = find_damaged(session, now=now)
    events = []
    for row in damaged:
        detail = StoredDataCorrupt.of_column(row.column, row.why).detail
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == row.outbox_id)
            .values(
                state=outbox.FAILED,
                last_error=outbox.truncate_error(f"{DAMAGED}: {detail}"),
                lease_until=None,
                lease_owner=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        msg_id, request_id = _names(session, row.outbox_id)
        events.append(
            Event(
                actor="node",
                action="delivery.failed",
                outcome=DAMAGED,
                request_id=request_id,
                msg_id=msg_id,
                details={"outbox_id": row.outbox_id, "column": row.column},
            )
        )
    if events:
        record_many(session, events)
        outbox.add_to_counters(session, {f"attempts:{DAMAGED}": len(events)})
    return damaged


def _names(session: Session, outbox_id: int) -> tuple[str | None, str | None]:
    """The message's msg_id and request id, if they can be read."""
    try:
        row = session.execute(
            select(Message.msg_id, Message.request_id).where(
                Message.id
                == select(OutboxItem.message_id).where(OutboxItem.id == outbox_id).scalar_subquery()
            )
        ).first()
    except (DBAPIError, UnreadableValue) as exc:
        if unreadable(exc) is None:
            raise
        return None, None
    return (row.msg_id, row.request_id) if row is not None else (None, None)

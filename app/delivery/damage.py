"""Outbox rows the database driver cannot read, set aside so that the others go on.

From review: one waiting row holding a value SQLite cannot decode (TEXT that is not UTF-8:
a hand edit, a damaged page) failed every claim, since the claim reads each row it weighs;
nothing was delivered any more, while the worker's log said only "OperationalError". When a
round meets such a value, the worker finds the rows a claim weighs by their ids alone
(integers, always readable), reads them a chunk at a time (a chunk that fails, row by row),
each with its message, and marks each row it cannot read `failed`: its last error names the
column (never the value), an audit entry and the log say so. The operator repairs the value,
then retries the delivery (`POST /api/v1/admin/deliveries/{id}/retry`) or cancels it.

PostgreSQL has no such case (app/db.py `undecodable_column`): there this finds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.audit.log import Event, record_many
from app.db import undecodable_column
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


def _unreadable(session: Session, ids: list[int]) -> str | None:
    """The column of the first value of these rows (or their messages) that cannot be read."""
    try:
        session.execute(select(outbox.OUTBOX).where(outbox.OUTBOX.c.id.in_(ids))).all()
    except OperationalError as exc:
        column = undecodable_column(exc)
        if column is None:
            raise
        return column
    messages = select(outbox.OUTBOX.c.message_id).where(outbox.OUTBOX.c.id.in_(ids))
    try:
        session.execute(select(MESSAGES).where(MESSAGES.c.id.in_(messages))).all()
    except OperationalError as exc:
        column = undecodable_column(exc)
        if column is None:
            raise
        return column
    return None


def find_damaged(session: Session, *, now: datetime) -> list[DamagedRow]:
    found = []
    ids = weighed_ids(session, now=now)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        if _unreadable(session, chunk) is None:
            continue
        for outbox_id in chunk:
            column = _unreadable(session, [outbox_id])
            if column is not None:
                found.append(DamagedRow(outbox_id, column))
    return found


def set_aside_damaged(session: Session, *, now: datetime) -> list[DamagedRow]:
    """Mark `failed` each row a claim would read whose stored values cannot be read, with an
    audit entry each (what of its message can still be read names it there)."""
    damaged = find_damaged(session, now=now)
    events = []
    for row in damaged:
        detail = StoredDataCorrupt.of_column(row.column).detail
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
    except OperationalError as exc:
        if undecodable_column(exc) is None:
            raise
        return None, None
    return (row.msg_id, row.request_id) if row is not None else (None, None)

"""Claiming and settling outbox rows.

A claim moves due rows to `in_flight` with a lease. On PostgreSQL, `FOR UPDATE SKIP LOCKED`
lets any number of workers claim without blocking each other or taking the same row; on
SQLite, `BEGIN IMMEDIATE` (app.db) makes the claim a single writer's transaction. A row whose
worker died stays `in_flight` until its lease runs out, then any worker reclaims it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.models import OutboxItem

QUEUED = "queued"
IN_FLIGHT = "in_flight"
RETRY = "retry"
DELIVERED = "delivered"
FAILED = "failed"
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Claim:
    outbox_id: int
    message_id: int
    peer_authority: str
    attempts: int


def claim_due(session: Session, *, now: datetime, lease: timedelta, limit: int) -> list[Claim]:
    statement = (
        select(OutboxItem)
        .where(
            or_(
                OutboxItem.state.in_((QUEUED, RETRY)) & (OutboxItem.next_attempt_at <= now),
                (OutboxItem.state == IN_FLIGHT) & (OutboxItem.lease_until < now),
            )
        )
        .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claims = []
    for item in session.scalars(statement):
        item.state = IN_FLIGHT
        item.lease_until = now + lease
        item.attempts += 1
        claims.append(Claim(item.id, item.message_id, item.peer_authority, item.attempts))
    session.flush()
    return claims


def truncate_error(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"

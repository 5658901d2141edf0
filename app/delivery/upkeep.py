"""What a delivery worker puts right in the outbox every heartbeat period, each with one
UPDATE outside the claim (the claim, the hot path, reads only its two indexed ranges).

- Leases of dead workers. A worker killed (kill -9, a host lost) left its rows in flight
  until their lease ran out: 300 s by default, emergencies too, although the node was back
  in seconds (from review). Every worker writes a heartbeat (app/delivery/heartbeat.py); a
  lease whose owner has none alive is cut short, and the next claim takes the row over as
  it takes over any lease run out (recording the attempt's outcome as unknown).
- Rows planned by a clock that was ahead. No backoff, nor any Retry-After a peer may ask
  for, puts an attempt further ahead than `PLANNED_AHEAD_MAX`: a row planned further was
  planned while this host's (or another worker's) wall clock was ahead, and once the clock
  stepped back it would wait as long as the step (from review: two hours for a step of
  two). It is made due now.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import exists, or_, update
from sqlalchemy.orm import Session

from app.delivery import heartbeat
from app.delivery.outbox import IN_FLIGHT, SUSPENDED_FOR, waiting
from app.delivery.retry import POLICIES
from app.models import OutboxItem, Peer, WorkerHeartbeat
from app.peers.client import MAX_RETRY_AFTER_SECONDS

PLANNED_AHEAD_MAX = timedelta(
    seconds=max(MAX_RETRY_AFTER_SECONDS, *(policy.cap_seconds for policy in POLICIES.values()))
    + 300.0
)


def reclaim_orphaned(session: Session, *, owner: str, now: datetime, grace: timedelta) -> int:
    """Cut short the leases held by workers with no heartbeat alive, claimed (or renewed)
    more than `grace` ago: a worker starting beats at once, but its first beat may follow
    its first claim. The caller's own leases are never cut: it is alive."""
    alive = (
        exists()
        .where(WorkerHeartbeat.worker_id == OutboxItem.lease_owner)
        # The heartbeats' own clock (the database's on PostgreSQL).
        .where(WorkerHeartbeat.expires_at > heartbeat.database_now(session))
    )
    result = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.state == IN_FLIGHT,
            OutboxItem.lease_until > now,
            OutboxItem.updated_at < now - grace,
            or_(OutboxItem.lease_owner.is_(None), OutboxItem.lease_owner != owner),
            ~alive,
        )
        .values(lease_until=now)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def due_after_clock_step(session: Session, *, now: datetime) -> int:
    """Make due the waiting rows planned further ahead than any backoff plans, except those
    of suspended peers (which wait a century, `outbox.SUSPENDED_FOR`, for a resumption):
    a range of the index on the next attempt that holds no row unless a clock stepped."""
    suspended = exists().where(
        Peer.authority_id == OutboxItem.peer_authority, Peer.suspended_at.is_not(None)
    )
    result = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.next_attempt_at > now + PLANNED_AHEAD_MAX,
            OutboxItem.next_attempt_at < now + SUSPENDED_FOR / 2,
            # As the claim writes it: on SQLite, kept off the index on state (every waiting
            # row) for the range of the index on the next attempt (none, as a rule).
            waiting(session),
            ~suspended,
        )
        .values(next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)

"""What a delivery worker puts right in the outbox every heartbeat period, each with one
UPDATE outside the claim (the claim, the hot path, reads only its two indexed ranges).

- Leases of dead workers. A worker killed (kill -9, a host lost) left its rows in flight
  until their lease ran out: 300 s by default, emergencies too, although the node was back
  in seconds (from review). Every worker writes a heartbeat (app/delivery/heartbeat.py); a
  lease whose owner's heartbeat stood still for three of the owner's periods is cut short,
  and the next claim takes the row over as it takes over any lease run out (recording the
  attempt's outcome as unknown). A heartbeat is judged by whether it changes, watched on
  this worker's boot clock (`HeartbeatWatch`), never by the times it holds: a wall clock
  stepped forward (this host's, or the database's on PostgreSQL) made every live worker's
  heartbeat look expired, and their posts were taken over and sent twice (from review).
- Rows planned by a clock that was ahead. No backoff, nor any Retry-After a peer may ask
  for, puts an attempt further ahead than `PLANNED_AHEAD_MAX`: a row planned (its
  `updated_at`) further ahead of this worker's clock than that was planned while the
  planner's wall clock was ahead, and once the clock stepped back it would wait as long as
  the step (from review: two hours for a step of two). It is made due now. A worker whose
  clock is merely behind its peers' by less than that (the margin it once had was 5 min
  over the longest wait) never takes a row for one planned ahead: it pulled a peer's
  Retry-After forward (from review).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, or_, select, update
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


@dataclass(frozen=True)
class Sighting:
    """A worker's heartbeat as last seen changed: its `seen_at` (None: no row), when this
    worker first saw it so (its boot clock), and the owner's period (its row's)."""

    seen_at: datetime | None
    since: float
    period: float


class HeartbeatWatch:
    """The other workers' heartbeats as one worker sees them, in its memory: a worker is
    taken for dead once its row (or its lack of one) stayed as it was for `MISSED_BEATS` of
    its own periods by this worker's boot clock. A worker restarted watches afresh."""

    def __init__(self, every_seconds: float) -> None:
        self.every_seconds = every_seconds  # the period assumed of an owner with no row
        self._sightings: dict[str | None, Sighting] = {}
        self._looked_at: float | None = None  # boot clock of the last look (`still`)

    def still(
        self,
        rows: dict[str, tuple[datetime, datetime]],
        owners: Collection[str | None],
        boot: float,
    ) -> dict[str | None, datetime | None]:
        """Of `owners`, those whose heartbeat stood still long enough, with the `seen_at`
        it stood still at. `rows`: every heartbeat row, `worker_id: (seen_at, expires_at)`;
        each is watched, so that a worker's silence counts from its last beat."""
        watched: dict[str | None, Sighting] = {}
        for owner in {*rows, *owners}:
            row = rows.get(owner) if owner is not None else None
            seen_at, period = None, self.every_seconds
            if row is not None:
                seen_at, expires_at = row
                if expires_at > seen_at:  # both written by one beat, on one clock
                    period = (expires_at - seen_at).total_seconds() / heartbeat.MISSED_BEATS
            last = self._sightings.get(owner)
            since = last.since if last is not None and last.seen_at == seen_at else boot
            watched[owner] = Sighting(seen_at, since, period)
        self._sightings = watched  # owners neither beating nor holding leases are forgotten
        self._looked_at = boot
        return {
            owner: watched[owner].seen_at
            for owner in owners
            if boot - watched[owner].since >= watched[owner].period * heartbeat.MISSED_BEATS
        }

    def current(self, boot: float) -> bool:
        """Whether the last look is recent enough for `beating` to be believed: within
        `MISSED_BEATS` of this worker's periods. The upkeep looks every period, but not while
        a step of the clock is held (app/delivery/clocksteps.py): the first claim after the
        hold read sightings 15 minutes old, no worker beating, and took over a live worker's
        delivery (from review). Until the next look, no lease is taken over."""
        return (
            self._looked_at is not None
            and boot - self._looked_at < self.every_seconds * heartbeat.MISSED_BEATS
        )

    def beating(self, boot: float) -> frozenset[str]:
        """Workers whose heartbeat row this worker saw change within `MISSED_BEATS` of their
        periods, as of its last look (`still`), or has watched for less than that: alive as
        far as it can tell. A lease of theirs that ran out by some clock is not theirs to
        lose (from review: a forward step of a host's clock, or another host's clock ahead
        of the owner's, took over a delivery its owner was posting)."""
        return frozenset(
            owner
            for owner, sighting in self._sightings.items()
            if owner is not None
            and sighting.seen_at is not None
            and boot - sighting.since < sighting.period * heartbeat.MISSED_BEATS
        )


def reclaim_orphaned(
    session: Session,
    *,
    owner: str,
    now: datetime,
    grace: timedelta,
    watch: HeartbeatWatch,
    boot: float,
) -> int:
    """Cut short the leases held by workers whose heartbeat stood still (`HeartbeatWatch`),
    claimed (or renewed) more than `grace` ago: a worker starting beats at once, but its
    first beat may follow its first claim. The caller's own leases are never cut: it is
    alive. One read of the leases in flight (the index on state) and of the heartbeats (a
    row per worker); an UPDATE only for a worker taken for dead."""
    held = (
        OutboxItem.state == IN_FLIGHT,
        OutboxItem.lease_until > now,
        OutboxItem.updated_at < now - grace,
        or_(OutboxItem.lease_owner.is_(None), OutboxItem.lease_owner != owner),
    )
    owners = set(session.scalars(select(OutboxItem.lease_owner).where(*held).distinct()))
    rows = {
        row.worker_id: (row.seen_at, row.expires_at)
        for row in session.execute(
            select(WorkerHeartbeat.worker_id, WorkerHeartbeat.seen_at, WorkerHeartbeat.expires_at)
        )
    }
    cut = 0
    for dead, seen_at in watch.still(rows, owners, boot).items():
        # Its heartbeat as judged: a beat since (between the read and this write) keeps it.
        beat_since = exists().where(WorkerHeartbeat.worker_id == dead)
        if seen_at is not None:
            beat_since = beat_since.where(WorkerHeartbeat.seen_at != seen_at)
        result = session.execute(
            update(OutboxItem)
            .where(
                *held,
                OutboxItem.lease_owner.is_(None)
                if dead is None
                else OutboxItem.lease_owner == dead,
                ~beat_since,
            )
            .values(lease_until=now)
            .execution_options(synchronize_session=False)
        )
        cut += int(getattr(result, "rowcount", 0) or 0)
    return cut


def due_after_clock_step(session: Session, *, now: datetime) -> int:
    """Make due the waiting rows planned (`updated_at`) further ahead of `now` than any
    backoff waits, except those of suspended peers (which wait a century,
    `outbox.SUSPENDED_FOR`, for a resumption). A row's next attempt is never before its
    planning, so these lie in a range of the index on the next attempt that holds no row
    unless a clock stepped; `updated_at` only filters that range."""
    suspended = exists().where(
        Peer.authority_id == OutboxItem.peer_authority, Peer.suspended_at.is_not(None)
    )
    result = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.next_attempt_at > now + PLANNED_AHEAD_MAX,
            OutboxItem.next_attempt_at < now + SUSPENDED_FOR / 2,
            # Planned by a clock more than any wait ahead of this one: a clock that was
            # ahead. A wait planned by a clock a little ahead of ours (ours behind) is not.
            OutboxItem.updated_at > now + PLANNED_AHEAD_MAX,
            # As the claim writes it: on SQLite, kept off the index on state (every waiting
            # row) for the range of the index on the next attempt (none, as a rule).
            waiting(session),
            ~suspended,
        )
        .values(next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)

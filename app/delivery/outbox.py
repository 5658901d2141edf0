"""Claiming, settling and administering outbox rows.

A claim moves due rows to `in_flight` with a lease held by one worker. On PostgreSQL,
`FOR UPDATE SKIP LOCKED` lets any number of workers claim without blocking each other or
taking the same row; on SQLite, `BEGIN IMMEDIATE` (app.db) makes the claim a single writer's
transaction. A row whose worker died stays `in_flight` until its lease runs out, then any
worker reclaims it. The attempt count is the fencing token: a worker whose lease was taken
over cannot settle the row any more.

States: queued → in_flight → delivered | retry | failed; retry → in_flight; an operator can
move retry/failed back to queued, or queued/retry/failed to cancelled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Exists,
    Table,
    TextClause,
    case,
    event,
    exists,
    func,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import Session, aliased

from app.audit.log import Event, record_many
from app.delivery.retry import delivery_deadline
from app.models import (
    OUTBOX_WAITING,
    CaseFile,
    DeliveryAttempt,
    DeliveryCounter,
    Message,
    OutboxItem,
    Peer,
)
from app.obs.logs import current_request_id

OUTBOX = cast(Table, OutboxItem.__table__)

QUEUED = "queued"
IN_FLIGHT = "in_flight"
RETRY = "retry"
DELIVERED = "delivered"
FAILED = "failed"
CANCELLED = "cancelled"
STATES = (QUEUED, IN_FLIGHT, RETRY, DELIVERED, FAILED, CANCELLED)
PENDING = (QUEUED, IN_FLIGHT, RETRY)
# The largest delivery id: `outbox.id` is an INTEGER column (four bytes on PostgreSQL, which
# refuses a larger value as out of range, where SQLite found no such row; from review).
MAX_ID = 2**31 - 1
BACKLOG = (*PENDING, FAILED)  # what /readyz reports; delivered and cancelled are history
MAX_ERROR_CHARS = 500
# How an attempt whose connection could not be made is recorded (httpx's ConnectError and
# ConnectTimeout): nothing of the envelope left this node.
NOT_SENT = "transport: Connect"
# A claim taken over after its lease ran out: whatever its post did went unrecorded.
LEASE_EXPIRED = "lease_expired"
# Where a suspended peer's deliveries wait: past any deadline, until a resumption.
SUSPENDED_FOR = timedelta(days=36500)
# Set in `session.info` by a claim that wrote audit entries (a lease taken over).
AUDITED = "outbox.audited"


def enqueue(
    session: Session,
    wake: threading.Event,
    *,
    message_id: int,
    size_bytes: int,
    case: CaseFile,
    now: datetime,
    message_expires_at: datetime,
    moved: Mapping[str, object] | None = None,
) -> None:
    """Queue an outbound message for delivery, and wake the worker once it can see the row.
    `moved`: the move the message made to its request (app/requests/moves.py)."""
    # A Core insert, as for the message it follows (app/requests/store.py).
    session.connection().execute(
        OUTBOX.insert(),
        {
            "message_id": message_id,
            "request_id": case.id,
            "peer_authority": case.peer_authority,
            "state": QUEUED,
            "priority": priority_of(case.urgency),
            "size_bytes": size_bytes,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
            "expires_at": delivery_deadline(now, case.urgency, message_expires_at),
            # The local API request that queued it: the worker sends it on as X-Request-Id.
            "trace_id": current_request_id(),
            **(moved or {}),
        },
    )
    wake_after_commit(session, wake)


def priority_of(urgency: str) -> int:
    """Where a delivery stands in the claim's order: emergencies, then urgent, then the rest
    (the migration a3c9e71d5b20 fills rows queued before it with the same rule)."""
    return {"emergency": 0, "urgent": 1}.get(urgency, 2)


def waiting(session: Session) -> TextClause:
    """The rows waiting for their turn, written as the claim's partial index is on this
    database (app.models.OUTBOX_WAITING; another than the two would get the standard form)."""
    dialect = session.get_bind().dialect.name
    return text(OUTBOX_WAITING.get(dialect, OUTBOX_WAITING["postgresql"]))


# Most pressing first, then oldest due first: the order of the claim's index.
CLAIM_ORDER = (OutboxItem.priority, OutboxItem.next_attempt_at, OutboxItem.id)


def wake_after_commit(session: Session, wake: threading.Event) -> None:
    """Wake the in-process worker once what this transaction queued is visible to it."""
    event.listen(session, "after_commit", lambda _session: wake.set(), once=True)


@dataclass(frozen=True)
class Claim:
    outbox_id: int
    message_id: int
    peer_authority: str
    attempts: int
    trace_id: str | None
    claimed_at: datetime


def add_to_counters(session: Session, tally: dict[str, int]) -> None:
    """Add to the running totals. After the audit append, whose head row every settlement
    locks first: the counters' rows are only ever taken in that order, never in a cycle."""
    for name in sorted(tally):
        changed = session.execute(
            update(DeliveryCounter)
            .where(DeliveryCounter.name == name)
            .values(value=DeliveryCounter.value + tally[name])
        )
        if not getattr(changed, "rowcount", 0):  # a total not seen before
            # Another process may insert it at the same moment (a worker's claim holds no
            # lock of the audit log unless it took a lease over): one of the two adds to the
            # other's row.
            session.execute(_upsert(session, name, tally[name]))


def _upsert(session: Session, name: str, value: int) -> Any:
    # Each dialect's insert is imported where it is used (as app/auth/throttle.py does).
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        on_pg = pg_insert(DeliveryCounter).values(name=name, value=value)
        return on_pg.on_conflict_do_update(
            index_elements=[DeliveryCounter.name],
            set_={"value": DeliveryCounter.value + on_pg.excluded.value},
        )
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    on_sqlite = sqlite_insert(DeliveryCounter).values(name=name, value=value)
    return on_sqlite.on_conflict_do_update(
        index_elements=[DeliveryCounter.name],
        set_={"value": DeliveryCounter.value + on_sqlite.excluded.value},
    )


def claim_due(
    session: Session,
    *,
    now: datetime,
    lease: timedelta,
    limit: int,
    owner: str,
    admit: Callable[[int], bool] | None = None,
    max_size: int | None = None,
    skip: Collection[int] = (),
    skip_peers: Collection[str] = (),
    take_over: bool = True,
    alive: Collection[str] = (),
) -> list[Claim]:
    """Claim up to `limit` due rows, most pressing first (emergencies, then urgent, then
    routine; oldest due first within each). `admit`, given each row's envelope size in that
    order, may leave a row out (it stays queued for a later round): the worker's budget of
    what one round holds in memory. `max_size`: only envelopes up to this size (so that
    large ones a round cannot take do not fill its `limit`). `skip`: rows the caller is
    still posting (its lease may have run out during a long post: not posted twice).
    `skip_peers`: peers whose deliveries the caller holds back (their row cannot be read).
    `take_over`: whether rows whose lease ran out by `now` are taken too (not just after a
    step of the caller's clock: its `now` may be what ran the leases out); never those of
    the workers `alive` (their heartbeats beat: a lease of theirs ran out by a clock, theirs
    or the caller's, not because they are gone)."""
    due = [
        # Rows waiting for their turn: an ordered scan of the claim's partial index that
        # stops at `limit`, locking no row past it (another worker claims those at once).
        waiting(session) & (OutboxItem.next_attempt_at <= now),
    ]
    if take_over:
        # Taken over from a worker whose lease ran out: a few rounds' rows at most are in
        # flight, read through the index on state.
        expired = (OutboxItem.state == IN_FLIGHT) & (OutboxItem.lease_until < now)
        if alive:
            expired &= or_(
                OutboxItem.lease_owner.is_(None), OutboxItem.lease_owner.not_in(sorted(alive))
            )
        due.append(expired)
    rows: list[OutboxItem] = []
    for condition in due:
        statement = (
            select(OutboxItem)
            .where(condition)
            .where(OutboxItem.size_bytes <= max_size if max_size is not None else true())
            # Deliveries to a peer whose exchanges are suspended wait, untried, for a
            # resumption.
            .where(
                ~exists().where(
                    Peer.authority_id == OutboxItem.peer_authority,
                    Peer.suspended_at.is_not(None),
                )
            )
            .where(OutboxItem.id.not_in(list(skip)) if skip else true())
            .where(OutboxItem.peer_authority.not_in(sorted(skip_peers)) if skip_peers else true())
            .where(~_earlier_pending())
            .order_by(*CLAIM_ORDER)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows.extend(session.scalars(statement))
    # Most pressing first across both: the order one query over all of them gave.
    rows.sort(key=lambda item: (item.priority, item.next_attempt_at, item.id))
    chosen = [item for item in rows[:limit] if admit is None or admit(item.size_bytes)]
    # The messages' ids for the audit entries of leases taken over (rare): one read.
    taken_over = [item.message_id for item in chosen if item.state == IN_FLIGHT]
    ids: dict[int, tuple[str, str]] = {}
    if taken_over:
        found = session.execute(
            select(Message.id, Message.msg_id, Message.request_id).where(Message.id.in_(taken_over))
        )
        ids = {row.id: (row.msg_id, row.request_id) for row in found}
    claims = []
    unknown: list[Event] = []
    for item in chosen:
        if item.state == IN_FLIGHT:
            # Taken over from a worker whose lease ran out (it died, or its settlement
            # failed): its post may have reached the peer, and nothing recorded it. On record
            # as an attempt whose outcome is unknown, which `peer_may_hold` counts.
            error = "lease expired: the outcome of this attempt is unknown"
            session.add(
                DeliveryAttempt(
                    outbox_id=item.id,
                    attempt=item.attempts,
                    worker=item.lease_owner or "unknown",
                    started_at=item.updated_at or now,
                    finished_at=now,
                    outcome=LEASE_EXPIRED,
                    http_status=None,
                    error=error,
                )
            )
            msg_id, request_id = ids[item.message_id]
            unknown.append(
                _unknown_outcome(msg_id, request_id, item.peer_authority, item.attempts, error)
            )
        item.state = IN_FLIGHT
        item.lease_until = now + lease
        item.lease_owner = owner
        item.attempts += 1
        item.updated_at = now
        claims.append(
            Claim(item.id, item.message_id, item.peer_authority, item.attempts, item.trace_id, now)
        )
    if unknown:
        # The audit head first, then the counters, as every settlement takes them.
        record_many(session, unknown)
        add_to_counters(session, {f"attempts:{LEASE_EXPIRED}": len(unknown)})
        # Entries of the log: their commit waits for the disk like any other's (a claim's
        # alone need not, app/delivery/worker.py), or their positions could be reused.
        session.info[AUDITED] = True
    session.flush()
    return claims


def _earlier_pending() -> Exists:
    """An earlier message of the same request still on its way to the peer (queued, backing
    off or being posted). A conversation's messages are delivered in the order they were
    written, each once the one before it is settled: the peer judges each against the state
    its sender saw. Out of order, a later one (sent from a state the earlier one made, but
    naming a message of the peer's as the one it follows, so not held back there) was
    applied before it, and the earlier one then on top, to a state its sender never had:
    the two nodes disagreed for good (from review)."""
    earlier = aliased(OutboxItem)
    return (
        exists()
        .where(earlier.request_id == OutboxItem.request_id)
        .where(earlier.id < OutboxItem.id)
        .where(earlier.state.in_(PENDING))
    )


def _unknown_outcome(msg_id: str, request_id: str, peer: str, attempt: int, error: str) -> Event:
    """Every attempt is in the audit trail (DESIGN.md 5), one whose outcome is unknown too:
    the only sign, there, that the peer may hold the envelope (from review)."""
    return Event(
        actor="node",
        action="delivery.attempt",
        outcome=LEASE_EXPIRED,
        request_id=request_id,
        msg_id=msg_id,
        peer=peer,
        details={"attempt": attempt, "error": error},
    )


# Answers after which the envelope may have been stored all the same: a server error (the
# peer may have committed before failing) and a gateway's (a proxy in front of the peer gave
# up waiting, or lost the answer). 503 and 408 say the request was not processed, but for
# the database's 503 below.
UNCERTAIN_STATUSES = (500, 502, 504)
# A peer's 503 that its database failed may come after its COMMIT (SQLite committed and the
# sync then failed; PostgreSQL's connection broke during the COMMIT): uncertain as a 500.
UNCERTAIN_503 = "HTTP 503 database_unavailable"


def is_success(status: int) -> bool:
    """A 2xx: whatever its body, the peer took the post (app/delivery/worker.py)."""
    return 200 <= status < 300


def answer_may_hold(status: int | None, error: str | None) -> bool:
    """Whether one attempt's outcome leaves the peer possibly holding the envelope (the rule
    `peer_may_hold` applies to the recorded attempts)."""
    if status is None:
        return not (error or "").startswith(NOT_SENT)
    return (
        is_success(status)
        or status in UNCERTAIN_STATUSES
        or (status == 503 and (error or "").startswith(UNCERTAIN_503))
    )


def peer_may_hold(session: Session, outbox_id: int) -> bool:
    """Whether an attempt so far ended without telling us the peer does not hold the
    envelope: no answer once the envelope was on its way (a transport error after the
    connection was made), a 2xx whose receipt did not check out, a server or gateway error
    (or the peer's database failing, which may come after its commit),
    or a claim taken over when its lease ran out (its outcome unknown, `claim_due`). A
    connection that could not be made sent nothing; a peer that answered every attempt with
    a refusal holds nothing."""
    uncertain = session.scalar(
        select(DeliveryAttempt.id)
        .where(
            DeliveryAttempt.outbox_id == outbox_id,
            or_(
                DeliveryAttempt.http_status.is_(None)
                & ~func.coalesce(DeliveryAttempt.error, "").like(f"{NOT_SENT}%"),
                DeliveryAttempt.http_status.between(200, 299),
                DeliveryAttempt.http_status.in_(UNCERTAIN_STATUSES),
                (DeliveryAttempt.http_status == 503)
                & func.coalesce(DeliveryAttempt.error, "").like(f"{UNCERTAIN_503}%"),
            ),
        )
        .limit(1)
    )
    return uncertain is not None


def renew(session: Session, claim: Claim, *, now: datetime, lease: timedelta) -> bool:
    """Extend the lease just before posting; False if the row was taken over meanwhile.

    A batch's rows are claimed together but posted one after another: renewing each lease
    right before its post keeps a slow batch from letting its later rows be reclaimed (and
    posted twice), and doubles as the fencing check before any network call.
    """
    result = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.id == claim.outbox_id,
            OutboxItem.state == IN_FLIGHT,
            OutboxItem.attempts == claim.attempts,
        )
        .values(lease_until=now + lease, updated_at=now)
    )
    return bool(getattr(result, "rowcount", 0))


def hand_back_unposted(
    session: Session, claims: Collection[Claim], *, owner: str, now: datetime
) -> None:
    """Claims never posted (their peer suspended since): the rows as they were before the
    claim, waiting out of the due range as a suspension leaves its peer's rows (a
    resumption makes them due). No attempt is recorded: none was made. Only rows still ours,
    at this claim's attempt (fencing).

    The peer's row is locked and read again first, as `peers resume` locks it: resumed since
    the caller read it, the rows are due at once (a resumption makes due only the rows that
    wait, not these, still in flight then: they would have waited a century)."""
    suspended = {
        authority: session.scalar(
            select(Peer.suspended_at).where(Peer.authority_id == authority).with_for_update()
        )
        is not None
        for authority in sorted({claim.peer_authority for claim in claims})
    }
    for claim in claims:
        session.execute(
            update(OutboxItem)
            .where(
                OutboxItem.id == claim.outbox_id,
                OutboxItem.state == IN_FLIGHT,
                OutboxItem.lease_owner == owner,
                OutboxItem.attempts == claim.attempts,
            )
            .values(
                state=case((OutboxItem.attempts == 1, QUEUED), else_=RETRY),
                attempts=OutboxItem.attempts - 1,
                lease_until=None,
                lease_owner=None,
                next_attempt_at=now + SUSPENDED_FOR if suspended[claim.peer_authority] else now,
                updated_at=now,
            )
        )


def release_owned(
    session: Session, *, owner: str, now: datetime, unsettled: Collection[int] = ()
) -> int:
    """A stopping worker hands back the rows it claimed: due at once. `unsettled`: rows it
    posted whose outcome it could not record (their settlement failed); the peer may hold
    them, so each gets an attempt of unknown outcome, as a lease taken over does."""
    if unsettled:
        rows = session.execute(
            select(
                OutboxItem.id,
                OutboxItem.attempts,
                OutboxItem.updated_at,
                OutboxItem.peer_authority,
                Message.msg_id,
                Message.request_id,
            )
            .join(Message, Message.id == OutboxItem.message_id)
            .where(
                OutboxItem.id.in_(list(unsettled)),
                OutboxItem.state == IN_FLIGHT,
                OutboxItem.lease_owner == owner,
            )
            # Locked: another worker taking the row over meanwhile records the attempt itself.
            .with_for_update(skip_locked=True, of=OutboxItem)
        ).all()
        error = "released unsettled: the outcome of this attempt is unknown"
        for row in rows:
            session.add(
                DeliveryAttempt(
                    outbox_id=row.id,
                    attempt=row.attempts,
                    worker=owner,
                    started_at=row.updated_at or now,
                    finished_at=now,
                    outcome=LEASE_EXPIRED,
                    http_status=None,
                    error=error,
                )
            )
        if rows:
            record_many(
                session,
                [
                    _unknown_outcome(
                        row.msg_id, row.request_id, row.peer_authority, row.attempts, error
                    )
                    for row in rows
                ],
            )
            add_to_counters(session, {f"attempts:{LEASE_EXPIRED}": len(rows)})
        session.flush()
    result = session.execute(
        update(OutboxItem)
        .where(OutboxItem.state == IN_FLIGHT, OutboxItem.lease_owner == owner)
        .values(
            state=RETRY, lease_until=None, lease_owner=None, next_attempt_at=now, updated_at=now
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def truncate_error(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


@dataclass(frozen=True)
class QueueStats:
    by_state: dict[str, int]
    oldest_pending_at: datetime | None


def queue_stats(session: Session) -> QueueStats:
    """The backlog by state and its oldest row: for /readyz, metrics and operators.

    Only the states still in play (and failed, which needs a person): delivered and cancelled
    rows are history, and counting them made every readiness probe grow with it (3 s with a
    million delivered rows). The state index finds the backlog rows without reading history.
    """
    counts = dict.fromkeys(BACKLOG, 0)
    for state, count in session.execute(
        select(OutboxItem.state, func.count())
        .where(OutboxItem.state.in_(BACKLOG))
        .group_by(OutboxItem.state)
    ):
        counts[state] = int(count)
    # The pending rows' ids from the state index, then their rows by key: with ANALYZE's
    # statistics (an average per state, most of them delivered) SQLite would otherwise read
    # the whole table for a plain `WHERE state IN (...)` here.
    pending = select(OutboxItem.id).where(OutboxItem.state.in_(PENDING))
    oldest = session.scalar(
        select(func.min(OutboxItem.created_at)).where(OutboxItem.id.in_(pending.scalar_subquery()))
    )
    return QueueStats(counts, oldest)

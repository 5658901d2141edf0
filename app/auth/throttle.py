"""Refusal throttling: failed authentications and refused envelopes, per address and client.

Counters live in the database (`auth_throttle`), so every process of a node (API replicas,
workers) shares them. Each key (`address:<ip>`, `client:<id>`, `p2p:<ip>`; an IPv6 address
by its /64, `address_unit`) counts refusals
in a fixed window; the refusal that reaches the limit blocks the key for a while, and the
caller is answered 429 with `Retry-After` until then.

What this bounds: the audit log. Each refusal is audited until the key is blocked; while it
is blocked, refusals are only counted (`suppressed`), and the count is reported in the next
`auth.throttled` entry. So one address writes at most `limit + 1` entries per window, however
fast it sends, and one more when the block's counters are pruned (`prune_idle`) if it went
on sending while blocked. (Requests without any credentials are refused without writing at
all.)

What bounds the table: every source address (an IPv6 /64) that was ever refused has a row, so
without pruning, refusals from many addresses grow it for good. A row whose window and block
are both over holds nothing the next refusal would not reset; `prune_idle` deletes those, from
the node's hourly housekeeping (`ThrottlePrune`).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.log import record
from app.config import Settings
from app.crypto.encoding import utc_now
from app.db import PeriodicJob
from app.errors import EntraideError
from app.models import AuthThrottle

log = logging.getLogger(__name__)
PRUNE_EVERY_SECONDS = 3600.0


def address_unit(address: str) -> str:
    """What is throttled for a caller's address: an IPv6 host is given a /64 to itself and can
    send from any address in it, so the /64 is one key (else each new address had its own
    `limit` audited refusals); an IPv4 address (IPv4-mapped too) by itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # "unknown", or a Unix socket's name
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class TooManyRequests(EntraideError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many refused attempts; retry after {retry_after} seconds")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Limits:
    limit: int
    window: timedelta
    block: timedelta


@dataclass(frozen=True)
class Verdict:
    audit: bool  # audit this refusal individually
    retry_after: int | None  # set when the caller is (now) blocked


def auth_limits(settings: Settings) -> Limits:
    """The limits on refused tokens (`p2p:` keys have their own count, the same timings)."""
    return Limits(
        limit=settings.auth_failure_limit,
        window=timedelta(seconds=settings.auth_failure_window_seconds),
        block=timedelta(seconds=settings.auth_block_seconds),
    )


def _seconds(delta: timedelta) -> int:
    return max(1, math.ceil(delta.total_seconds()))


def counter_row(session: Session, key: str, now: datetime) -> AuthThrottle:
    """The key's row, locked; created if missing without racing another process (nor the
    hourly pruning, which may delete it between our insert and our lock: then again)."""
    for _ in range(3):
        row = _insert_and_lock(session, key, now)
        if row is not None:
            return row
    raise RuntimeError(f"throttle row {key!r} keeps vanishing")


def _insert_and_lock(session: Session, key: str, now: datetime) -> AuthThrottle | None:
    values = {"key": key, "window_start": now, "failures": 0, "suppressed": 0}
    dialect = session.get_bind().dialect.name
    # Each dialect's insert is imported where it is used: the PostgreSQL dialect alone costs
    # a SQLite node about 2 MiB of memory.
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(AuthThrottle).values(values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(sqlite_insert(AuthThrottle).values(values).on_conflict_do_nothing())
    elif session.get(AuthThrottle, key) is None:
        session.add(AuthThrottle(**values))
        session.flush()
    # None if it was pruned after our insert found it there (`prune_idle`, PostgreSQL).
    return session.get(AuthThrottle, key, with_for_update=True, populate_existing=True)


def blocked_for(session: Session, keys: Sequence[str], now: datetime | None = None) -> int | None:
    """Seconds until the first blocked key frees up, counting this attempt; None if none is."""
    now = now or utc_now()
    for key in keys:
        row = session.get(AuthThrottle, key)
        if row is not None and row.blocked_until is not None and now < row.blocked_until:
            session.execute(
                update(AuthThrottle)
                .where(AuthThrottle.key == key)
                .values(suppressed=AuthThrottle.suppressed + 1)
            )
            return _seconds(row.blocked_until - now)
    return None


def is_blocked(session: Session, key: str, now: datetime | None = None) -> bool:
    """Whether `key` is blocked now; reads only (`blocked_for` also counts the attempt)."""
    row = session.get(AuthThrottle, key)
    return (
        row is not None and row.blocked_until is not None and (now or utc_now()) < row.blocked_until
    )


def register_refusal(
    session: Session,
    keys: Sequence[str],
    limits: Limits,
    *,
    actor: str,
    now: datetime | None = None,
) -> Verdict:
    """Count one refusal against every key; audit the block when a key reaches its limit."""
    now = now or utc_now()
    audit = True
    retry_after: int | None = None
    for key in keys:
        row = counter_row(session, key, now)
        if row.blocked_until is not None and now < row.blocked_until:
            row.suppressed += 1
            audit = False
            retry_after = max(retry_after or 0, _seconds(row.blocked_until - now))
            continue
        if row.blocked_until is not None or now - row.window_start >= limits.window:
            row.window_start, row.failures, row.blocked_until = now, 0, None
        row.failures += 1
        if row.failures >= limits.limit:
            row.blocked_until = now + limits.block
            record(
                session,
                actor=actor,
                action="auth.throttled",
                outcome="blocked",
                details={
                    "key": key.split(":", 1)[0],
                    "refusals": row.failures,
                    "suppressed_before": row.suppressed,
                    "blocked_seconds": _seconds(limits.block),
                },
            )
            row.suppressed = 0
    return Verdict(audit=audit, retry_after=retry_after)


PRUNE_BATCH = 500
REFUSAL_KEYS = ("address:", "client:", "p2p:", "forbidden:", "refused:", "repeat:", "hidden:")


def prune_idle(session: Session, limits: Limits, now: datetime | None = None) -> int:
    """Deletes the counters whose window and block are over; returns how many went.

    Such a row is reset by the next refusal anyway (`register_refusal`); only its `suppressed`
    count would be lost, so a row that still holds one is audited as it goes (the refusals
    made while it was blocked, which no `auth.throttled` entry reported)."""
    now = now or utc_now()
    # Only the refusal counters: the table also holds other processes' timers
    # (`peer-refresh:`, `witness-unproven:`), whose windows are not these.
    refusals = or_(*(AuthThrottle.key.startswith(prefix) for prefix in REFUSAL_KEYS))
    idle = (
        refusals
        & (AuthThrottle.window_start <= now - limits.window)
        & or_(AuthThrottle.blocked_until.is_(None), AuthThrottle.blocked_until <= now)
    )
    removed = 0
    while True:
        rows = session.execute(
            select(AuthThrottle.key, AuthThrottle.suppressed)
            .where(idle)
            .order_by(AuthThrottle.key)
            .limit(PRUNE_BATCH)
            .with_for_update()  # PostgreSQL: a refusal of another process waits for this
        ).all()
        if not rows:
            return removed
        for key, suppressed in rows:
            if suppressed:
                record(
                    session,
                    actor="node",
                    action="auth.throttle_ended",
                    outcome="pruned",
                    details={"key": key, "suppressed_before": suppressed},
                )
        keys = [key for key, _ in rows]
        result = session.execute(
            delete(AuthThrottle)
            .where(AuthThrottle.key.in_(keys), idle)
            .execution_options(synchronize_session=False)
        )
        deleted = int(getattr(result, "rowcount", 0) or 0)
        removed += deleted
        if len(rows) < PRUNE_BATCH or deleted == 0:
            return removed


class ThrottlePrune(PeriodicJob):
    """`prune_idle` for a node's background loop, at most once per period (the first at once);
    several processes may prune at the same time."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        every_seconds: float = PRUNE_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        limits = auth_limits(settings)
        super().__init__(
            sessions,
            lambda session: _pruned(session, limits),
            every_seconds=every_seconds,
            clock=clock,
        )


def _pruned(session: Session, limits: Limits) -> int:
    removed = prune_idle(session, limits)
    if removed:
        log.info("removed %d idle refusal counters", removed)
    return removed

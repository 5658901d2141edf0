"""Refusal throttling: failed authentications and refused envelopes, per address and client.

Counters live in the database (`auth_throttle`), so every process of a node (API replicas,
workers) shares them. Each key (`address:<ip>`, `client:<id>`, `p2p:<ip>`; an IPv6 address
by its /64, `address_unit`) counts refusals
in a fixed window; the refusal that reaches the limit blocks the key for a while, and the
caller is answered 429 with `Retry-After` until then.

What this bounds: the audit log. Each refusal is audited until the key is blocked; while it
is blocked, refusals are only counted (`suppressed`), and the count is reported in the next
`auth.throttled` entry. So one address writes at most `limit + 1` entries per window, however
fast it sends. (Requests without any credentials are refused without writing at all.)
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.audit.log import record
from app.crypto.encoding import utc_now
from app.errors import EntraideError
from app.models import AuthThrottle


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


def _seconds(delta: timedelta) -> int:
    return max(1, math.ceil(delta.total_seconds()))


def counter_row(session: Session, key: str, now: datetime) -> AuthThrottle:
    """The key's row, locked; created if missing without racing another process."""
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
    row = session.get(AuthThrottle, key, with_for_update=True, populate_existing=True)
    if row is None:  # inserted just above, or already there
        raise RuntimeError(f"throttle row {key!r} vanished")
    return row


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

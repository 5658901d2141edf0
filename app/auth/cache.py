"""Tokens that authenticated a moment ago, so a burst of calls costs one database check.

Every call of the local API used to open and commit a transaction of its own for the token
and throttle check before its route's own; on SQLite every transaction takes the write lock.
A token that authenticated from an address is trusted again from that address for at most
`TOKEN_CACHE_SECONDS`, and never past the token's own expiry.

What that costs: revoking a client in another process (`entraide clients revoke`) takes up to
`TOKEN_CACHE_SECONDS` to reach this one. Any refused token in this process empties the cache,
so an address this process blocks is checked against the database again at once. Only
successes are kept, keyed by the token's SHA-256 and the address, never the token itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from app.auth.service import Principal

TOKEN_CACHE_SECONDS = 1.0
MAX_ENTRIES = 4096


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    until: datetime


class TokenCache:
    def __init__(
        self, seconds: float = TOKEN_CACHE_SECONDS, max_entries: int = MAX_ENTRIES
    ) -> None:
        self.ttl = timedelta(seconds=seconds)
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, address: str, now: datetime) -> Principal | None:
        key = (digest, address)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if now >= entry.until:
                del self._entries[key]
                return None
            return entry.principal

    def put(
        self,
        digest: str,
        address: str,
        principal: Principal,
        now: datetime,
        *,
        expires_at: datetime | None,
    ) -> None:
        until = now + self.ttl
        if expires_at is not None:
            until = min(until, expires_at)
        if until <= now:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                # Stale entries first; a cache full of live ones starts again, which only
                # costs each caller one database check.
                self._entries = {k: e for k, e in self._entries.items() if e.until > now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[(digest, address)] = _Entry(principal, until)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

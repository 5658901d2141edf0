"""When this process last found its storage full: held by the node (app/node.py), so the HTTP
handlers and the delivery worker alike note it, and /readyz reads it."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from app.crypto.encoding import format_time, utc_now

OK = "ok"
DATABASE = "database"
EVIDENCE = "evidence storage"


class StorageFull:
    """When this process last found its database or evidence storage full (a write answered
    507, or a worker's round failed on it), for each of the two: /readyz fails it for a
    minute after each, since nothing can be stored there until the operator makes room, and
    a read-only `SELECT 1` says nothing of it (from review: every write answered 503 while
    /readyz said ready; then, a full database met by the worker alone left /readyz
    `storage: ok`)."""

    WINDOW_SECONDS = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, datetime, str | None]] = {}

    def note(self, what: str, why: str | None = None) -> None:
        """`what` (the database, evidence storage) was full, or, with `why`, took no write
        for that reason (read-only, say: app/db.py `database_unwritable`)."""
        with self._lock:
            self._last[what] = (time.monotonic(), utc_now(), why)

    def _recent(self, what: str) -> tuple[float, datetime, str | None] | None:
        with self._lock:
            last = self._last.get(what)
        if last is None or time.monotonic() - last[0] > self.WINDOW_SECONDS:
            return None
        return last

    def failing(self, what: str) -> bool:
        """Whether `what` refused a write within the last minute (for /metrics)."""
        return self._recent(what) is not None

    def check(self, what: str) -> str:
        last = self._recent(what)
        if last is None:
            return OK
        _, at, why = last
        if why is not None:
            return (
                f"failing: the {what} {why}, at {format_time(at)} (within the last minute): "
                "writes were refused (503); this clears a minute after the last refusal"
            )
        # Past tense: room may have been made since; this says only when it was last full.
        return (
            f"failing: the {what} was full at {format_time(at)} (within the last "
            "minute): writes were refused (507 insufficient_storage); once room is made, "
            "this clears a minute after the last refusal"
        )

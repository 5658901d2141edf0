"""The attachment uploads (PATCHes) this process has begun to answer, from their first byte.

A client whose link broke asks HEAD where to resume at once. `HEAD` waits for a PATCH of the
same attachment that holds its staging file (`DirectoryBlobStore.being_written`); but a PATCH
that has arrived and not yet taken that file (its token still being checked, its draft read:
tens of milliseconds on a busy node) did not count, and HEAD answered the offset from before
it. The client then sent again every byte that PATCH was about to keep, and its new PATCH met
the old one's `409 upload_busy` (a test that failed on a loaded machine). Counted here from
the moment the app is handed the request, so that HEAD waits for those too.

Within one process, as `being_written` is not: another replica behind the same address
answers HEAD as before.
"""

from __future__ import annotations

import re
import threading
from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from app.evidence.drafts import upload_id

# The PATCH route of app/evidence/router.py; an index out of its range names no upload, and
# leading zeros are left to the route to refuse.
_UPLOAD_PATH = re.compile(r"/api/v1/evidence/drafts/([0-9a-f]{32})/attachments/([1-9][0-9]?)")


class Arrivals:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._under_way: Counter[str] = Counter()

    def begin(self, upload: str) -> None:
        with self._lock:
            self._under_way[upload] += 1

    def end(self, upload: str) -> None:
        with self._lock:
            self._under_way[upload] -= 1
            if self._under_way[upload] <= 0:
                del self._under_way[upload]

    def under_way(self, upload: str) -> bool:
        with self._lock:
            return upload in self._under_way


ARRIVALS = Arrivals()


def _upload_of(scope: Scope) -> str | None:
    if scope["type"] != "http" or scope.get("method") != "PATCH":
        return None
    found = _UPLOAD_PATH.fullmatch(scope.get("path", ""))
    return upload_id(found[1], int(found[2])) if found else None


class CountArrivals:
    """Middleware: an upload's PATCH is under way from the moment it reaches the app to the
    moment it is answered (or its client gone)."""

    def __init__(self, app: ASGIApp, arrivals: Arrivals = ARRIVALS) -> None:
        self.app = app
        self.arrivals = arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = _upload_of(scope)
        if upload is None:
            await self.app(scope, receive, send)
            return
        self.arrivals.begin(upload)
        try:
            await self.app(scope, receive, send)
        finally:
            self.arrivals.end(upload)

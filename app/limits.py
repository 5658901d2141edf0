"""Request-header, body and JSON limits, checked before anything else reads the request.

Bodies are read by `read_body` for `LimitsAndHeaders` (app.main), within a size and within
deadlines; `HeaderLimit` bounds what comes before the body: the request line's target and
all header fields together. Answers 413 with the usual error body, like an oversized body
(HTTP also has 431 for this; one status for "too large" keeps clients simple, and the
`error` code says which part).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.errors import ERROR_HEADER, PayloadTooLarge

# Methods whose local API calls carry a body: refused before it is read without a token.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The paths whose routes take a body (of BODY_METHODS): the only bodies `LimitsAndHeaders`
# (app.main) reads. Any other request goes to the app unread; its route answers 404 or 405,
# or has no use for a body.
BODY_PATHS = ("/api/v1/", "/p2p/")
# Evidence bodies (app/evidence) are streamed to their route, never buffered: each such
# route enforces its own bound, the attachment's declared size or the part's signed length.
STREAMED_BODIES = (
    ("PATCH", "/api/v1/evidence/drafts/"),
    ("PUT", "/p2p/v1/evidence/envelopes/"),
)


def streamed_body(method: str, path: str) -> bool:
    """Whether this request's body is bytes streamed to its route (evidence)."""
    return any(method == verb and path.startswith(prefix) for verb, prefix in STREAMED_BODIES)


def buffered_body(method: str, path: str) -> bool:
    """Whether `LimitsAndHeaders` reads this request's body whole before its route runs
    (and may answer 408 body_timeout, 413 too_large or 503 busy for it)."""
    reads = method in BODY_METHODS and path.startswith(BODY_PATHS)
    return reads and not streamed_body(method, path)


class HeaderLimit:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        headers: Sequence[tuple[bytes, bytes]] = (),
        on_refused: Callable[[Scope, str], Awaitable[None]] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.headers = list(headers)
        self.on_refused = on_refused  # puts the refusal on record (app.main)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
            if size > self.max_bytes:
                detail = f"request target and headers larger than {self.max_bytes} bytes"
                if self.on_refused is not None:
                    await self.on_refused(scope, detail)
                response = JSONResponse(
                    {"error": "headers_too_large", "detail": detail},
                    status_code=413,
                    headers={"connection": "close"},
                )
                raw = [*response.raw_headers, *self.headers]
                if scope.get("method") == "HEAD":  # no body to say it (api.md)
                    raw.append((ERROR_HEADER.encode(), b"headers_too_large"))
                await send({"type": "http.response.start", "status": 413, "headers": raw})
                await send({"type": "http.response.body", "body": response.body})
                return
        await self.app(scope, receive, send)


# The slowest a body read whole may arrive, on average, once the idle period (twice the peer
# timeout) has passed: 256 kbit/s, a poor satellite or mobile link. A 32 MiB body has 60 s
# plus 1,024 s by default. A byte every few seconds never leaves a body idle, yet held its
# connection, and what it had sent, for as long as its sender liked (from review).
MIN_BODY_BYTES_PER_SECOND = 32 * 1024


class BodyTooLarge(Exception):
    """The body is over the limit; what was read of it is dropped."""


class NoRoomForBody(Exception):
    """The bodies held in memory already fill the node's budget, or their source's share of
    it; what was read of this one is dropped."""


class BodyBudget:
    """The bytes of request bodies this process holds in memory, in all and per source.

    The deadlines of `read_body` bound how long a body may take, not how many are held at
    once: a client that sent almost a whole body at once and then a byte per idle period held
    it for about 18 minutes, and as many connections as it liked held as many bodies (from
    review). A legitimate body over a slow link takes about as long, so the memory is what is
    bounded. Everything here runs on the event loop: plain counters suffice."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.held = 0
        self._by_source: dict[str, int] = {}

    def take(self, source: str, size: int) -> bool:
        """Reserve `size` more bytes for a body from `source`, if both bounds allow it."""
        mine = self._by_source.get(source, 0)
        if self.held + size > self.total or mine + size > self.per_source:
            return False
        self.held += size
        self._by_source[source] = mine + size
        return True

    def largest(self) -> tuple[str, int] | None:
        """The source holding the most, and how much: who fills the budget (a refused
        caller is more often its victim)."""
        if not self._by_source:
            return None
        return max(self._by_source.items(), key=lambda item: item[1])

    def give_back(self, source: str, size: int) -> None:
        self.held -= size
        left = self._by_source.get(source, 0) - size
        if left > 0:
            self._by_source[source] = left
        else:
            self._by_source.pop(source, None)  # the table holds only sources holding bytes


class Reservation:
    """What one request's body holds of a `BodyBudget`, given back at once by `release`
    (which the caller runs in a `finally`, once the request has been handled)."""

    def __init__(self, budget: BodyBudget, source: str) -> None:
        self.budget = budget
        self.source = source
        self.size = 0

    def take(self, size: int) -> bool:
        if not self.budget.take(self.source, size):
            return False
        self.size += size
        return True

    def release(self) -> None:
        self.budget.give_back(self.source, self.size)
        self.size = 0


class BodyTimedOut(Exception):
    """The body stalled, or fell behind the slowest rate; `detail` says which."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


async def read_body(
    receive: Receive,
    *,
    max_bytes: int,
    idle_seconds: float,
    reservation: Reservation | None = None,
) -> bytes:
    """The whole body, at most `max_bytes`, read within two deadlines: it may send nothing
    for at most `idle_seconds` (as a streamed body, app/evidence/pump.py), and must arrive
    at MIN_BODY_BYTES_PER_SECOND on average, counted after the first `idle_seconds`. Each
    chunk is reserved in `reservation` before it is kept; the caller releases it.

    Raises BodyTooLarge, BodyTimedOut, NoRoomForBody (the reservation failed), or
    ClientDisconnect when the client leaves first. The
    server gives a body no deadline of its own: without these, a silent or trickling one was
    held, unanswered, for as long as its connection stayed open (from review)."""
    started = last = time.monotonic()
    chunks: list[bytes] = []
    size = 0
    while True:
        idle_due = last + idle_seconds
        rate_due = started + idle_seconds + size / MIN_BODY_BYTES_PER_SECOND
        message: MutableMapping[str, Any] | None = None
        with anyio.move_on_after(max(0.0, min(idle_due, rate_due) - time.monotonic())):
            message = await receive()
        if message is None:
            if idle_due <= rate_due:
                raise BodyTimedOut(f"the body sent nothing for {idle_seconds:g} s")
            raise BodyTimedOut(
                f"the body arrived slower than {MIN_BODY_BYTES_PER_SECOND} bytes per second"
            )
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        if chunk:
            last = time.monotonic()
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge()
            if reservation is not None and not reservation.take(len(chunk)):
                raise NoRoomForBody()
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def refuse_over_wire_limit(settings: Settings, sealed: int, parts: int) -> None:
    """The peer applies the same body limit to an envelope (or a streamed one's announcement:
    its header and part 0) as we do to submissions; refuse now what it would refuse later,
    rather than accept a request that can never arrive. `sealed`: the bytes sent in base64."""
    wire_size = 4 * -(-sealed // 3) + 4 * parts + 1024
    if wire_size > settings.max_body_bytes:
        raise PayloadTooLarge(
            f"sealed, this would be about {wire_size} bytes, over the "
            f"{settings.max_body_bytes}-byte limit between nodes"
        )

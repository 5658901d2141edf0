"""Request-header and JSON limits, checked before anything else reads the request.

Bodies are bounded by `LimitsAndHeaders` (app.main); `HeaderLimit` bounds what comes before
the body: the request line's target and all header fields together. Answers 413 with the usual error
body, like an oversized body (HTTP also has 431 for this; one status for "too large" keeps
clients simple, and the `error` code says which part).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.errors import PayloadTooLarge


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
                await send({"type": "http.response.start", "status": 413, "headers": raw})
                await send({"type": "http.response.body", "body": response.body})
                return
        await self.app(scope, receive, send)


# The values a JSON body may hold. The largest valid document (app/domain, every list at its
# maximum) holds about 100,000; an envelope or a batch of 64 a few hundred. Parsing is what
# costs: 32 MiB of `[{},{},...]` is 11 million dicts, about 770 MiB, built before any check
# or authentication runs (FastAPI parses a body before it resolves the route's token).
MAX_JSON_VALUES = 250_000
# A string (escapes included), or a byte that starts a value inside a container. A string
# left open runs to the end of the body (and a lone backslash may end it): the pattern then
# matches at every quote it starts at, and the scan stays linear. A string that could fail to
# match was tried again from each later quote, to the end each time: a body of escaped quotes
# with no closing one took minutes, holding the interpreter (from review).
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)|[,:\[{]', re.DOTALL)
_JSON_START = re.compile(rb"[ \t\r\n]*[\[{]")


def json_values_exceed(raw: bytes, limit: int = MAX_JSON_VALUES) -> bool:
    """Whether `raw`, read as JSON, would hold more than `limit` values: every value after
    the first follows a comma, a colon or an opening bracket outside strings. Those bytes
    counted anywhere bound the count from above, so most bodies are cleared by four
    `bytes.count` calls; otherwise strings are skipped whole and the scan stops at `limit`."""
    if not _JSON_START.match(raw):
        return False  # a scalar, or not JSON: nothing to build
    if sum(raw.count(byte) for byte in (b",", b":", b"[", b"{")) <= limit:
        return False
    count = 0
    for token in _JSON_TOKEN.finditer(raw):
        if token.end() - token.start() == 1:  # a string is at least two bytes
            count += 1
            if count > limit:
                return True
    return False


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

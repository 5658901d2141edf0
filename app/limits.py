"""Request-header limits, checked before anything else reads the request.

Bodies are bounded by `LimitsAndHeaders` (app.main); this bounds what comes before the body:
the request line's target and all header fields together. Answers 413 with the usual error
body, like an oversized body (HTTP also has 431 for this; one status for "too large" keeps
clients simple, and the `error` code says which part).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class HeaderLimit:
    def __init__(
        self, app: ASGIApp, max_bytes: int, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.headers = list(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
            if size > self.max_bytes:
                response = JSONResponse(
                    {
                        "error": "headers_too_large",
                        "detail": f"request target and headers larger than {self.max_bytes} bytes",
                    },
                    status_code=413,
                    headers={"connection": "close"},
                )
                raw = [*response.raw_headers, *self.headers]
                await send({"type": "http.response.start", "status": 413, "headers": raw})
                await send({"type": "http.response.body", "body": response.body})
                return
        await self.app(scope, receive, send)

"""Request id in and out, per-route metrics and the access log, for every HTTP request."""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.obs.labels import method_of, template_of
from app.obs.logs import REQUEST_ID_HEADER, accept_request_id, request_context
from app.obs.metrics import Metrics

log = logging.getLogger("entraide.access")

_HEADER = REQUEST_ID_HEADER.encode()


def _caller_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == _HEADER:
            try:
                return bytes(value).decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


class Observability:
    """Outermost middleware: sees every response, including 413s and 500s."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accept_request_id(_caller_request_id(scope))
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # if the app dies before answering, the server answers 500
        started = time.perf_counter()

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != _HEADER
                ]
                message["headers"] = [*headers, (_HEADER, request_id.encode())]
            await send(message)

        with request_context(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                template = template_of(scope)
                method = method_of(scope)
                self.metrics.observe_request(method, template, status, elapsed)
                client = scope.get("client")
                log.info(
                    "%s %s %d",
                    method,
                    template,
                    status,
                    extra={
                        "method": method,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 1),
                        "client": client[0] if client else None,
                    },
                )

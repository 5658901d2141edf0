"""The application factory: routers, error handling, limits and the node's lifespan."""

from __future__ import annotations

import logging
import math
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import DataError, DBAPIError, InternalError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.audit.log import record_alone
from app.audit.router import p2p_router as audit_p2p_router
from app.audit.router import router as audit_router
from app.auth.refusals import record_refusal
from app.auth.throttle import TooManyRequests, address_unit
from app.config import Settings, body_idle_seconds, buffered_body_budget, get_settings
from app.db import (
    DurabilityLost,
    Unreadable,
    UnreadableValue,
    database_full,
    database_unwritable,
    driver_error_name,
    unreadable,
)
from app.delivery.router import router as deliveries_router
from app.delivery.worker import Worker
from app.deps import DUPLICATE_KEY, P2P_UNBLOCKED, p2p_blocked_for, refuse_p2p_call
from app.errors import (
    ERROR_HEADER,
    EntraideError,
    EnvelopeRefused,
    StoredDataCorrupt,
    StoredEnvelopeCorrupt,
)
from app.evidence import drafts
from app.evidence.arrivals import CountArrivals
from app.evidence.blobstore import StorageFailed
from app.evidence.node_store import blob_store
from app.evidence.p2p_router import close_kept_receivers
from app.evidence.p2p_router import router as evidence_p2p_router
from app.evidence.router import replies as evidence_replies_router
from app.evidence.router import router as evidence_router
from app.jsonvalues import MAX_JSON_VALUES, json_values_exceed
from app.limits import (
    BODY_METHODS,
    BodyBudget,
    BodyTimedOut,
    BodyTooLarge,
    HeaderLimit,
    NoRoomForBody,
    Reservation,
    buffered_body,
    read_body,
)
from app.node import Node, load_node
from app.obs.health import expected_heads
from app.obs.labels import ROUTE_TABLE, route_table
from app.obs.metrics import Metrics
from app.obs.middleware import Observability
from app.obs.router import router as metrics_router
from app.obs.storage import DATABASE, EVIDENCE, StorageFull
from app.openapi import install_openapi
from app.p2p.router import router as p2p_router
from app.peers.router import router as peers_router
from app.public import openapi_router, readiness_router
from app.public import router as public_router
from app.recovery.router import router as recovery_router
from app.requests.admin_router import router as request_admin_router
from app.requests.router import router as requests_router

log = logging.getLogger(__name__)

P2P_API = "/p2p/"

# Every route of the application, by router: tests walk these to check each declares a policy.
ROUTERS = (
    public_router,
    readiness_router,
    openapi_router,
    requests_router,
    request_admin_router,
    peers_router,
    deliveries_router,
    audit_router,
    p2p_router,
    audit_p2p_router,
    metrics_router,
    evidence_router,
    evidence_replies_router,
    evidence_p2p_router,
    recovery_router,
)

# The status of a request whose client left before its end (nginx's): no answer is read.
CLIENT_GONE = 499

# Below this a body holds too few JSON values to cost anything to parse (app/limits.py).
JSON_CHECK_BYTES = 64 * 1024

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]


async def _refuse(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    response = JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class LimitsAndHeaders:
    """Refuse oversized bodies before any parsing (413), bodies whose JSON would hold too many
    values too (app/limits.py), bodies that stall or trickle (408), and add security headers.

    The body is read here, up to the limit, within its deadlines (`read_body`) and within
    the memory budget (`BodyBudget`, 503 `busy` beyond it), and replayed to the app: the app
    never sees a body over the limit, however it is sent (Content-Length or chunked). Only
    bodies of BODY_METHODS on BODY_PATHS are read (`buffered_body`, app/limits.py); streamed
    bodies (STREAMED_BODIES) are their routes' own.
    """

    def __init__(self, app: ASGIApp, settings: Settings, budget: BodyBudget) -> None:
        self.app = app
        self.settings = settings
        self.max_body_bytes = settings.max_body_bytes
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = dict(scope.get("headers", []))
        body_ended = b"transfer-encoding" not in headers and headers.get(
            b"content-length", b"0"
        ) in (b"0", b"")

        async def receive_tracked() -> MutableMapping[str, Any]:
            nonlocal body_ended
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_ended = True
            return message

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if not body_ended and not any(
                    name.lower() == b"connection" for name, _ in message.get("headers", [])
                ):
                    # Answered before the end of its body (a refusal here, a route that
                    # did not read it): the connection is closed. Else the server (h11 or
                    # httptools) reads the rest of the body to reuse the connection, and a
                    # byte of it cancels the keep-alive timer, which nothing re-arms: the
                    # connection stayed open for as long as its client liked (from review).
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        if b"%00" in bytes(scope.get("query_string", b"")):
            # Never meaningful, and PostgreSQL cannot compare text holding it: refused the
            # same on both backends, before anything reads the query; on record, as every
            # refusal of a token holder is (app/auth/refusals.py).
            await record_refusal(scope, scope["app"].state.node, 400, "invalid_request")
            await _record_p2p_refusal(scope, "invalid_request", "a query parameter holds a NUL")
            await _refuse(
                send_with_headers,
                400,
                "invalid_request",
                "a query parameter holds a NUL",
                # An answer to HEAD has no body: its code goes in a header (api.md).
                headers={ERROR_HEADER: "invalid_request"} if scope.get("method") == "HEAD" else {},
            )
            return
        if (
            scope.get("method") in BODY_METHODS
            and str(scope.get("path", "")).startswith("/api/v1/")
            and b"authorization" not in headers
        ):
            # No token, no work: the body is neither read nor parsed (a 422 for its JSON
            # would come before the 401 the route gives), and nothing is written.
            await _refuse(
                send_with_headers,
                401,
                "missing_token",
                "a bearer token is required",
                headers={"www-authenticate": 'Bearer realm="entraide"'},
            )
            return
        if not buffered_body(str(scope.get("method")), str(scope.get("path", ""))):
            await self.app(scope, receive_tracked, send_with_headers)
            return
        if _p2p_body(scope):
            # A throttled address gets its 429 before its body is read or scanned, not after
            # up to 32 MiB of it (from review); the route's dependency then need not look.
            node = scope["app"].state.node
            try:
                retry_after = await run_in_threadpool(p2p_blocked_for, node, _source(scope))
            except (OperationalError, DurabilityLost) as exc:
                # Out here the app's handlers do not answer: as they would, not a 500.
                log.error("database unavailable: %s", type(exc).__name__)
                await _refuse(
                    send_with_headers,
                    503,
                    "database_unavailable",
                    "the database is unavailable; retry later",
                )
                return
            if retry_after is not None:
                blocked = TooManyRequests(retry_after)
                await _refuse(
                    send_with_headers,
                    429,
                    blocked.code,
                    blocked.detail,
                    headers={"retry-after": str(retry_after)},
                )
                return
            scope[P2P_UNBLOCKED] = True
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(scope, send_with_headers)
            return
        reservation = Reservation(self.budget, address_unit(_source(scope)))
        try:
            await self._read_and_replay(scope, receive_tracked, send_with_headers, reservation)
        finally:
            # Whatever ended the request (its answer, a refusal, a timeout, the client's
            # going, an exception): what its body held is free for the next.
            reservation.release()

    async def _read_and_replay(
        self,
        scope: Scope,
        receive: Receive,
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
        reservation: Reservation,
    ) -> None:
        try:
            body = await read_body(
                receive,
                max_bytes=self.max_body_bytes,
                idle_seconds=body_idle_seconds(self.settings),
                reservation=reservation,
            )
        except BodyTooLarge:
            await self._too_large(scope, send)
            return
        except BodyTimedOut as stalled:
            # What it sent is dropped with it; the connection is closed, or the server would
            # wait for the rest of the declared length before it took another request.
            await _record_body_refusal(scope, 408, "body_timeout", stalled.detail)
            await _refuse(send, 408, "body_timeout", stalled.detail)
            return
        except NoRoomForBody:
            # Load shed, not a refusal of the input: neither audited nor counted against the
            # address (a peer may meet it while another fills the budget). A sender retries
            # a 503, not before Retry-After: by then a stalled body holding memory is gone.
            retry_after = max(1, math.ceil(body_idle_seconds(self.settings)))
            holder, holding = self.budget.largest() or ("nobody", 0)
            log.warning(
                "request body from %s refused (503 busy): request bodies held in memory fill "
                "the budget (%d of %d bytes held; at most %d per source address; the most, "
                "%d bytes, by %s)",
                reservation.source,
                self.budget.held,
                self.budget.total,
                self.budget.per_source,
                holding,
                holder,
            )
            await _refuse(
                send,
                503,
                "busy",
                "the node holds too many request bodies; retry later",
                headers={"retry-after": str(retry_after)},
            )
            return
        except ClientDisconnect:
            # Nobody reads this answer: it is for the access log and the metrics, which
            # otherwise counted the client's going as the node's fault (500, from review).
            log.info("the client closed the connection before the end of its request")
            await send({"type": "http.response.start", "status": CLIENT_GONE, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        # Small bodies cannot hold enough values to matter, and are not worth a thread hop.
        if len(body) > JSON_CHECK_BYTES and await run_in_threadpool(json_values_exceed, body):
            detail = f"the body holds more than {MAX_JSON_VALUES} JSON values"
            # On record before the answer: the caller may query the log once it has it.
            await _record_body_refusal(scope, 413, "too_large", detail)
            await _refuse(send, 413, "too_large", detail)
            return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(
        self, scope: Scope, send: Callable[[MutableMapping[str, Any]], Awaitable[None]]
    ) -> None:
        detail = f"body larger than {self.max_body_bytes} bytes"
        await _record_body_refusal(scope, 413, "too_large", detail)
        await _refuse(send, 413, "too_large", detail)


def _p2p_body(scope: Scope) -> bool:
    return scope.get("method") in BODY_METHODS and str(scope.get("path", "")).startswith("/p2p/")


def _source(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0])[:60] if client else "unknown"


async def _record_body_refusal(scope: Scope, status: int, code: str, detail: str) -> None:
    """A body refused as too large, or too slow: a local API caller's refusal is audited for
    its token's client; a peer API caller's counts against its address, as any refused
    envelope."""
    if not _p2p_body(scope):
        await record_refusal(scope, scope["app"].state.node, status, code)
        return
    await _record_p2p_refusal(scope, code, detail)


async def _record_p2p_refusal(scope: Scope, code: str, detail: str) -> None:
    """A call to the peer API refused before its route's own checks ran (they audit theirs):
    counted against the address and on record until it is throttled (app/deps.py), and in
    `entraide_envelopes_refused_total` as the routes' refusals are (a body that stalls or is
    too large was in no count a dashboard watches). Only while the address is counted: a
    blocked one's calls cost it nothing, and each one counted there would let it raise the
    figure operators alert on without limit (from review)."""
    if not str(scope.get("path", "")).startswith(P2P_API):
        return
    try:
        counted = await run_in_threadpool(
            refuse_p2p_call, scope["app"].state.node, _source(scope), code, detail
        )
    except Exception as failure:  # the answer still goes out
        log.error("could not record a refused peer call (%s)", type(failure).__name__)
        return
    if counted:
        scope["app"].state.metrics.envelope_refused(code)


async def _record_header_refusal(scope: Scope, detail: str) -> None:
    """`HeaderLimit`'s 413, on record as any other refusal (from review: it was not)."""
    await record_refusal(scope, scope["app"].state.node, 413, "headers_too_large")
    await _record_p2p_refusal(scope, "headers_too_large", detail)


def _error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


async def _on_record(
    request: Request, status: int, code: str, exc: BaseException | None = None
) -> None:
    """A local API refusal of a token holder, audited (app/auth/refusals.py). The answer goes
    out even if the log cannot take the entry: the failure is logged instead."""
    await record_refusal(request.scope, request.app.state.node, status, code, exc)


def slash_twin(request: Request) -> str | None:
    """The path the caller meant when it differs from a route's by a trailing slash
    (`/readyz/`), as a reference relative to the caller's own URL: Starlette's redirect
    named the Host header's authority, so anyone could have a node answer a redirect to
    any host (`Host: evil.example`), which a cache or proxy in front could keep and serve.
    None when no route has that path: a 404 then."""
    path = request.url.path
    twin = path.rstrip("/") if path.endswith("/") else path + "/"
    # Only a path beginning with a single slash is a path relative to the caller's URL
    # (`//host` is another host's); no route of ours is anything else.
    if not twin.startswith("/") or twin.startswith("//"):
        return None
    scope = {**request.scope, "path": twin}
    if not any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes):
        return None
    query = request.url.query
    return twin + (f"?{query}" if query else "")


def _allowed(request: Request) -> set[str]:
    """Every method of the path, for a 405's Allow (RFC 9110 §15.5.6): Starlette names the
    methods of the first route of that path alone (`allow: POST` where GET is served too;
    from review)."""
    methods: set[str] = set()
    # The routers' own routes (the app's hold each included router as one entry).
    for route in getattr(request.app.state, ROUTE_TABLE, ()):
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EntraideError)
    async def _domain(_request: Request, exc: EntraideError) -> JSONResponse:
        if isinstance(exc, EnvelopeRefused):
            _request.app.state.metrics.envelope_refused(exc.code)
        await _on_record(_request, exc.status_code, exc.code, exc)
        response = _error(exc.status_code, exc.code, exc.detail)
        if exc.status_code == 401:
            response.headers["www-authenticate"] = 'Bearer realm="entraide"'
        if _request.method == "HEAD":  # an answer to HEAD has no body: its code goes here
            response.headers[ERROR_HEADER] = exc.code
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int):  # TooManyRequests, TooManyTransfers
            response.headers["retry-after"] = str(retry_after)
        return response

    @app.exception_handler(StoredEnvelopeCorrupt)
    @app.exception_handler(StoredDataCorrupt)
    async def _corrupt(
        request: Request, exc: StoredEnvelopeCorrupt | StoredDataCorrupt
    ) -> JSONResponse:
        # Tampering or damage found while reading: an operator must look, and the read it
        # stopped is in the audit log (its own transaction: the route's has rolled back).
        log.error("%s %s: %s", request.method, request.url.path, exc.detail)
        if exc.audit is not None:
            try:
                await run_in_threadpool(record_alone, request.app.state.node.sessions, **exc.audit)
            except Exception as failure:  # the answer still goes out; the log line stays
                log.error("could not audit a corrupt stored value (%s)", type(failure).__name__)
        return _error(exc.status_code, exc.code, exc.detail)

    async def _damaged(request: Request, found: Unreadable) -> JSONResponse:
        # One damaged row, not a database out of reach nor the caller's input: "retry later"
        # or "your value" would never help (from review). The value is never logged.
        return await _corrupt(request, StoredDataCorrupt.of_column(found.column, found.why))

    @app.exception_handler(UnreadableValue)
    async def _unreadable_value(request: Request, exc: UnreadableValue) -> JSONResponse:
        return await _damaged(request, Unreadable(exc.column, exc.why))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Field locations and reasons only: echoing the input could leak request content.
        fields = [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg"), "type": error.get("type")}
            if (error.get("ctx") or {}).get("error") != DUPLICATE_KEY
            else {"loc": ["body"], "msg": DUPLICATE_KEY, "type": "duplicate_key"}
            for error in exc.errors()[:50]
        ]
        await _on_record(_request, 422, "invalid_request", exc)
        await _record_p2p_refusal(
            _request.scope, "invalid_request", "the request does not match the schema"
        )
        response = _error(
            422, "invalid_request", "the request does not match the schema", fields=fields
        )
        if _request.method == "HEAD":  # as for the domain's refusals: no body to say it
            response.headers[ERROR_HEADER] = "invalid_request"
        return response

    @app.exception_handler(OperationalError)
    async def _database_down(_request: Request, exc: DBAPIError) -> JSONResponse:
        found = unreadable(exc)
        if found is not None:  # /readyz says ready meanwhile: no outage
            return await _damaged(_request, found)
        if database_full(exc):
            _request.app.state.storage_full.note(DATABASE)
            log.error("database full (%s): nothing was stored", driver_error_name(exc))
            return _error(
                507,
                "insufficient_storage",
                "this node's database is full: nothing of this call was stored; retry once "
                "its operator has made room",
            )
        unwritable = database_unwritable(exc)
        if unwritable is not None:
            _request.app.state.storage_full.note(DATABASE, unwritable)
            log.error("database unavailable: the database %s", unwritable)
        else:
            log.error("database unavailable: %s", driver_error_name(exc))
        return _error(503, "database_unavailable", "the database is unavailable; retry later")

    @app.exception_handler(InternalError)
    async def _database_refused(_request: Request, exc: InternalError) -> JSONResponse:
        # PostgreSQL's read-only transaction (a standby, default_transaction_read_only) is
        # an InternalError to the driver: a 500 per write (from review), where it is the
        # database out of reach for writes, as a read-only SQLite file is.
        if database_unwritable(exc) is not None:
            return await _database_down(_request, exc)
        return await _bug(_request, exc)

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        found = unreadable(exc)
        if found is not None:  # a value read back that the driver cannot load: not input
            return await _damaged(_request, found)
        # PostgreSQL refuses some values the schemas let through (a NUL character in a text
        # parameter): the caller's input, not a fault. The value itself is not logged.
        log.warning("a value was refused by the database: %s", type(exc.orig).__name__)
        await _on_record(_request, 400, "invalid_value", exc)
        return _error(
            400,
            "invalid_value",
            "a value in the request cannot be stored or compared (a NUL character, say)",
        )

    @app.exception_handler(DurabilityLost)
    async def _durability_lost(_request: Request, exc: DurabilityLost) -> JSONResponse:
        log.critical("database durability lost: %s", exc)
        return _error(
            503,
            "database_unavailable",
            "this node cannot make its writes durable; its operator must check the disk and "
            "restart it",
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(_request: Request, _exc: ClientDisconnect) -> Response:
        # The caller closed the connection before the end of its body: nobody reads this
        # answer, and it is no fault of the node (an upload or a peer's part resumes from its
        # offset). Not logged as an error.
        log.info("the client closed the connection before the end of its request")
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(StorageFailed)
    async def _storage_failed(_request: Request, exc: StorageFailed) -> JSONResponse:
        # Not the caller's fault and nothing lost: what was stored before stays, and the
        # upload or part resumes from its offset once the operator has made room.
        log.error("evidence storage: %s", exc)
        if exc.full:
            _request.app.state.storage_full.note(EVIDENCE)
            return _error(
                507,
                "insufficient_storage",
                "this node's evidence storage is full; resume from the upload offset later",
            )
        return _error(
            503,
            "storage_unavailable",
            "this node could not write to its evidence storage; resume from the offset later",
        )

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        # A bug, never input. Log where it happened but not the exception's text, which may
        # quote request content (a validation error's input, a decoded value).
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s\n%s", type(exc).__name__, frames)
        return _error(500, "internal_error", "an internal error occurred; it has been logged")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404 and (twin := slash_twin(_request)) is not None:
            return RedirectResponse(twin, status_code=307)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = str(exc.detail)
        if exc.status_code == 400:
            # FastAPI's only 400: a body that does not parse as JSON at all (too deeply
            # nested, a number of thousands of digits): a code of ours, documented.
            code, detail = "invalid_json", "the body could not be parsed as JSON"
        await _on_record(_request, exc.status_code, code, exc)
        await _record_p2p_refusal(_request.scope, code, detail)
        response = _error(exc.status_code, code, detail)
        for name, value in (exc.headers or {}).items():  # a 405's Allow
            response.headers[name] = value
        if exc.status_code == 405:
            response.headers["allow"] = ", ".join(sorted(_allowed(_request)))
        if _request.method == "HEAD":  # no body to say it: as for the domain's refusals
            response.headers[ERROR_HEADER] = code
        return response


def _alive(thread: threading.Thread | None) -> bool:
    return thread is not None and thread.is_alive()


def create_app(settings: Settings | None = None, *, node: Node | None = None) -> FastAPI:
    """`node`: one already loaded from these settings (`entraide serve` checks it before it
    starts the server), used by the first lifespan instead of loading the keys again, which
    with a key passphrase means an Argon2id derivation per key file."""
    settings = settings or get_settings()
    loaded = [node] if node is not None else []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        node = loaded.pop() if loaded else load_node(settings)
        app.state.node = node
        try:  # its folders made now: /readyz says if they go missing later
            blob_store(settings)
        except OSError as exc:
            log.error("the evidence folder cannot be made (%s): /readyz says so", exc.strerror)
        # The node's: its in-process delivery worker notes a full database there too.
        app.state.storage_full = node.storage_full
        worker: Worker | None = None
        app.state.worker_thread = None
        app.state.migration_heads = expected_heads()
        app.state.metrics.watch(
            node,
            lambda: _alive(app.state.worker_thread) if settings.run_worker else None,
        )
        if settings.run_worker:
            worker = Worker(node)
            thread = threading.Thread(target=worker.run, name="delivery-worker", daemon=True)
            thread.start()
            app.state.worker_thread = thread
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
                app.state.worker_thread.join(timeout=4 * settings.peer_timeout_seconds + 10)
                worker.http.close()
            # The files kept open between a client's or a peer's requests: the next
            # request (of another app of this process, in tests) rebuilds from the disk.
            drafts.WRITERS.close()
            close_kept_receivers()
            node.close()

    app = FastAPI(
        # No unauthenticated documentation routes: the schema is served to token holders
        # at /api/v1/openapi.json (app.public), and `app.openapi()` in-process.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        title="Entraide node",
        version="0.1.0",
        lifespan=lifespan,
        summary="Gateway for sealed international cooperation requests",
    )
    install_error_handlers(app)
    # A path one slash off a route's is redirected by the 404 handler (`slash_twin`), with a
    # Location of our making rather than Starlette's, built from the Host header.
    app.router.redirect_slashes = False
    for router in ROUTERS:
        app.include_router(router)
    setattr(app.state, ROUTE_TABLE, route_table(ROUTERS))
    install_openapi(app, ROUTERS)
    # One budget for the process: every request body this app reads is held in it.
    budget = BodyBudget(*buffered_body_budget(settings))
    app.add_middleware(LimitsAndHeaders, settings=settings, budget=budget)
    # Before any check that waits (a token read, a body's budget): HEAD tells a client where
    # to resume only once every PATCH of that attachment the node has begun is done.
    app.add_middleware(CountArrivals)
    # Outside the body limit: headers are refused before any body is read.
    app.add_middleware(
        HeaderLimit,
        max_bytes=settings.max_http_header_bytes,
        headers=SECURITY_HEADERS,
        on_refused=_record_header_refusal,
    )
    # Outermost, so the request id and the counters cover every answer, 413s included.
    app.state.metrics = Metrics()
    app.state.storage_full = StorageFull()
    app.state.metrics.buffered_body_bytes.set_function(lambda: budget.held)
    app.add_middleware(Observability, metrics=app.state.metrics)
    return app


__all__ = ["Node", "create_app"]

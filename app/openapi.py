"""The OpenAPI document: every status a route can answer, with the body and headers it has.

FastAPI documents only success and its own 422 shape, which is not ours (app.main turns
validation errors into `{"error", "detail", "fields"}`). This adds, per operation, the
error statuses its access policy, parameters, body and reads make possible, all with the
`Error` schema; the headers a client reads (where an upload resumes, a replayed answer, a
download's hash and name, a 401's challenge); and the bytes a streamed body is. A client
(and schemathesis, tests/security/test_schemathesis.py) can rely on the document, and one
generated from it can upload evidence and read where to resume
(tests/requests/test_openapi_answers.py checks the node's real answers against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from app.deps import PeerTransport, Policy, Public, PublicWithDetails, UnitOfWorkRoute
from app.errors import ERROR_HEADER
from app.limits import buffered_body, streamed_body
from app.requests.idempotency import IDEMPOTENCY_HEADER, REPLAYED_HEADER

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "stable machine-readable code"},
        "detail": {"type": "string", "description": "for people; never request content"},
        "fields": {
            "type": "array",
            "description": "422 only: where the input does not match the schema",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
# A signed receipt, as `POST /p2p/v1/envelopes` and a completed streamed envelope answer it.
RECEIPT_SCHEMA = {
    "type": "object",
    "required": ["receipt", "signature"],
    "properties": {"receipt": {"type": "string"}, "signature": {"type": "string"}},
}
RECEIPT_ANSWER = {"content": {"application/json": {"schema": RECEIPT_SCHEMA}}}
REASONS = {
    400: "Refused input (see `error`)",
    401: "Missing, unknown, expired or revoked token",
    403: "The token lacks the route's role (P2P: client certificate refused)",
    404: "No such object",
    408: "The body sent nothing for the idle period, or arrived too slowly (`body_timeout`): "
    "a body read whole is not kept (send the call again); an upload or a part keeps its whole "
    "chunks (resume from Upload-Offset)",
    409: "Conflicts with the current state",
    413: "Body or headers over the limit",
    415: "A JSON body sent as another type (`unsupported_media_type`): send application/json",
    421: "Envelope (or recovery request) addressed to another authority",
    422: "Does not match the schema",
    429: "Too many refused attempts from this address or client; see Retry-After",
    500: "What this node stored no longer checks out (`stored_envelope_corrupt`) or cannot be "
    "read (`stored_data_corrupt`): storage was altered or damaged, never the caller's input; "
    "tell the node's operator",
    502: "A peer could not be reached or answered badly",
    503: "The database (or, for evidence, its storage) is unavailable; or (`busy`) the request "
    "bodies held in memory fill the node's budget: retry after Retry-After",
    507: "The database, or the evidence storage, is full: nothing more was stored; retry (or "
    "resume from the offset) once there is room",
}
ALWAYS = {413, 503}
WITH_TOKEN = {401, 403, 429}
WITH_INPUT = {400, 404, 409, 422}
P2P = {403, 429}
ENVELOPES = {400, 403, 409, 421, 422}
BATCH = {400}  # malformed_batch; each envelope's own refusal is inside the 200's answers
# A restored peer's signed request for what we exchanged (app/recovery): malformed or stale
# (400), not its key's (403), addressed to another authority (421).
RECOVERY = "/p2p/v1/recovery"
# ... and one streamed part of a listed message: 404 unknown_part or part_missing too.
RECOVERY_PART = "/p2p/v1/recovery/parts"
RECOVERY_REFUSALS = {400, 403, 421}
# A body read whole before the route runs (app/limits.py): 408 body_timeout, 413 too_large,
# 503 busy (with Retry-After), whatever the route does with it.
BUFFERED_BODY = {408, 413, 503}
# Routes that write evidence to the blob store: uploads (PATCH) and received parts (PUT).
STORES_EVIDENCE = ("/api/v1/evidence/drafts/{draft_id}/attachments/", "/p2p/v1/evidence/")
# A received part: 409 part_out_of_order (HEAD and PUT), part_busy and offset_mismatch (PUT).
PEER_PART = "/p2p/v1/evidence/envelopes/{msg_id}/parts/{index}"
DRAFT_UPLOAD = "/api/v1/evidence/drafts/{draft_id}/attachments/{index}"
DOWNLOAD = "/api/v1/requests/{request_id}/messages/{msg_id}/attachments/{index}"
# Operations that open what this node stored (an envelope, a receipt, a draft's key or an
# evidence blob) and answer 500 stored_envelope_corrupt when it no longer checks out. A
# repeated envelope (P2P) is answered with its stored receipt, checked again first.
OPENS_STORED = frozenset(
    {
        ("GET", "/api/v1/requests/{request_id}"),
        ("GET", "/api/v1/requests/{request_id}/messages/{msg_id}/proof"),
        ("GET", DOWNLOAD),
        ("POST", "/api/v1/evidence/drafts"),
        ("POST", "/api/v1/requests/{request_id}/messages/drafts"),
        ("GET", "/api/v1/evidence/drafts/{draft_id}"),
        ("HEAD", DRAFT_UPLOAD),
        ("PATCH", DRAFT_UPLOAD),
        ("POST", "/api/v1/evidence/drafts/{draft_id}/submit"),
        ("POST", "/p2p/v1/envelopes"),
        ("POST", "/p2p/v1/evidence/envelopes"),
        ("PUT", PEER_PART),
    }
)


def _header(description: str, schema: dict[str, Any], *, required: bool) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


INTEGER = {"type": "integer", "minimum": 0}


def _upload_state(*, required: bool, complete: bool = True) -> dict[str, Any]:
    headers = {
        "Upload-Offset": _header(
            "the bytes held durably: send the rest from here", INTEGER, required=required
        ),
        "Upload-Length": _header("the declared size, in bytes", INTEGER, required=required),
    }
    if complete:
        headers["Upload-Complete"] = _header(
            "`?1` once the attachment is whole, sealed and stored, else `?0`",
            {"type": "string", "enum": ["?0", "?1"]},
            required=required,
        )
    return headers


# What an answer carries besides its body, by operation and status. A 409 carries the
# upload's state only for `offset_mismatch` (where to resume), not for its other codes.
ANSWER_HEADERS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("HEAD", DRAFT_UPLOAD): {"204": _upload_state(required=True)},
    ("PATCH", DRAFT_UPLOAD): {
        "204": _upload_state(required=True),
        "408": _upload_state(required=True, complete=False),  # a stall: where to resume
        "409": _upload_state(required=False),
    },
    ("HEAD", PEER_PART): {"204": _upload_state(required=True, complete=False)},
    ("PUT", PEER_PART): {
        "201": _upload_state(required=True, complete=False),
        "204": _upload_state(required=True, complete=False),
        "408": _upload_state(required=True, complete=False),
        "409": _upload_state(required=False, complete=False),
    },
    ("GET", DOWNLOAD): {
        "200": {
            "Content-Disposition": _header(
                "`attachment` with the file's name (RFC 6266, `filename*` in UTF-8): show it "
                "escaped, never as a path",
                {"type": "string"},
                required=True,
            ),
            "X-Entraide-Sha256": _header(
                "SHA-256 (hex) of the plaintext, from the sender's signed manifest: check it",
                {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                required=True,
            ),
            "X-Entraide-Media-Type": _header(
                "the media type the sender claims; the body is sent as "
                "application/octet-stream, never to be rendered by this claim",
                {"type": "string"},
                required=True,
            ),
        }
    },
}
RETRY_AFTER = _header("seconds", {"type": "integer"}, required=True)
IDEMPOTENT_REPLAYED = _header(
    "`true` on the first answer given again for a repeated Idempotency-Key",
    {"type": "string", "enum": ["true"]},
    required=False,
)
WWW_AUTHENTICATE = _header('`Bearer realm="entraide"`', {"type": "string"}, required=True)
HEAD_ERROR = _header(
    "an answer to HEAD has no body: the refusal's `error` code", {"type": "string"}, required=False
)
# A streamed body (STREAMED_BODIES): the bytes themselves, never JSON.
STREAMED_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "the bytes from Upload-Offset on: any length up to the rest of the "
    "attachment (or part)",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _marker(route: APIRoute) -> object | None:
    for dependency in route.dependant.dependencies:
        if isinstance(dependency.call, Policy | Public):
            return dependency.call
    return None


def _takes_idempotency_key(route: APIRoute) -> bool:
    return any(param.alias == IDEMPOTENCY_HEADER for param in route.dependant.header_params)


def error_statuses(route: APIRoute, method: str) -> set[int]:
    marker = _marker(route)
    has_input = bool(
        route.dependant.path_params or route.dependant.query_params or route.body_field
    )
    statuses = set(ALWAYS)
    if isinstance(marker, (Policy, PeerTransport)):
        # Every such call reads rows and writes at least an audit entry: a stored value the
        # database cannot read (500 stored_data_corrupt) or a full database (507) can meet
        # any of them (from review: listed on evidence routes only).
        statuses |= {500, 507}
    if isinstance(marker, PublicWithDetails):
        # A token, if one is sent, is authenticated as on a Policy route: refused (401,
        # 429), read from rows (500), its refusal audited (507). Never 403: a valid token
        # without the roles gets the public answer.
        statuses |= {401, 429, 500, 507}
    if isinstance(marker, Policy):
        statuses |= WITH_TOKEN | WITH_INPUT
        if route.path.startswith("/api/v1/admin/peers"):
            statuses.add(502)
    elif isinstance(marker, PeerTransport):
        statuses |= P2P | ({400, 404, 422} if has_input else set())
        if route.path.endswith("/envelopes"):
            statuses |= ENVELOPES
        if route.path.endswith("/envelopes/batch"):
            statuses |= BATCH
        if route.path == PEER_PART:
            statuses.add(409)
        if route.path == RECOVERY:
            statuses |= RECOVERY_REFUSALS
        if route.path == RECOVERY_PART:
            statuses |= RECOVERY_REFUSALS | {404}
    elif has_input:
        statuses.add(422)
    if route.path.startswith(STORES_EVIDENCE) and method in {"PATCH", "PUT"}:
        # A streamed body that goes quiet is answered 408 too, its whole chunks kept.
        statuses |= {408, 507}
    if buffered_body(method, route.path):
        statuses |= BUFFERED_BODY
    if isinstance(route, UnitOfWorkRoute) and route.body_field is not None:
        statuses.add(415)  # a JSON body sent as another type
    if (method, route.path) in OPENS_STORED:
        statuses.add(500)
    return statuses


def _document_headers(
    route: APIRoute, method: str, responses: dict[str, Any], buffered: bool
) -> None:
    for status, headers in ANSWER_HEADERS.get((method, route.path), {}).items():
        responses[status].setdefault("headers", {}).update(headers)
    if _takes_idempotency_key(route):
        success = responses[str(route.status_code or 200)]
        success.setdefault("headers", {})[REPLAYED_HEADER] = IDEMPOTENT_REPLAYED
    if "401" in responses:
        responses["401"]["headers"] = {"WWW-Authenticate": WWW_AUTHENTICATE}
    if "429" in responses:
        responses["429"]["headers"] = {"Retry-After": RETRY_AFTER}
    if buffered:  # 503 busy; not database_unavailable
        responses["503"]["headers"] = {"Retry-After": {**RETRY_AFTER, "required": False}}
    if method == "HEAD":
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                response.setdefault("headers", {})[ERROR_HEADER.title()] = HEAD_ERROR


def document_errors(schema: dict[str, Any], routes: Sequence[BaseRoute]) -> dict[str, Any]:
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    reference = {"$ref": "#/components/schemas/Error"}
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods or ():
            operation = schema["paths"].get(route.path, {}).get(method.lower())
            if operation is None:
                continue
            if streamed_body(method, route.path):
                operation["requestBody"] = STREAMED_REQUEST_BODY
            responses = operation.setdefault("responses", {})
            for status in sorted(error_statuses(route, method)):
                # A status the route declares itself (/readyz's 503) may still be an
                # `Error` from elsewhere (the database, while a token is checked).
                own = responses.get(str(status), {})
                declared = own.get("content", {}).get("application/json", {}).get("schema")
                responses[str(status)] = {
                    "description": own.get("description", REASONS[status]),
                    "content": {
                        "application/json": {
                            "schema": reference
                            if declared is None
                            else {"anyOf": [declared, reference]}
                        }
                    },
                }
            _document_headers(route, method, responses, buffered_body(method, route.path))
    schema["components"]["schemas"].pop("HTTPValidationError", None)
    schema["components"]["schemas"].pop("ValidationError", None)
    return schema


def install_openapi(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """`routers`: the application's routers, whose routes carry their policy markers."""
    routes = [route for router in routers for route in router.routes]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            app.openapi_schema = document_errors(schema, routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override

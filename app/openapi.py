"""The OpenAPI document: every error a route can answer, with the body it really has.

FastAPI documents only success and its own 422 shape, which is not ours (app.main turns
validation errors into `{"error", "detail", "fields"}`). This adds, per operation, the
error statuses its access policy and parameters make possible, all with the `Error` schema,
so a client (and schemathesis, tests/security/test_schemathesis.py) can rely on the document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from app.deps import PeerTransport, Policy, Public

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
REASONS = {
    400: "Refused input (see `error`)",
    401: "Missing, unknown, expired or revoked token",
    403: "The token lacks the route's role (P2P: client certificate refused)",
    404: "No such object",
    409: "Conflicts with the current state",
    413: "Body or headers over the limit",
    421: "Envelope addressed to another authority",
    422: "Does not match the schema",
    429: "Too many refused attempts from this address or client; see Retry-After",
    502: "A peer could not be reached or answered badly",
    503: "The database (or, for evidence, its storage) is unavailable",
    507: "The evidence storage is full: resume from the offset once there is room",
}
ALWAYS = {413, 503}
WITH_TOKEN = {401, 403, 429}
WITH_INPUT = {400, 404, 409, 422}
P2P = {403, 429}
ENVELOPES = {400, 403, 409, 421, 422}
BATCH = {400}  # malformed_batch; each envelope's own refusal is inside the 200's answers
# Routes that write evidence to the blob store: uploads (PATCH) and received parts (PUT).
STORES_EVIDENCE = ("/api/v1/evidence/drafts/{draft_id}/attachments/", "/p2p/v1/evidence/")


def _marker(route: APIRoute) -> object | None:
    for dependency in route.dependant.dependencies:
        if isinstance(dependency.call, Policy | Public):
            return dependency.call
    return None


def error_statuses(route: APIRoute) -> set[int]:
    marker = _marker(route)
    has_input = bool(
        route.dependant.path_params or route.dependant.query_params or route.body_field
    )
    statuses = set(ALWAYS)
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
    elif has_input:
        statuses.add(422)
    if route.path.startswith(STORES_EVIDENCE) and (route.methods or set()) & {"PATCH", "PUT"}:
        statuses.add(507)
    return statuses


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
            responses = operation.setdefault("responses", {})
            for status in sorted(error_statuses(route)):
                responses[str(status)] = {
                    "description": REASONS[status],
                    "content": {"application/json": {"schema": reference}},
                }
            if "429" in responses:
                responses["429"]["headers"] = {
                    "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}
                }
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

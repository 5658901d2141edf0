"""Public routes: the identity document, liveness and readiness. No token, on purpose;
readiness shows its delivery backlog only to a token /metrics admits (app/deps.py READINESS)."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import heartbeat
from app.delivery.outbox import queue_stats
from app.deps import PUBLIC, READINESS, AnyRoleDep, NodeDep
from app.node import Node
from app.obs.health import DEGRADING, OK, readiness

router = APIRouter(tags=["public"], dependencies=[Depends(PUBLIC)])
openapi_router = APIRouter(tags=["public"])
# Its own router: /readyz declares READINESS, which also says whether to show the backlog.
readiness_router = APIRouter(tags=["public"])

BacklogShownDep = Annotated[bool, Depends(READINESS)]

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
READINESS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "checks", "failing"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "degraded", "not_ready"]},
        "checks": {**_STRINGS, "description": "each check: `ok` or `failing: <why>`"},
        "failing": {"type": "array", "items": {"type": "string"}},
        "delivery": {
            "type": "object",
            "description": "the delivery backlog: only for the token of a `monitor` or "
            "`admin` client (or to anyone with ENTRAIDE_METRICS_PUBLIC), and only while the "
            "database answers",
            "properties": {
                "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                "oldest_pending_age_seconds": {"type": "number"},
                "workers": {"anyOf": [{"type": "integer"}, _STRINGS]},
                "error": {"type": "string"},
            },
        },
    },
}
READINESS_ANSWER = {"content": {"application/json": {"schema": READINESS_SCHEMA}}}


@router.get("/.well-known/entraide/node")
def identity_document(node: NodeDep) -> dict[str, str]:
    # Built when the keys were (re)loaded: after `keys rotate`, the new keys and their chain.
    return node.identity_document


@openapi_router.get("/api/v1/openapi.json", include_in_schema=False)
def openapi_schema(request: Request, principal: AnyRoleDep) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/healthz")
@router.head("/healthz")  # a load balancer's probe may be either (it was 405)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@readiness_router.get(
    "/readyz",
    responses={
        200: {
            "description": "Ready, or degraded (only `keys_reload` or `evidence` fails)",
            **READINESS_ANSWER,
        },
        503: {
            "description": "Not ready: `failing` names the checks (an `Error` only if the "
            "database fails while a token is checked)",
            **READINESS_ANSWER,
        },
    },
)
@readiness_router.head(
    "/readyz",
    responses={200: {"description": "Ready, or degraded"}, 503: {"description": "Not ready"}},
)
def readyz(request: Request, node: NodeDep, backlog_shown: BacklogShownDep) -> JSONResponse:
    """Readiness, for load balancers: its status code needs no token (docs/api.md §2.1).

    The delivery backlog (`delivery`) says when this node sends requests and how many: it is
    shown only to the bearer token of a `monitor` or `admin` client, as /metrics is; another
    valid token gets the public answer. A token sent is authenticated as on any route (401,
    429); send none from a load balancer."""
    thread: threading.Thread | None = request.app.state.worker_thread
    checks = readiness(
        node,
        heads=request.app.state.migration_heads,
        worker=thread,
        storage_full=request.app.state.storage_full,
    )
    failing = [name for name, value in checks.items() if value != OK]
    out = [name for name in failing if name not in DEGRADING]
    body: dict[str, Any] = {
        "status": "not_ready" if out else "degraded" if failing else "ready",
        "checks": checks,
        "failing": failing,
    }
    if backlog_shown and request.method != "HEAD" and "database" not in failing:
        body["delivery"] = _backlog(node)
    return JSONResponse(body, status_code=503 if out else 200)


def _backlog(node: Node) -> dict[str, Any]:
    """The delivery backlog, for operators (a monitor's token): counts and oldest age, and
    how many delivery workers run in any process (a report: this process serves the API
    whether or not one runs, and submissions wait in the outbox meanwhile)."""
    now = utc_now()
    try:
        with unit_of_work(node.sessions) as session:
            stats = queue_stats(session)
    except Exception as exc:  # readiness never fails on its own report
        return {"error": type(exc).__name__}
    age = (now - stats.oldest_pending_at).total_seconds() if stats.oldest_pending_at else 0
    report: dict[str, Any] = {
        "by_state": stats.by_state,
        "oldest_pending_age_seconds": round(age, 1),
    }
    try:
        with unit_of_work(node.sessions) as session:
            report["workers"] = heartbeat.alive(session)
    except Exception as exc:  # the backlog is still worth reporting
        report["workers"] = {"error": type(exc).__name__}
    return report

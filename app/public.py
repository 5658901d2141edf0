"""Public routes: the identity document, liveness and readiness. No token, on purpose."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.deps import PUBLIC, AnyRoleDep, NodeDep

router = APIRouter(tags=["public"], dependencies=[Depends(PUBLIC)])
openapi_router = APIRouter(tags=["public"])


@router.get("/.well-known/entraide/node")
def identity_document(request: Request) -> dict[str, str]:
    document: dict[str, str] = request.app.state.identity_document
    return document


@openapi_router.get("/api/v1/openapi.json", include_in_schema=False)
def openapi_schema(request: Request, principal: AnyRoleDep) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, node: NodeDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with node.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver failure means "not ready", never a 500
        checks["database"] = f"failing: {type(exc).__name__}"
    thread: threading.Thread | None = request.app.state.worker_thread
    if node.settings.run_worker:
        checks["worker"] = "ok" if thread is not None and thread.is_alive() else "failing"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )

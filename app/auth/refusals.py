"""Refusals of the local API on record: every 4xx a token holder gets is an audit entry.

A case system's malformed, oversized or out-of-place input (422, 413, 400, 409, 404) is
refused, and whoever queries the log later sees who tried what, where, and why it was
refused (`api.refused`). Refusals audited where they happen (need-to-know, a role not held,
a pinning that failed) are marked so and not recorded twice; refused tokens (401) and
throttled calls (429) have their own entries; a call without a token is refused without any
(as for authentication, docs/api.md §1).

What bounds the log: entries are counted per client (`refused:<id>`, as refused tokens are):
past the refusal limit in a window, the refusals are only counted until the window after the
block, and the next `auth.throttled` says how many. The calls themselves are not held back:
a client's mistakes must not stop its work.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request

from app.audit.log import record
from app.auth.service import Principal
from app.auth.throttle import auth_limits, register_refusal
from app.db import unit_of_work
from app.node import Node

AUDITED = "_entraide_audited"
LOCAL_API = "/api/v1/"
NOT_HERE = frozenset({401, 429})  # entries of their own (auth.failed, auth.throttled)
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def already_audited(exc: BaseException) -> BaseException:
    """Mark a refusal whose entry was written where it happened."""
    setattr(exc, AUDITED, True)
    return exc


def route_of(request: Request) -> str:
    """The method and the route's template (`/api/v1/requests/{request_id}`): the path itself
    may carry whatever the caller sent."""
    route = request.scope.get("route")
    template = getattr(route, "path", None) or request.url.path[:200]
    return f"{request.method} {template}"


def should_audit(request: Request, status: int, exc: BaseException | None) -> Principal | None:
    """The caller to put on record for this refusal, or None when it is not recorded here."""
    if not 400 <= status < 500 or status in NOT_HERE:
        return None
    if not request.url.path.startswith(LOCAL_API):
        return None
    if exc is not None and getattr(exc, AUDITED, False):
        return None
    principal = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else None


def audit_refusal(
    request: Request, node: Node, principal: Principal, status: int, code: str
) -> None:
    """One `api.refused` entry, within the client's bound (module docstring)."""
    details: dict[str, Any] = {"route": route_of(request), "status": status}
    request_id = request.path_params.get("request_id") or request.path_params.get("draft_id")
    actor = f"client:{principal.name}"
    with unit_of_work(node.sessions) as session:
        verdict = register_refusal(
            session, [f"refused:{principal.client_id}"], auth_limits(node.settings), actor=actor
        )
        if verdict.audit:
            record(
                session,
                actor=actor,
                action="api.refused",
                outcome=code,
                request_id=request_id
                if isinstance(request_id, str) and _REQUEST_ID.fullmatch(request_id)
                else None,
                details=details,
            )

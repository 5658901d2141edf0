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

import logging
import re
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from app.audit.log import record
from app.auth.service import Principal, TokenRefused, authenticate
from app.auth.throttle import Verdict, auth_limits, register_refusal
from app.db import unit_of_work
from app.node import Node
from app.obs.labels import method_of, template_of

log = logging.getLogger(__name__)

AUDITED = "_entraide_audited"
LOCAL_API = "/api/v1/"
NOT_HERE = frozenset({401, 429})  # entries of their own (auth.failed, auth.throttled)
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def record_counted(
    node: Node, key: str, *, actor: str, action: str, outcome: str, **fields: Any
) -> Verdict:
    """A refusal of a known client, on record until `key` reaches the refusal limit, then
    counted (the next `auth.throttled` says how many), in a transaction of its own: no
    client can grow the log without end with them. The verdict says whether `key` is now
    blocked; the caller decides whether that changes its answer."""
    with unit_of_work(node.sessions) as session:
        verdict = register_refusal(session, [key], auth_limits(node.settings), actor=actor)
        if verdict.audit:
            record(session, actor=actor, action=action, outcome=outcome, **fields)
    return verdict


def already_audited(exc: BaseException) -> BaseException:
    """Mark a refusal whose entry was written where it happened."""
    setattr(exc, AUDITED, True)
    return exc


def route_of(scope: Scope) -> str:
    """The method and the route's template (`/api/v1/requests/{request_id}`), never the
    path: it may carry whatever the caller sent, a name or an account number, which the
    audit log would keep for good (app/obs/labels.py)."""
    return f"{method_of(scope)} {template_of(scope)}"


def should_audit(scope: Scope, status: int, exc: BaseException | None) -> bool:
    """Whether this refusal is recorded here (the caller is found by `audit_refusal`)."""
    if not 400 <= status < 500 or status in NOT_HERE:
        return False
    if not str(scope.get("path", "")).startswith(LOCAL_API):
        return False
    if exc is not None and getattr(exc, AUDITED, False):
        return False
    return any(name == b"authorization" for name, _ in scope.get("headers", []))


def _caller(scope: Scope, session: Session) -> Principal | None:
    """Who made the call: as the route's policy found it, or, for a refusal that came before
    the policy ran (a body that does not parse, one too large), the token's own client. A
    token that does not authenticate is not on record here (its refusal would have been)."""
    principal = scope.get("state", {}).get("principal")
    if isinstance(principal, Principal):
        return principal
    header = dict(scope.get("headers", [])).get(b"authorization", b"")
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return authenticate(session, token.strip())
    except TokenRefused:
        return None


def audit_refusal(scope: Scope, node: Node, status: int, code: str) -> None:
    """One `api.refused` entry, within the client's bound (module docstring)."""
    details: dict[str, Any] = {"route": route_of(scope), "status": status}
    params = scope.get("path_params", {})
    request_id = params.get("request_id") or params.get("draft_id")
    with unit_of_work(node.sessions) as session:
        principal = _caller(scope, session)
        if principal is None:
            return
        actor = f"client:{principal.name}"
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


async def record_refusal(
    scope: Scope, node: Node, status: int, code: str, exc: BaseException | None = None
) -> None:
    """`audit_refusal` for a route about to answer: the answer goes out even if the log
    cannot take the entry (the failure is logged instead)."""
    if not should_audit(scope, status, exc):
        return
    try:
        await run_in_threadpool(audit_refusal, scope, node, status, code)
    except Exception as failure:
        log.error("could not audit a refused call (%s)", type(failure).__name__)

"""Dependencies for routes: the unit of work, the node, and access policies.

Every route declares its access policy with `Policy` (or `PUBLIC`) next to its definition;
a test walks the application's routes and fails on any route that declares none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.audit.log import record_alone
from app.auth.service import Principal, Role, authenticate
from app.db import unit_of_work
from app.errors import Forbidden, Unauthenticated
from app.node import Node


def get_node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


NodeDep = Annotated[Node, Depends(get_node)]


def get_session(node: NodeDep) -> Iterator[Session]:
    with unit_of_work(node.sessions) as session:
        yield session


# scope="function": commit before the response is sent, so a 201 means the row is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("a bearer token is required", code="missing_token")
    return token.strip()


class Policy:
    """Requires a valid token holding at least one of `roles`."""

    def __init__(self, *roles: Role) -> None:
        self.roles = frozenset(roles)

    def __call__(self, request: Request, node: NodeDep) -> Principal:
        token = _bearer_token(request)
        # Authentication gets its own short transaction: a refused token must not depend on
        # (or roll back) the route's unit of work.
        try:
            with unit_of_work(node.sessions) as session:
                principal = authenticate(session, token)
        except Unauthenticated as exc:
            # Never the token itself: only the fact, the reason and where it came from.
            source = request.client.host if request.client else "unknown"
            record_alone(
                node.sessions,
                actor=f"address:{source}",
                action="auth.failed",
                outcome=exc.code,
                details={"route": request.url.path[:200]},
            )
            raise
        if not principal.roles & self.roles:
            allowed = ", ".join(sorted(self.roles))
            raise Forbidden(f"this operation requires the role {allowed}")
        request.state.principal = principal
        return principal


class Public:
    """Marks a route that deliberately needs no token, and says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self) -> None:
        return None


PUBLIC = Public("public information: identity document, health, readiness")
PEER_SIGNED = Public("peer-to-peer: every envelope is authenticated by its signature")
OFFICER = Policy(Role.OFFICER)
AUDITOR = Policy(Role.AUDITOR)
ADMIN = Policy(Role.ADMIN)

ANY_ROLE = Policy(Role.OFFICER, Role.AUDITOR, Role.ADMIN)

AnyRoleDep = Annotated[Principal, Depends(ANY_ROLE)]
OfficerDep = Annotated[Principal, Depends(OFFICER)]
AuditorDep = Annotated[Principal, Depends(AUDITOR)]
AdminDep = Annotated[Principal, Depends(ADMIN)]

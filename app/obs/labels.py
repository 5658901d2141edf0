"""What of a request may name it in a metric label, a log line or an audit entry: only values
from a fixed set. The method and the path are the caller's own text (h11 takes any token as a
method, and a path can carry a name or an account number): a label made of them would let
anyone add series to the metrics for good, and write their own words into the audit log."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

UNMATCHED_ROUTE = "unmatched"
ROUTE_TABLE = "route_table"
OTHER_METHOD = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_of(scope: Scope) -> str:
    method = scope.get("method")
    return method if method in METHODS else OTHER_METHOD


def template_of(scope: Scope) -> str:
    """The route's template (`/api/v1/requests/{request_id}`), never the path. Before
    routing (a body refused by the middleware), the route the path would reach."""
    route = scope.get("route")
    if route is None and scope.get("type") == "http":
        state = getattr(scope.get("app"), "state", None)
        for candidate in getattr(state, ROUTE_TABLE, ()):
            if candidate.matches(scope)[0] is not Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or UNMATCHED_ROUTE


def route_table(routers: Iterable[APIRouter]) -> tuple[BaseRoute, ...]:
    """Every route of `routers`, for `template_of` before routing: kept in the app's state
    under ROUTE_TABLE (app/main.py)."""
    return tuple(route for router in routers for route in router.routes)

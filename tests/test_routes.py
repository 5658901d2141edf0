"""Every route declares who may call it, next to its definition."""

from __future__ import annotations

from fastapi.routing import APIRoute

from app.deps import METRICS, Policy, Public, PublicWithDetails
from app.main import ROUTERS


def api_routes() -> list[APIRoute]:
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


def _markers(route: APIRoute) -> list[object]:
    return [
        dependency.call
        for dependency in route.dependant.dependencies
        if isinstance(dependency.call, Policy | Public)
    ]


def is_public(route: APIRoute) -> bool:
    return any(isinstance(marker, Public) for marker in _markers(route))


def test_every_route_declares_exactly_one_policy() -> None:
    routes = api_routes()
    assert len(routes) >= 10
    for route in routes:
        markers = _markers(route)
        assert len(markers) == 1, f"{sorted(route.methods)} {route.path} declares {markers}"


def test_only_identity_health_and_p2p_are_public() -> None:
    public = sorted(route.path for route in api_routes() if is_public(route))
    assert public == [
        "/.well-known/entraide/node",
        # GET and HEAD, as /readyz.
        "/healthz",
        "/healthz",
        "/p2p/v1/audit/consistency",
        "/p2p/v1/audit/cosignature",
        "/p2p/v1/envelopes",
        # Several envelopes in one call: each is signed and checked as if posted alone.
        "/p2p/v1/envelopes/batch",
        # Streamed parts (app/evidence): the announce is signed, every part byte checked
        # against the signed header; HEAD and PUT share the part's path.
        "/p2p/v1/evidence/envelopes",
        "/p2p/v1/evidence/envelopes/{msg_id}/parts/{index}",
        "/p2p/v1/evidence/envelopes/{msg_id}/parts/{index}",
        # A restored peer asks for what it exchanged with us: its request is signed.
        "/p2p/v1/recovery",
        # ... and a streamed part of a message it lists: signed the same way.
        "/p2p/v1/recovery/parts",
        # GET and HEAD (a load balancer's probe may be either).
        "/readyz",
        "/readyz",
    ]


def test_admin_routes_need_admin_and_request_routes_need_officer() -> None:
    for route in api_routes():
        (marker,) = _markers(route)
        if route.path.startswith("/api/v1/admin/"):
            assert isinstance(marker, Policy)
            assert {role.value for role in marker.roles} == {"admin"}
        elif route.path.startswith("/api/v1/audit"):
            assert isinstance(marker, Policy)
            assert {role.value for role in marker.roles} == {"auditor"}
        elif route.path.startswith("/api/v1/requests"):
            assert isinstance(marker, Policy)
            assert {role.value for role in marker.roles} == {"officer"}


def test_metrics_need_a_monitor_or_an_admin_and_the_monitor_role_nothing_else() -> None:
    """The counters say when envelopes arrive (from a security review): a scraper's token
    (`monitor`) or an operator's (`admin`) reads them, and a scraper's token opens no other
    route."""
    for route in api_routes():
        (marker,) = _markers(route)
        roles = {role.value for role in marker.roles} if isinstance(marker, Policy) else set()
        if route.path == "/metrics":
            assert isinstance(marker, Policy)
            assert roles == {"monitor", "admin"}
        else:
            assert "monitor" not in roles, route.path


def test_the_upload_offset_route_declares_the_204_it_answers() -> None:
    """The OpenAPI document said 200 for HEAD .../attachments/{index}; the node answers 204
    (with Upload-Offset), as a schema-driven client then refuses."""
    from app.config import Settings
    from app.main import create_app

    path = "/api/v1/evidence/drafts/{draft_id}/attachments/{index}"
    responses = create_app(Settings()).openapi()["paths"][path]["head"]["responses"]
    assert "204" in responses
    assert "200" not in responses


def test_readiness_shows_its_backlog_to_whom_the_metrics_policy_admits() -> None:
    """The delivery backlog says when requests are sent and how many, as the metrics do (from
    review): /readyz is public for its status, and its details are /metrics' policy's."""
    ready = [route for route in api_routes() if route.path == "/readyz"]
    assert sorted(method for route in ready for method in route.methods) == ["GET", "HEAD"]
    for route in ready:
        (marker,) = _markers(route)
        assert isinstance(marker, PublicWithDetails)
        assert marker.policy is METRICS

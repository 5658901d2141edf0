"""Acceptance 1: the authorisation matrix, generated from the application's own routes.

Every route of `app.main.ROUTERS`, crossed with {no token, expired, revoked, each role, two
roles held explicitly}, gets the status its declared policy implies. A route added tomorrow
is in the matrix without anyone editing this file; one without a policy fails
tests/test_routes.py.
"""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.routing import APIRoute

from app.deps import Policy, Public, PublicWithDetails
from app.localnodes import LocalNode
from tests.security.conftest import CREDENTIALS, headers
from tests.test_routes import api_routes

PATH_VALUES = {"request_id": "0" * 32, "msg_id": "0" * 32}
REFUSED = {"none": "missing_token", "expired": "expired_token", "revoked": "revoked_token"}


def _policy(route: APIRoute) -> Policy | Public:
    for dependency in route.dependant.dependencies:
        if isinstance(dependency.call, Policy | Public):
            return dependency.call
    raise AssertionError(f"{route.path} declares no policy")


def _concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: PATH_VALUES.get(match.group(1), "1"), path)


CASES = [
    pytest.param(route, method, credential, id=f"{method} {route.path} [{credential}]")
    for route in api_routes()
    for method in sorted(route.methods)
    for credential in CREDENTIALS
]


def expected(route: APIRoute, credential: str) -> str:
    """'allowed', or the error code the route must answer."""
    policy = _policy(route)
    if isinstance(policy, PublicWithDetails) and credential in REFUSED and credential != "none":
        return REFUSED[credential]  # public (/readyz), but a token sent is authenticated
    if isinstance(policy, Public):
        return "allowed"
    if credential in REFUSED:
        return REFUSED[credential]
    held = set(credential.split("+"))
    return "allowed" if held & {role.value for role in policy.roles} else "forbidden"


@pytest.mark.parametrize(("route", "method", "credential"), CASES)
def test_route_answers_each_credential_as_its_policy_says(
    matrix_node: LocalNode, route: APIRoute, method: str, credential: str
) -> None:
    body = {} if method in {"POST", "PUT", "PATCH"} else None
    response = httpx.request(
        method,
        matrix_node.url + _concrete(route.path),
        headers=headers(matrix_node, credential),
        json=body,
        timeout=30.0,
    )
    outcome = expected(route, credential)
    if outcome == "allowed":
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text
    else:
        status = 403 if outcome == "forbidden" else 401
        assert response.status_code == status, response.text
        if method != "HEAD":  # an answer to HEAD has no body
            assert response.json()["error"] == outcome


def _protected(prefix: str) -> list[APIRoute]:
    return [route for route in api_routes() if route.path.startswith(prefix)]


def test_the_matrix_covers_the_separation_of_duties() -> None:
    """The policies themselves: what the matrix then proves against the running app."""
    audit = _protected("/api/v1/audit")
    content = [
        route for route in _protected("/api/v1/requests/{request_id}") if "GET" in route.methods
    ]
    assert audit
    assert {route.path for route in content} >= {
        "/api/v1/requests/{request_id}",
        "/api/v1/requests/{request_id}/messages/{msg_id}/attachments/{index}",
    }
    for route in audit:
        assert expected(route, "officer") == "forbidden", route.path
    for route in content:
        assert expected(route, "auditor") == "forbidden", route.path
        assert expected(route, "admin") == "forbidden", route.path
        assert expected(route, "officer") == "allowed", route.path
    # The counters say when envelopes arrive: a scraper's token or an operator's, and the
    # scraper's opens nothing else (from a security review).
    for route in api_routes():
        if route.path == "/metrics":
            assert [expected(route, role) for role in ("monitor", "admin")] == ["allowed"] * 2
            assert [expected(route, role) for role in ("officer", "auditor", "none")] == [
                "forbidden",
                "forbidden",
                "missing_token",
            ]
        elif route.path == "/readyz":  # public; its backlog: tests/security/test_readyz_access
            assert [expected(route, role) for role in ("none", "officer", "monitor")] == [
                "allowed"
            ] * 3
            assert [expected(route, role) for role in ("expired", "revoked")] == [
                "expired_token",
                "revoked_token",
            ]
        elif not isinstance(_policy(route), Public):
            assert expected(route, "monitor") == "forbidden", route.path
    assert len(CASES) >= len(CREDENTIALS) * 20


def test_officer_cannot_read_the_audit_log_nor_auditor_and_admin_a_request(
    matrix_node: LocalNode,
) -> None:
    client = httpx.Client(base_url=matrix_node.url, timeout=30.0)
    node = matrix_node
    assert client.get("/api/v1/audit", headers=headers(node, "officer")).status_code == 403
    assert client.get("/api/v1/audit", headers=headers(node, "auditor")).status_code == 200
    for credential in ("auditor", "admin"):
        for path in (
            f"/api/v1/requests/{'0' * 32}",
            f"/api/v1/requests/{'0' * 32}/messages/{'0' * 32}/attachments/1",
            "/api/v1/requests",
        ):
            response = client.get(path, headers=headers(node, credential))
            assert (response.status_code, response.json()["error"]) == (403, "forbidden")
    # Holding two roles works only because the client was created with both.
    both = headers(node, "officer+auditor")
    assert client.get("/api/v1/audit", headers=both).status_code == 200
    assert client.get("/api/v1/requests", headers=both).status_code == 200
    client.close()


def test_clients_list_shows_expiry_and_revocation(matrix_node: LocalNode) -> None:
    listed = matrix_node.cli("clients", "list").stdout
    lines = {line.split("\t")[0]: line for line in listed.splitlines()}
    assert "\texpired\texpires 20" in lines["short-lived"]
    assert "\trevoked\t" in lines["revoked"]
    assert lines["officer"].endswith("\tactive\texpires never")

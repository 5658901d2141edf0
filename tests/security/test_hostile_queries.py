"""Query parameters and small bodies that a schema lets through but a database may not take:
moments that UTC cannot hold, NUL characters (PostgreSQL refuses them in text), host names
IDNA refuses. Each is a 4xx with a code, on both backends, never a 500."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from app.localnodes import LocalNode
from tests.conftest import BACKENDS, make_databases
from tests.e2e.conftest import audit_details

FAR_EAST = quote("0001-01-01T00:00:00+14:00")
FAR_WEST = quote("9999-12-31T23:00:00-05:00")
CURSOR = base64.urlsafe_b64encode(b"0001-01-01T00:00:00+14:00|x").decode()
NUL_CURSOR = base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|\x00").decode()


@pytest.fixture(scope="module", params=BACKENDS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    url = databases.new("es", migrated=True)
    local = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path_factory.mktemp("es"), url)
    try:
        local.init(clients={role: (role,) for role in ("admin", "officer", "auditor")})
        local.start()
        yield local
    finally:
        local.stop()
        databases.drop_all()


@pytest.mark.parametrize(
    ("role", "target"),
    [
        ("officer", f"/api/v1/requests?due_before={FAR_EAST}"),
        ("officer", f"/api/v1/requests?due_before={FAR_WEST}"),
        ("officer", f"/api/v1/requests?cursor={CURSOR}"),
        ("officer", f"/api/v1/requests?cursor={NUL_CURSOR}"),
        ("officer", "/api/v1/requests?status=%00"),
        ("officer", "/api/v1/requests?status=executd"),  # misspelt: was an empty page
        ("officer", "/api/v1/requests?peer=%00"),
        ("auditor", f"/api/v1/audit?since={FAR_EAST}"),
        ("auditor", f"/api/v1/audit?until={FAR_WEST}"),
        ("auditor", "/api/v1/audit?actor=%00"),
        ("auditor", "/api/v1/audit?action=%00"),
        ("auditor", "/api/v1/audit?peer=%00"),
        ("auditor", "/api/v1/audit?outcome=%00"),
        ("auditor", "/api/v1/audit/witnessed?peer=%00"),
        ("admin", "/api/v1/admin/deliveries?peer=%00"),
    ],
)
def test_unstorable_query_values_are_4xx(node: LocalNode, role: str, target: str) -> None:
    with node.client(role) as http:
        response = http.get(target)
    assert 400 <= response.status_code < 500, (target, response.status_code, response.text)
    assert response.json()["error"] in {"invalid_request", "invalid_cursor", "invalid_value"}


@pytest.mark.parametrize("url", ["https://a..b", "https://xn--a.com", "https://\u2488.com"])
def test_host_names_idna_refuses_are_refused_and_audited(node: LocalNode, url: str) -> None:
    with node.client("admin") as http:
        response = http.post("/api/v1/admin/peers", json={"url": url, "fingerprint": "00" * 32})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_peer_url"
    assert audit_details(node, "peer.add")[-1]["outcome"] == "invalid_peer_url"


def test_a_refused_peer_url_never_records_its_password(node: LocalNode) -> None:
    with node.client("admin") as http:
        for url in (
            "https://user:hunter2@x.invalid",
            "ftp://user:hunter2@x.invalid",
            "https://admin:hunter2@[::1",  # no parser takes it
            "https://user:hunter2/x@x.invalid",  # a "/" puts the "@" in the path
        ):
            response = http.post("/api/v1/admin/peers", json={"url": url, "fingerprint": "00" * 32})
            assert response.status_code == 400, response.text
            assert "hunter2" not in response.text
    recorded = json.dumps(audit_details(node, "peer.add"))
    assert "hunter2" not in recorded


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/api/v1/admin/deliveries?cursor=3000000000"),
        ("POST", "/api/v1/admin/deliveries/3000000000/retry"),
        ("POST", "/api/v1/admin/deliveries/4611686018427387904/cancel"),
    ],
)
def test_delivery_ids_past_the_columns_range_are_refused_alike(
    node: LocalNode, method: str, target: str
) -> None:
    """A delivery id is an INTEGER (four bytes on PostgreSQL): past its range, PostgreSQL
    answered 400 invalid_value where SQLite found no such row (from review). Both 422 now."""
    with node.client("admin") as http:
        response = http.request(method, target)
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    "arguments",
    [
        ("deliveries", "retry", "3000000000"),
        ("deliveries", "cancel", "0"),
        ("deliveries", "list", "--limit", "-2"),
        ("deliveries", "list", "--limit", "99999999999999999999"),
        ("deliveries", "list", "--stuck-minutes", "9999999999"),
    ],
)
def test_delivery_commands_refuse_values_out_of_range_alike(
    node: LocalNode, arguments: tuple[str, ...]
) -> None:
    """PostgreSQL gave a traceback, SQLite "no delivery" or every row (from review)."""
    result = node.cli(*arguments, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Invalid value" in result.stderr

"""Whose address a node records and throttles: X-Forwarded-For is believed only from the
proxies named in ENTRAIDE_TRUSTED_PROXIES (app/config.py, app/nodeproc.py `serve`).

From review: `serve` left uvicorn's default, which believes X-Forwarded-For from 127.0.0.1,
so any process reaching the node's port from loopback chose the address of its audit
entries, guessed tokens under a new address each time (never blocked), and got a real
officer's address blocked by failing in its name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.config import trusted_proxy_hosts
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry
from tests.security.conftest import new_node, prepare

LIMIT = 5  # failed authentications an address may make before it is blocked


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, LocalNode]]:
    base = tmp_path_factory.mktemp("forwarded")
    plain = new_node(base, "ES/MJ", ENTRAIDE_AUTH_FAILURE_LIMIT=str(LIMIT))
    proxied = new_node(
        base, "FR/MJ", ENTRAIDE_AUTH_FAILURE_LIMIT=str(LIMIT), ENTRAIDE_TRUSTED_PROXIES="127.0.0.1"
    )
    try:
        prepare([plain, proxied])
        yield plain, proxied
    finally:
        plain.stop()
        proxied.stop()


def _failed_actors(node: LocalNode) -> list[str]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.scalars(
                select(AuditEntry.actor)
                .where(AuditEntry.action == "auth.failed")
                .order_by(AuditEntry.idx)
            )
            return list(rows)
    finally:
        engine.dispose()


def _guess(node: LocalNode, forwarded_for: str) -> httpx.Response:
    return httpx.get(
        node.url + "/api/v1/requests",
        headers={"authorization": "Bearer not-a-token", "x-forwarded-for": forwarded_for},
    )


def test_without_a_trusted_proxy_the_connections_address_is_recorded_and_blocked(
    nodes: tuple[LocalNode, LocalNode],
) -> None:
    plain, _ = nodes
    answers = [_guess(plain, f"198.51.100.{n}").status_code for n in range(1, LIMIT + 3)]
    assert answers[:LIMIT] == [401] * LIMIT
    assert answers[-1] == 429  # a new made-up address each time did not escape the limit
    assert set(_failed_actors(plain)) == {"address:127.0.0.1"}


def test_a_named_proxys_forwarded_address_is_the_one_recorded(
    nodes: tuple[LocalNode, LocalNode],
) -> None:
    _, proxied = nodes
    assert _guess(proxied, "203.0.113.9").status_code == 401
    assert _failed_actors(proxied)[-1] == "address:203.0.113.9"
    # One address's failures block that address, not the proxy's other clients.
    for _ in range(LIMIT + 1):
        _guess(proxied, "203.0.113.66")
    assert _guess(proxied, "203.0.113.66").status_code == 429
    with proxied.client("officer") as http:
        assert (
            http.get("/api/v1/requests", headers={"x-forwarded-for": "203.0.113.10"}).status_code
            == 200
        )


def test_a_trusted_proxy_that_is_no_address_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    node = new_node(tmp_path, "DE/BFJ", ENTRAIDE_TRUSTED_PROXIES="127.0.0.1,proxy.example")
    done = node.cli("serve", "--port", "1", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: ENTRAIDE_TRUSTED_PROXIES: Value error, 'proxy.example' is not an IP address or "
        "network: list the reverse proxies' addresses, comma-separated (e.g. "
        "127.0.0.1,10.0.0.0/24)"
    ]


def test_ipv4_proxies_are_trusted_in_their_ipv6_mapped_form_too() -> None:
    """From review: a node listening on `::` sees a proxy at 127.0.0.1 as ::ffff:127.0.0.1,
    which uvicorn compared literally: nothing was believed from the proxy the operator named."""
    hosts = trusted_proxy_hosts("127.0.0.1,10.0.0.0/24,::1")
    assert hosts == [
        "127.0.0.1",
        "::ffff:127.0.0.1/128",
        "10.0.0.0/24",
        "::ffff:10.0.0.0/120",
        "::1",
    ]
    mapped = ipaddress.ip_address("::ffff:10.0.0.77")
    assert any(
        "/" in host and mapped in ipaddress.ip_network(host) for host in hosts if ":" in host
    )
    assert trusted_proxy_hosts("") == []

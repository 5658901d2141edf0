"""Bodies that stall, trickle or stop half-way on the routes whose body the node reads whole
before the route runs (every JSON route; app/main.py's `LimitsAndHeaders`).

From review: eight connections that declared 32 MiB, sent 30 MiB each and went silent held
250 MB of a node, unanswered and on no record, for as long as they stayed open. Such a body
is now refused `408 body_timeout` once it sends nothing for the idle period the streamed
routes use (twice the peer timeout), or once it falls behind the slowest rate a body may
arrive at; the refusal is on record and the connection closed. A client that leaves mid-body
is counted 499 (its own going), not 500 (a fault of the node).
"""

from __future__ import annotations

import json
import re
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select as select_rows

from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry
from tests.conftest import BACKENDS, make_databases

# ENTRAIDE_PEER_TIMEOUT_SECONDS=0.5: a body silent for 2 x 0.5 s is refused.
IDLE_SECONDS = 1.0
BUFFERED_P2P_ROUTES = ("/p2p/v1/envelopes", "/p2p/v1/envelopes/batch", "/p2p/v1/evidence/envelopes")


@pytest.fixture(scope="module", params=BACKENDS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    ar = LocalNode(
        "AR/MPF",
        "Ministerio Publico Fiscal",
        tmp_path_factory.mktemp("nodes") / "ar",
        databases.new("ar"),
        extra_env={"ENTRAIDE_PEER_TIMEOUT_SECONDS": str(IDLE_SECONDS / 2)},
    )
    try:
        ar.init(clients={"officer": ("officer",)})
        ar.start()
        yield ar
    finally:
        ar.stop()
        databases.drop_all()


def _open(node: LocalNode, path: str, length: int, *headers: str) -> socket.socket:
    """A request's head, declaring `length` bytes of body, and none of them yet."""
    connection = socket.create_connection(("127.0.0.1", node.port), timeout=15)
    lines = [
        f"POST {path} HTTP/1.1",
        "host: 127.0.0.1",
        "content-type: application/json",
        f"content-length: {length}",
        *headers,
    ]
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return connection


def _answer(connection: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """The whole answer, read until the node closes the connection (a timeout otherwise)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (field.partition(":") for field in fields)
    }
    return int(status_line.split()[1]), headers, json.loads(body)


def _refusals(node: LocalNode, action: str, outcome: str) -> list[dict[str, Any]]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            entries = connection.scalars(
                select_rows(AuditEntry.entry)
                .where(AuditEntry.action == action, AuditEntry.outcome == outcome)
                .order_by(AuditEntry.idx)
            )
            return [json.loads(entry) for entry in entries]
    finally:
        engine.dispose()


@pytest.mark.parametrize("path", BUFFERED_P2P_ROUTES)
def test_a_silent_body_is_refused_408_on_record_and_let_go(node: LocalNode, path: str) -> None:
    before = len(_refusals(node, "envelope.refused", "body_timeout"))
    declared = 32 * 1024 * 1024 - 1
    connection = _open(node, path, declared)
    try:
        connection.sendall(b'{"v": 1, "header": "' + b"A" * (1024 * 1024))
        sent = time.monotonic()
        status, headers, body = _answer(connection)  # ends: the node closed the connection
        waited = time.monotonic() - sent
    finally:
        connection.close()
    assert status == 408, body
    assert body["error"] == "body_timeout"
    assert f"nothing for {IDLE_SECONDS:g} s" in body["detail"]
    assert headers["connection"] == "close"
    assert IDLE_SECONDS * 0.9 <= waited < IDLE_SECONDS + 5
    # Counted against the address and audited, as a body too large is.
    entries = _refusals(node, "envelope.refused", "body_timeout")
    assert len(entries) == before + 1
    assert entries[-1]["actor"] == "address:127.0.0.1"
    assert entries[-1]["details"]["code"] == "body_timeout"


def test_a_trickling_body_is_refused_408_once_behind_the_slowest_rate(node: LocalNode) -> None:
    """One byte every quarter second never leaves the body silent for the idle period, yet
    falls behind the slowest rate a body may arrive at (after an allowance of that period)."""
    before = len(_refusals(node, "envelope.refused", "body_timeout"))
    connection = _open(node, "/p2p/v1/envelopes", 10_000)
    started = time.monotonic()
    try:
        while not select.select([connection], [], [], 0.25)[0]:
            assert time.monotonic() - started < 15, "the trickle was never refused"
            connection.sendall(b" ")
        status, _, body = _answer(connection)
    finally:
        connection.close()
    assert status == 408, body
    assert body["error"] == "body_timeout"
    assert "bytes per second" in body["detail"]
    assert time.monotonic() - started < IDLE_SECONDS + 5
    assert len(_refusals(node, "envelope.refused", "body_timeout")) == before + 1


def test_a_silent_body_on_the_local_api_is_refused_408_on_record(node: LocalNode) -> None:
    before = len(_refusals(node, "api.refused", "body_timeout"))
    token = f"authorization: Bearer {node.tokens['officer']}"
    connection = _open(node, "/api/v1/requests", 100_000, token)
    try:
        connection.sendall(b'{"document": {')
        status, _, body = _answer(connection)
    finally:
        connection.close()
    assert status == 408, body
    assert body["error"] == "body_timeout"
    entries = _refusals(node, "api.refused", "body_timeout")
    assert len(entries) == before + 1
    assert entries[-1]["actor"] == "client:officer"
    assert entries[-1]["details"] == {"route": "POST /api/v1/requests", "status": 408}


def _served(node: LocalNode, path: str, status: int) -> float:
    text = httpx.get(node.url + "/metrics", timeout=10).text
    series = re.escape(
        f'entraide_http_requests_total{{method="POST",route="{path}",status="{status}"}}'
    )
    found = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("path", BUFFERED_P2P_ROUTES)
def test_a_client_that_leaves_mid_body_is_counted_499_not_500(node: LocalNode, path: str) -> None:
    left, failed = _served(node, path, 499), _served(node, path, 500)
    connection = _open(node, path, 100)
    connection.sendall(b'{"v": 1')
    time.sleep(0.3)
    connection.close()
    deadline = time.monotonic() + 10
    while _served(node, path, 499) == left:
        assert time.monotonic() < deadline, "the client's going was not counted as 499"
        time.sleep(0.1)
    assert _served(node, path, 499) == left + 1
    assert _served(node, path, 500) == failed
    # The access log says so too.
    log = node.log_path.read_text()
    assert f"POST {path} 499" in log
    assert f"POST {path} 500" not in log


def test_a_head_refused_as_malformed_carries_its_code_in_a_header(node: LocalNode) -> None:
    """Section 8.5: an answer to HEAD has no body, so a refusal's code is in `Entraide-Error`;
    a path that does not validate was a bare 422."""
    answer = httpx.head(node.url + "/p2p/v1/evidence/envelopes/not-an-id/parts/64", timeout=10)
    assert answer.status_code == 422
    assert answer.headers["entraide-error"] == "invalid_request"

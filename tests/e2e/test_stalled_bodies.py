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

import contextlib
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

from app.config import Settings
from app.db import make_engine
from app.localnodes import LocalNode
from app.main import create_app
from app.models import AuditEntry
from tests.conftest import BACKENDS, make_databases
from tests.e2e.conftest import wait_for

# ENTRAIDE_PEER_TIMEOUT_SECONDS=0.5: a body silent for 2 x 0.5 s is refused.
IDLE_SECONDS = 1.0
BUFFERED_P2P_ROUTES = ("/p2p/v1/envelopes", "/p2p/v1/envelopes/batch", "/p2p/v1/evidence/envelopes")


@pytest.fixture(scope="module", params=BACKENDS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    yield from _serving(
        request,
        tmp_path_factory,
        {"ENTRAIDE_PEER_TIMEOUT_SECONDS": str(IDLE_SECONDS / 2)},
        clients={"officer": ("officer",)},
    )


def _serving(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    env: dict[str, str],
    clients: dict[str, tuple[str, ...]] | None = None,
) -> Iterator[LocalNode]:
    """AR/MPF with these settings, on the fixture's backend, until the module ends."""
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    ar = LocalNode(
        "AR/MPF",
        "Ministerio Publico Fiscal",
        tmp_path_factory.mktemp("nodes") / "ar",
        databases.new("ar", migrated=True),
        extra_env=env,
    )
    try:
        ar.init(clients={**(clients or {}), "monitor": ("monitor",)})  # for node.metrics()
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


def _documented(path: str, method: str = "post") -> set[str]:
    """The statuses the node's OpenAPI description lists for this operation."""
    return set(create_app(Settings()).openapi()["paths"][path][method]["responses"])


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
    assert "408" in _documented(path)  # from review: the description did not list it
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
    assert "408" in _documented("/api/v1/requests")
    entries = _refusals(node, "api.refused", "body_timeout")
    assert len(entries) == before + 1
    assert entries[-1]["actor"] == "client:officer"
    assert entries[-1]["details"] == {"route": "POST /api/v1/requests", "status": 408}


def _served(node: LocalNode, path: str, status: int) -> float:
    text = node.metrics().text
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


def _counted(node: LocalNode, code: str) -> float:
    text = node.metrics().text
    series = re.escape(f'entraide_envelopes_refused_total{{code="{code}"}}')
    found = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_peer_body_refused_before_its_route_is_counted_as_a_refused_envelope(
    node: LocalNode,
) -> None:
    """From review: the routes' refusals were counted in entraide_envelopes_refused_total,
    not a peer's body refused 408 or 413 before the route ran, though audited alike; a local
    API caller's is not a peer's envelope, and not counted there."""
    stalled, large = _counted(node, "body_timeout"), _counted(node, "too_large")
    connection = _open(node, "/p2p/v1/envelopes", 100_000)
    try:
        connection.sendall(b'{"v": 1, "header": "')
        assert _answer(connection)[0] == 408
    finally:
        connection.close()
    connection = _open(node, "/p2p/v1/envelopes", 10**9)  # declared over the limit
    try:
        assert _head_and_body(connection)[0] == 413
    finally:
        connection.close()
    assert _counted(node, "body_timeout") == stalled + 1
    assert _counted(node, "too_large") == large + 1
    token = f"authorization: Bearer {node.tokens['officer']}"
    connection = _open(node, "/api/v1/requests", 100_000, token)
    try:
        connection.sendall(b'{"document": {')
        assert _answer(connection)[0] == 408
    finally:
        connection.close()
    assert _counted(node, "body_timeout") == stalled + 1


def test_a_head_refused_as_malformed_carries_its_code_in_a_header(node: LocalNode) -> None:
    """Section 8.5: an answer to HEAD has no body, so a refusal's code is in `Entraide-Error`;
    a path that does not validate was a bare 422."""
    answer = httpx.head(node.url + "/p2p/v1/evidence/envelopes/not-an-id/parts/64", timeout=10)
    assert answer.status_code == 422
    assert answer.headers["entraide-error"] == "invalid_request"


# Answers given before the body was read whole close the connection: else the server reads
# the rest of the body to reuse it, and one byte of it cancels uvicorn's keep-alive timer,
# which nothing re-arms (from review: the connection stayed open for good).
EARLY_REFUSALS = (
    ("/api/v1/requests", 1000, 401, "missing_token"),  # no Authorization header
    ("/p2p/v1/envelopes", 10**9, 413, "too_large"),  # declared over the limit
    ("/p2p/v1/envelopes?x=%00", 1000, 400, "invalid_request"),  # a NUL in the query
)


def _head_and_body(connection: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One answer, read to the end of its declared length (not to the connection's end)."""
    received = b""
    while True:
        head, separator, body = received.partition(b"\r\n\r\n")
        if separator:
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            assert length is not None, head
            if len(body) >= int(length.group(1)):
                break
        chunk = connection.recv(65536)
        assert chunk, "the node closed the connection before its answer"
        received += chunk
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (field.partition(":") for field in fields)
    }
    return int(status_line.split()[1]), headers, json.loads(body)


def _closed_within(connection: socket.socket, seconds: float) -> bool:
    connection.settimeout(seconds)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize(("path", "length", "status", "code"), EARLY_REFUSALS)
def test_an_early_refusal_closes_the_connection(
    node: LocalNode, path: str, length: int, status: int, code: str
) -> None:
    connection = _open(node, path, length)
    try:
        connection.sendall(b"{")
        answer = _head_and_body(connection)
        assert answer[0] == status, answer
        assert answer[2]["error"] == code
        assert answer[1]["connection"] == "close"
        time.sleep(0.2)
        with contextlib.suppress(OSError):  # the node may have closed it already
            connection.sendall(b" ")
        # Closed now, not after uvicorn's 5 s keep-alive (nor never, as the byte made it).
        assert _closed_within(connection, 3.0), "the connection was left open"
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/healthz", 405),
        ("POST", "/.well-known/entraide/node", 405),
        ("POST", "/no/such/path", 404),
        ("GET", "/p2p/v1/envelopes", 405),
        ("DELETE", "/p2p/v1/envelopes", 405),
        ("GET", "/healthz", 200),
    ],
)
def test_a_body_no_route_takes_is_not_read(
    node: LocalNode, method: str, path: str, status: int
) -> None:
    """Only bodies of POST, PUT and PATCH to /api/v1/ and /p2p/ are read before the route
    runs. Any other request goes to its route at once, its body unread (the node waited up to
    the idle period for up to 32 MiB of it, and refused it 408, on no record); the answer
    closes the connection, whose unread body cannot precede another request."""
    connection = socket.create_connection(("127.0.0.1", node.port), timeout=15)
    try:
        connection.sendall(
            f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            "content-type: application/json\r\ncontent-length: 1048576\r\n\r\n{".encode()
        )
        started = time.monotonic()
        answer = _head_and_body(connection)
        assert answer[0] == status, answer
        assert time.monotonic() - started < IDLE_SECONDS  # not read: no idle period waited
        assert answer[1]["connection"] == "close"
        assert _closed_within(connection, 3.0), "the connection was left open"
    finally:
        connection.close()
    # A request without a body keeps its connection.
    with httpx.Client(base_url=node.url, timeout=10) as client:
        for _ in range(2):
            answer = client.get("/healthz")
            assert answer.status_code == 200
            assert "connection" not in answer.headers


# A node with a small body limit and memory budget: 64 KiB bodies, 192 KiB held at most, and
# so 96 KiB per source address. Its idle period (10 s) outlasts the test.
SMALL_BODY = 64 * 1024
BUDGET = 3 * SMALL_BODY
HELD = 60 * 1024


@pytest.fixture(scope="module", params=BACKENDS)
def small_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    yield from _serving(
        request,
        tmp_path_factory,
        {
            "ENTRAIDE_PEER_TIMEOUT_SECONDS": "5",
            "ENTRAIDE_MAX_BODY_BYTES": str(SMALL_BODY),
            "ENTRAIDE_MAX_BUFFERED_BODY_BYTES": str(BUDGET),
        },
    )


def _held_bytes(node: LocalNode) -> float:
    text = node.metrics().text
    found = re.search(r"^entraide_buffered_body_bytes (\S+)$", text, re.MULTILINE)
    assert found is not None, "no entraide_buffered_body_bytes gauge"
    return float(found.group(1))


def _wait_held(node: LocalNode, expected: int) -> None:
    deadline = time.monotonic() + 10
    while (held := _held_bytes(node)) != expected:
        assert time.monotonic() < deadline, f"{held} bytes held, not {expected}"
        time.sleep(0.05)


def _send_from(node: LocalNode, source: str, declared: int, sent: bytes) -> socket.socket:
    """A P2P post from `source` (any 127.0.0.0/8 address reaches the node on loopback)."""
    connection = socket.create_connection(
        ("127.0.0.1", node.port), timeout=15, source_address=(source, 0)
    )
    connection.sendall(
        f"POST /p2p/v1/envelopes HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-type: application/json\r\ncontent-length: {declared}\r\n\r\n".encode()
        + sent
    )
    return connection


def _hold(node: LocalNode, source: str) -> socket.socket:
    """Most of a body, the rest never sent: the node holds what came."""
    return _send_from(node, source, SMALL_BODY, b'{"v": 1, "header": "' + b"A" * (HELD - 20))


def _busy(connection: socket.socket) -> None:
    try:
        status, headers, body = _answer(connection)  # ends: the node closed the connection
    finally:
        connection.close()
    assert status == 503, body
    assert body["error"] == "busy"
    assert headers["retry-after"] == "10"  # the idle period: a stalled body is gone by then
    assert headers["connection"] == "close"
    documented = create_app(Settings()).openapi()["paths"]["/p2p/v1/envelopes"]["post"]
    assert "Retry-After" in documented["responses"]["503"]["headers"]


def test_bodies_held_in_memory_are_bounded_per_source_and_in_all(small_node: LocalNode) -> None:
    """From review: a body sent almost whole, then a byte per idle period, held its memory
    for about 18 minutes, and as many connections as a client opened held as many bodies.
    Bodies held at once are now bounded (ENTRAIDE_MAX_BUFFERED_BODY_BYTES, half of it per
    source address): past that, 503 busy, what was read dropped, the connection closed, and
    no refusal recorded against the address (it is load, not bad input)."""
    node = small_node
    refused = len(_refusals(node, "envelope.refused", "busy"))
    all_refused = len(_refusals_any(node))
    held = [_hold(node, "127.0.0.1")]
    try:
        _wait_held(node, HELD)
        # The source's share (96 KiB) cannot take a second body of 60 KiB.
        _busy(_hold(node, "127.0.0.1"))
        _wait_held(node, HELD)  # what the refused body had sent is dropped
        held.append(_hold(node, "127.0.0.2"))
        _wait_held(node, 2 * HELD)
        held.append(_hold(node, "127.0.0.3"))
        _wait_held(node, 3 * HELD)
        # The whole budget (192 KiB) cannot take a fourth, from a source holding nothing.
        _busy(_hold(node, "127.0.0.4"))
        _wait_held(node, 3 * HELD)
        # The log names who holds the most, not only the caller turned away (its victim).
        wait_for(
            "the busy warning",
            lambda: "(503 busy)" in node.log_path.read_text(errors="replace"),
        )
        warning = next(
            line
            for line in node.log_path.read_text(errors="replace").splitlines()
            if "request body from 127.0.0.4 refused (503 busy)" in line
        )
        assert "bytes, by 127.0.0." in warning
        # A client that leaves frees what it held; the next body is read and handled.
        held.pop(0).close()
        _wait_held(node, 2 * HELD)
        envelope = json.dumps(
            {"v": 1, "header": "A" * (HELD - 100), "signature": "", "parts": []}
        ).encode()
        late = _send_from(node, "127.0.0.4", len(envelope), envelope)
        status, _, body = _head_and_body(late)
        late.close()
        assert status not in (408, 503), body  # the route's own answer to this non-envelope
        _wait_held(node, 2 * HELD)  # released once handled
    finally:
        for connection in held:
            connection.close()
    _wait_held(node, 0)
    assert len(_refusals(node, "envelope.refused", "busy")) == refused == 0
    # The late body's refusal by the route is the only one.
    assert len(_refusals_any(node)) == all_refused + 1


def _refusals_any(node: LocalNode) -> list[str]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            return list(
                connection.scalars(
                    select_rows(AuditEntry.outcome).where(AuditEntry.action == "envelope.refused")
                )
            )
    finally:
        engine.dispose()


def test_a_client_still_sending_its_body_gets_the_early_answer(node: LocalNode) -> None:
    """An answer given before the body's end closes the connection (above), but not with a
    reset while the client still sends: that discarded the answer it had not read yet (httpx
    raised `RemoteProtocolError` instead of giving the 413). The rest of the body is read and
    dropped after the answer, until the client stops (app/lingering.py)."""
    too_long = b"x" * (33 * 1024 * 1024)  # over the 32 MiB limit
    for _ in range(3):
        with httpx.Client(timeout=30) as http:
            answer = http.post(node.url + "/p2p/v1/envelopes", content=too_long)
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"] == "too_large"
        assert answer.headers["connection"] == "close"

"""Acceptance (issue 5, clients): failed authentications are audited and rate-limited per
source address and per client, across processes, and bound what anonymous callers can write.

Two `entraide serve` processes share one node's database: refusals counted by one count for
the other. Callers use distinct loopback source addresses (127.0.0.x) to stand for distinct
machines.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
from sqlalchemy import func, select

from app.db import make_engine
from app.localnodes import LocalNode, free_port
from app.models import AuditEntry, AuthThrottle
from tests.security.conftest import new_node

LIMIT = 4
LIMITS = {
    "ENTRAIDE_AUTH_FAILURE_LIMIT": str(LIMIT),
    "ENTRAIDE_AUTH_FAILURE_WINDOW_SECONDS": "120",
    "ENTRAIDE_AUTH_BLOCK_SECONDS": "90",
    "ENTRAIDE_P2P_REFUSAL_LIMIT": "3",
}


def client_from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30.0)


def count(node: LocalNode, action: str) -> int:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            statement = select(func.count()).select_from(AuditEntry)
            return int(connection.scalar(statement.where(AuditEntry.action == action)) or 0)
    finally:
        engine.dispose()


def throttle_row(node: LocalNode, key: str) -> AuthThrottle | None:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            statement = select(AuthThrottle).where(AuthThrottle.key == key)
            row = connection.execute(statement).one_or_none()
            return AuthThrottle(**row._asdict()) if row is not None else None
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, ...]]:
    first = new_node(tmp_path_factory.mktemp("throttle"), **LIMITS)
    # The LocalNode defaults lift the limits for other suites; these tests want them low.
    first.init(clients={"officer": ("officer",), "gone": ("officer",), "auditor": ("auditor",)})
    first.cli("clients", "revoke", "gone")
    second = replace(first, port=free_port(), process=None)
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_failures_from_one_address_are_limited_across_processes(
    two_processes: tuple[LocalNode, ...],
) -> None:
    first, second = two_processes
    bad = {"authorization": "Bearer ent_guessing"}
    with client_from("127.0.0.2") as http:
        # No credentials at all: refused, neither audited nor counted.
        assert http.get(first.url + "/api/v1/requests").status_code == 401
        statuses = [
            http.get(node.url + "/api/v1/requests", headers=bad).status_code
            for node in (first, second, first, second)
        ]
        assert statuses == [401] * LIMIT
        blocked = http.get(second.url + "/api/v1/requests", headers=bad)
        assert blocked.status_code == 429
        assert blocked.json()["error"] == "rate_limited"
        assert 0 < int(blocked.headers["retry-after"]) <= 90
        # Blocked means blocked: even a valid token is not looked at from this address.
        officer = {"authorization": f"Bearer {first.tokens['officer']}"}
        assert http.get(first.url + "/api/v1/requests", headers=officer).status_code == 429
        audited = count(first, "auth.failed")
        for _ in range(20):
            assert http.get(first.url + "/api/v1/requests", headers=bad).status_code == 429
    # Twenty more refusals, no more audit entries: only a counter moved.
    assert count(first, "auth.failed") == audited == LIMIT
    assert count(first, "auth.throttled") == 1
    row = throttle_row(first, "address:127.0.0.2")
    assert row is not None
    assert row.suppressed >= 21
    # Another address is not affected.
    with client_from("127.0.0.3") as http:
        assert http.get(second.url + "/api/v1/requests", headers=officer).status_code == 200


def test_a_revoked_clients_token_is_limited_whatever_the_address(
    two_processes: tuple[LocalNode, ...],
) -> None:
    first, second = two_processes
    revoked = {"authorization": f"Bearer {first.tokens['gone']}"}
    answers = []
    for number in range(LIMIT + 1):
        with client_from(f"127.0.1.{number + 1}") as http:
            node = (first, second)[number % 2]
            response = http.get(node.url + "/api/v1/audit", headers=revoked)
            answers.append((response.status_code, response.json()["error"]))
    assert answers[:LIMIT] == [(401, "revoked_token")] * LIMIT
    assert answers[LIMIT] == (429, "rate_limited")


def test_calls_outside_a_tokens_role_are_audited_then_limited(
    two_processes: tuple[LocalNode, ...],
) -> None:
    """An auditor reaching for request content is on record (they went unaudited), up to
    the limit; then answered 429 without an entry each, while its own work goes on."""
    first, second = two_processes
    auditor = {"authorization": f"Bearer {first.tokens['auditor']}"}
    before = count(first, "auth.forbidden")
    throttled_before = count(first, "auth.throttled")
    answers = []
    with client_from("127.0.3.1") as http:
        for number in range(LIMIT + 2):
            node = (first, second)[number % 2]
            response = http.get(node.url + "/api/v1/requests", headers=auditor)
            answers.append((response.status_code, response.json()["error"]))
        # What the role allows still works.
        assert http.get(first.url + "/api/v1/audit", headers=auditor).status_code == 200
    assert answers[:LIMIT] == [(403, "forbidden")] * LIMIT
    assert answers[LIMIT:] == [(429, "rate_limited")] * 2
    assert count(first, "auth.forbidden") == before + LIMIT
    assert count(first, "auth.throttled") == throttled_before + 1
    engine = make_engine(first.database_url)
    try:
        with engine.connect() as connection:
            entry = connection.scalar(
                select(AuditEntry.entry)
                .where(AuditEntry.action == "auth.forbidden")
                .order_by(AuditEntry.idx.desc())
                .limit(1)
            )
    finally:
        engine.dispose()
    assert entry is not None
    recorded = json.loads(entry)
    assert recorded["actor"] == "client:auditor"
    assert recorded["details"] == {"route": "GET /api/v1/requests", "requires": "officer"}


def test_refused_envelopes_from_one_address_stop_being_audited(
    two_processes: tuple[LocalNode, ...],
) -> None:
    first, second = two_processes
    before = count(first, "envelope.refused")
    with client_from("127.0.2.1") as http:
        statuses = [
            http.post(node.url + "/p2p/v1/envelopes", json={"v": 1}).status_code
            for node in (first, second, first)
        ]
        assert statuses == [400, 400, 400]
        for _ in range(10):
            response = http.post(second.url + "/p2p/v1/envelopes", json={"garbage": True})
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) > 0
    assert count(first, "envelope.refused") == before + 3
    with client_from("127.0.2.2") as http:
        response = http.post(first.url + "/p2p/v1/envelopes", json={"v": 1})
        assert (response.status_code, response.json()["error"]) == (400, "malformed_envelope")


def test_oversized_peer_bodies_are_counted_and_a_blocked_address_is_not_read(
    two_processes: tuple[LocalNode, ...],
) -> None:
    """From review: a body refused as too large on the peer API was neither audited nor
    counted, and a throttled address still had up to 32 MiB of each body read (and scanned)
    before its 429."""
    first, second = two_processes
    before = count(first, "envelope.refused")
    too_many_values = b"[" + b"1," * 300_000 + b"1]"  # within the size limit
    too_long = b"x" * (33 * 1024 * 1024)  # over the 32 MiB body limit
    with client_from("127.0.2.3") as http:
        statuses = [
            http.post(node.url + "/p2p/v1/envelopes", content=body).status_code
            for node, body in ((first, too_many_values), (second, too_long), (first, too_long))
        ]
        assert statuses == [413, 413, 413]
        assert count(first, "envelope.refused") == before + 3
        (refused,) = [
            json.loads(entry)
            for entry in _entries(first, "envelope.refused")
            if json.loads(entry)["actor"] == "address:127.0.2.3"
        ][:1]
        assert refused["outcome"] == "too_large"
    # Blocked: answered before the body is read. Sent as a head announcing 33 MiB and no
    # body: a server that read the body first would never answer (posting the 33 MiB, the
    # client could lose the answer to the reset of a connection closed mid-upload).
    status, headers = _answer_to_a_head(second.url, "127.0.2.3", len(too_long))
    assert status == 429
    assert int(headers["retry-after"]) > 0
    assert count(first, "envelope.refused") == before + 3


def _answer_to_a_head(url: str, source: str, length: int) -> tuple[int, dict[str, str]]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0)) as s:
        s.sendall(
            f"POST /p2p/v1/envelopes HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            data = s.recv(65536)
            assert data, "the connection closed before an answer"
            received += data
    head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = dict(line.split(":", 1) for line in head[1:])
    return int(head[0].split()[1]), {k.strip().lower(): v.strip() for k, v in fields.items()}


def test_a_blocked_address_costs_no_write_with_calls_refused_before_any_route(
    two_processes: tuple[LocalNode, ...],
) -> None:
    """Paths and methods the peer API does not have are counted against the address, and
    audited, until it is blocked; then answered with reads only (from review: each was a
    write transaction, which a caller could send without end at no cost of its own)."""
    first, _ = two_processes
    with client_from("127.0.2.4") as http:
        answers = [http.get(first.url + "/p2p/v1/nothing").status_code for _ in range(6)]
    assert set(answers) == {404}
    engine = make_engine(first.database_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                select(AuthThrottle.blocked_until, AuthThrottle.suppressed).where(
                    AuthThrottle.key == "p2p:127.0.2.4"
                )
            ).one()
    finally:
        engine.dispose()
    blocked_until, suppressed = row
    assert blocked_until is not None  # blocked by these refusals alone
    assert suppressed == 0  # and nothing written for those that came after
    audited = [
        json.loads(entry)
        for entry in _entries(first, "envelope.refused")
        if json.loads(entry)["actor"] == "address:127.0.2.4"
    ]
    assert audited
    assert all(entry["outcome"] == "not_found" for entry in audited)
    assert len(audited) < 6


def _entries(node: LocalNode, action: str) -> list[bytes]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            statement = select(AuditEntry.entry).where(AuditEntry.action == action)
            return list(connection.scalars(statement.order_by(AuditEntry.idx)))
    finally:
        engine.dispose()


MALFORMED_BODIES = [b"{not json", b'{"to": "FR/MJ", "to": "ES/MJ"}', b"[" * 5000 + b"]" * 5000]


def test_a_token_is_judged_before_a_body_that_does_not_parse(
    two_processes: tuple[LocalNode, ...],
) -> None:
    """From review: FastAPI parses a JSON body before it solves any dependency, so a revoked
    or a guessed token with a body that did not parse got `422` (or `400 invalid_json`): not
    refused, not counted, not on record, and an address blocked for its failures was still
    answered so, its bodies parsed in full. The token is judged first now."""
    first, second = two_processes
    before = count(first, "auth.failed")
    guessed = {"authorization": "Bearer ent_guessing_again"}
    answers = []
    with client_from("127.0.4.1") as http:
        for number, body in enumerate(MALFORMED_BODIES + MALFORMED_BODIES[:1]):
            node = (first, second)[number % 2]
            headers = {**guessed, "content-type": "application/json"}
            response = http.post(node.url + "/api/v1/requests", content=body, headers=headers)
            answers.append((response.status_code, response.json()["error"]))
        # Blocked: a valid token with a body that does not parse is not read either.
        officer = {"authorization": f"Bearer {first.tokens['officer']}"}
        blocked = http.post(first.url + "/api/v1/requests", content=b"{", headers=officer)
    assert answers == [(401, "invalid_token")] * LIMIT
    assert (blocked.status_code, blocked.json()["error"]) == (429, "rate_limited")
    assert count(first, "auth.failed") == before + LIMIT
    # A valid token: the body's own refusal, as before, and on record as the client's.
    with client_from("127.0.4.2") as http:
        officer_call = http.post(
            first.url + "/api/v1/requests",
            content=b"{not json",
            headers={**officer, "content-type": "application/json"},
        )
        auditor = {"authorization": f"Bearer {first.tokens['auditor']}"}
        outside_role = http.post(
            first.url + "/api/v1/requests",
            content=b"{not json",
            headers={**auditor, "content-type": "application/json"},
        )
    assert (officer_call.status_code, officer_call.json()["error"]) == (422, "invalid_request")
    # Outside its role: refused as such (429 once the auditor's refusals reached the limit,
    # as the test above leaves them), never a 422 for a body it may not send at all.
    assert (outside_role.status_code, outside_role.json()["error"]) in (
        (403, "forbidden"),
        (429, "rate_limited"),
    )

"""Acceptance (issue 5, hostile input): size limits on bodies and headers, strict schemas,
explicit error codes, closed CORS, and no input that produces a 500 — against a real node."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine
from app.localnodes import LocalNode
from app.main import SECURITY_HEADERS, create_app
from app.models import AuditEntry
from tests.security.conftest import headers, new_node, prepare

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    local = new_node(
        tmp_path_factory.mktemp("hostile"),
        ENTRAIDE_MAX_BODY_BYTES=str(MAX_BODY),
        ENTRAIDE_MAX_ENVELOPE_PARTS="4",
        ENTRAIDE_MAX_HEADER_BYTES="2048",
    )
    try:
        prepare([local])
        yield local
    finally:
        local.stop()


def _raw(node: LocalNode, request: bytes) -> bytes:
    """What the node answers to bytes no well-behaved client would send."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def _raw_to_close(node: LocalNode, request: bytes) -> bytes:
    """The whole answer to such bytes, the connection closed after it."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while data := sock.recv(4096):
            answer += data
        return answer


def _error(response: httpx.Response, status: int, code: str) -> None:
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert set(response.json()) <= {"error", "detail", "fields"}
    for name, value in SECURITY_HEADERS:
        assert response.headers.get(name.decode()) == value.decode()


def _refusals(node: LocalNode) -> list[tuple[str, str]]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(AuditEntry.action, AuditEntry.outcome)
                .where(AuditEntry.action.in_(("api.refused", "envelope.refused")))
                .order_by(AuditEntry.idx)
            ).all()
    finally:
        engine.dispose()
    return [(action, outcome) for action, outcome in rows]


def test_refusals_before_any_route_runs_are_on_record(node: LocalNode) -> None:
    """Refused before a route's own checks (which audit theirs): headers too large, a NUL
    in a peer's query, a method or a header the peer API does not take. A token holder's is
    an `api.refused` of its client, a peer API caller's counts against its address (from
    review: none of these were on record)."""
    before = len(_refusals(node))
    officer = headers(node, "officer")
    padded = {"x": "a" * 9000}
    refused = [
        httpx.get(node.url + "/api/v1/requests", params=padded, headers=officer),
        httpx.post(node.url + "/p2p/v1/envelopes", params=padded, json={}),
        httpx.post(node.url + "/p2p/v1/envelopes?x=%00", json={}),
        httpx.get(node.url + "/p2p/v1/envelopes"),
        httpx.put(
            node.url + "/p2p/v1/evidence/envelopes/xyz/parts/1",
            content=b"abc",
            headers={"upload-offset": "-5"},
        ),
    ]
    assert [(answer.status_code, answer.json().get("error")) for answer in refused] == [
        (413, "headers_too_large"),
        (413, "headers_too_large"),
        (400, "invalid_request"),
        (405, "method_not_allowed"),
        (422, "invalid_request"),
    ]
    assert _refusals(node)[before:] == [
        ("api.refused", "headers_too_large"),
        ("envelope.refused", "headers_too_large"),
        ("envelope.refused", "invalid_request"),
        ("envelope.refused", "method_not_allowed"),
        ("envelope.refused", "invalid_request"),
    ]


def test_bodies_over_the_limit_are_refused_before_anything_else(node: LocalNode) -> None:
    big = b"{" + b" " * MAX_BODY + b"}"
    # No token at all: refused before the body is read, so no work is done at all.
    _error(httpx.post(node.url + "/api/v1/requests", content=big), 401, "missing_token")
    # A token (even a wrong one): the size is checked first, so no authentication work.
    bearer = {"authorization": "Bearer ent_not-a-token"}
    _error(httpx.post(node.url + "/api/v1/requests", content=big, headers=bearer), 413, "too_large")
    _error(httpx.post(node.url + "/p2p/v1/envelopes", content=big), 413, "too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    _error(httpx.post(node.url + "/p2p/v1/envelopes", content=chunks()), 413, "too_large")
    lying = b"POST /p2p/v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"
    assert _raw(node, lying).startswith(b"HTTP/1.1 413")
    # A length that is no decimal number, or of more than 20 digits, never reaches the node:
    # the HTTP layer (h11) answers it 400 in plain text (docs/protocol.md section 9, step 1).
    for length in (b"abc", b"-1", b"+5", b"1e3", b"0x10", b"9" * 21):
        head = b"POST /p2p/v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
        answer = _raw_to_close(node, head + b"\r\n\r\n{}")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert answer.endswith(b"\r\n\r\nInvalid HTTP request received."), answer
    twenty = b"POST /p2p/v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 20
    assert _raw(node, twenty + b"\r\n\r\n").startswith(b"HTTP/1.1 413")


def test_headers_over_the_limit_are_refused(node: LocalNode) -> None:
    _error(
        httpx.get(node.url + "/healthz", headers={"x-padding": "a" * 9000}),
        413,
        "headers_too_large",
    )
    many = {f"x-h{number}": "v" * 90 for number in range(100)}
    _error(httpx.get(node.url + "/healthz", headers=many), 413, "headers_too_large")
    _error(httpx.get(node.url + "/healthz?" + "q=1&" * 2500), 413, "headers_too_large")
    # Beyond what the HTTP parser buffers at all: refused by the server, not a 500.
    response = httpx.get(node.url + "/healthz", headers={"x-padding": "a" * 70_000})
    assert 400 <= response.status_code < 500


def test_envelope_caps_apply_before_any_cryptography(node: LocalNode) -> None:
    parts = ["AAAA"] * 5
    wire = {"v": 1, "header": "e30=", "signature": "A" * 88, "parts": parts}
    _error(httpx.post(node.url + "/p2p/v1/envelopes", json=wire), 413, "too_large")
    wire = {"v": 1, "header": "A" * 4000, "signature": "A" * 88, "parts": ["AAAA"]}
    _error(httpx.post(node.url + "/p2p/v1/envelopes", json=wire), 413, "too_large")


def _closed_objects(schema: dict[str, Any]) -> list[str]:
    """Names of request-body object schemas that accept unknown members (should be none)."""
    components = schema["components"]["schemas"]
    seen: set[str] = set()
    open_ones: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str):
                name = reference.rsplit("/", 1)[1]
                if name not in seen:
                    seen.add(name)
                    target = components[name]
                    if target.get("type") == "object" and "properties" in target:
                        if target.get("additionalProperties") is not False:
                            open_ones.append(name)
                    walk(target)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in schema["paths"].values():
        for operation in path.values():
            walk(operation.get("requestBody", {}))
    return open_ones


def test_every_request_body_schema_refuses_unknown_fields() -> None:
    schema = create_app(Settings()).openapi()
    assert _closed_objects(schema) == []


def test_unknown_fields_and_wrong_types_are_422_without_echo(node: LocalNode) -> None:
    with node.client("officer") as http:
        response = http.post("/api/v1/requests", json={"to": "AR/MPF", "sneaky": "VALUE-X"})
        _error(response, 422, "invalid_request")
        assert "extra_forbidden" in {field["type"] for field in response.json()["fields"]}
        assert "VALUE-X" not in response.text
    with node.client("admin") as http:
        body = {"url": "http://127.0.0.1:1", "fingerprint": "00", "pin_anything": True}
        _error(http.post("/api/v1/admin/peers", json=body), 422, "invalid_request")


HOSTILE_BODIES: list[bytes] = [
    b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to exhaust a recursive parser
    b'{"to": ' + b"9" * 5000 + b"}",  # an integer too long to convert
    b"\xff\xfe{}",  # not UTF-8
    b'{"to": "\\ud800"}',  # a lone surrogate
    b"",
    b"null",
    json.dumps({"document": {"persons": [{}] * 5000}}).encode(),
]


@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
def test_hostile_bodies_never_cause_a_server_error(node: LocalNode, body: bytes) -> None:
    typed = {"content-type": "application/json"}
    for token, path in (
        ("officer", "/api/v1/requests"),
        ("officer", f"/api/v1/requests/{'0' * 32}/messages"),
        ("admin", "/api/v1/admin/peers"),
        (None, "/p2p/v1/envelopes"),
        (None, "/p2p/v1/envelopes/batch"),
    ):
        auth = headers(node, token) if token else {}
        response = httpx.post(node.url + path, content=body, headers={**typed, **auth}, timeout=30)
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
        assert response.json()["error"]


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "file:///etc/passwd",
        "http://user:secret@127.0.0.1:1",
        "http://127.0.0.1:1/?q=1",
        "http://127.0.0.1:1#x",
        "http://",
        "http://127.0.0.1:1",  # nothing listens there
        "http://[::1",
        "\x00",
    ],
)
def test_hostile_peer_urls_are_refused_with_a_code(node: LocalNode, url: str) -> None:
    with node.client("admin") as http:
        response = http.post("/api/v1/admin/peers", json={"url": url, "fingerprint": "00" * 32})
    assert response.status_code in (400, 502), response.text
    assert response.json()["error"] in {"invalid_peer_url", "peer_unreachable"}


@pytest.mark.parametrize(
    ("fingerprint", "says"),
    [
        ("1DBD", "this one has 4"),
        ("0" * 63, "this one has 63"),
        ("ab" * 32 + "0", "this one has 65"),
        ("z" * 64, "holds other characters"),
        ("AB:" * 31 + "ABCD", "this one has 66"),
        ("ab" * 31 + "a\u0431", "holds other characters"),  # a Cyrillic letter
    ],
)
def test_a_malformed_fingerprint_is_refused_before_the_peer_is_asked(
    node: LocalNode, fingerprint: str, says: str
) -> None:
    """It was checked only once the identity document was fetched: a typo gave
    `502 peer_unreachable` (nothing listens at port 9), or, from a reachable peer,
    `fingerprint_mismatch`, which tells the operator to doubt the peer's operator."""
    with node.client("admin") as http:
        response = http.post(
            "/api/v1/admin/peers", json={"url": "http://127.0.0.1:9", "fingerprint": fingerprint}
        )
    _error(response, 400, "invalid_fingerprint")
    assert "64 hexadecimal digits" in response.json()["detail"]
    assert says in response.json()["detail"]
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            outcome = connection.scalar(
                select(AuditEntry.outcome)
                .where(AuditEntry.action == "peer.add")
                .order_by(AuditEntry.idx.desc())
                .limit(1)
            )
    finally:
        engine.dispose()
    assert outcome == "invalid_fingerprint"  # on record, as every pinning refused
    done = node.cli("peers", "add", "http://127.0.0.1:9", "--fingerprint", fingerprint, check=False)
    assert done.returncode == 1
    assert says in done.stderr, done.stderr
    assert "could not reach" not in done.stderr


def test_cors_is_closed_and_methods_answer_with_allow(node: LocalNode) -> None:
    origin = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    preflight = httpx.options(node.url + "/api/v1/requests", headers=origin)
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers
    assert (
        "access-control-allow-origin"
        not in httpx.get(node.url + "/healthz", headers=origin).headers
    )
    wrong = httpx.request("DELETE", node.url + "/api/v1/requests")
    _error(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"]


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/requests/..%2f..%2fadmin",
        "/api/v1/requests/%00",
        "/api/v1/requests/" + "f" * 5000,
        "/p2p/v1/audit/consistency?first=-1&second=99999999999999999999999",
        "/%ff%fe",
    ],
)
def test_odd_targets_are_4xx(node: LocalNode, target: str) -> None:
    auth = f"Bearer {node.tokens['officer']}"
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n"
    status_line = _raw(node, request.encode()).split(b"\r\n", 1)[0]
    status = int(status_line.split()[1])
    assert 400 <= status < 500, (target, status_line)


@pytest.mark.parametrize("spelling", ["1_0", "+10", " 10", "10.0", "1e1", "010"])
def test_a_number_in_a_query_or_header_is_plain_decimal_digits(
    node: LocalNode, spelling: str
) -> None:
    # Read as 10 before (pydantic's lax mode): a typo taken for another number (from review).
    officer = headers(node, "officer")
    listed = httpx.get(node.url + "/api/v1/requests", params={"limit": spelling}, headers=officer)
    _error(listed, 422, "invalid_request")
    assert listed.json()["fields"][0]["loc"] == ["query", "limit"]
    if spelling == spelling.strip():  # HTTP strips a header value's surrounding spaces
        part = httpx.put(
            node.url + f"/p2p/v1/evidence/envelopes/{'ab' * 16}/parts/1",
            content=b"abc",
            headers={"upload-offset": spelling},
        )
        _error(part, 422, "invalid_request")
    assert httpx.get(
        node.url + "/api/v1/requests", params={"limit": "10"}, headers=officer
    ).is_success


EXAMPLE = json.loads((Path(__file__).parents[2] / "docs" / "examples" / "request.json").read_text())


@pytest.mark.parametrize("spelling", ["1_0", " 7 ", "7", True, 2.0, 1e3])
def test_a_number_in_a_body_is_a_json_integer(node: LocalNode, spelling: object) -> None:
    """From review: a draft declared `"size": "1_0"`, `true`, `" 7 "` or `2.0` was created
    with sizes 10, 1, 7 and 2 (pydantic's lax mode), an upload then possible at that size
    alone: a typo taken for another number, as in queries before PlainInt."""
    officer = headers(node, "officer")
    body = {key: EXAMPLE[key] for key in ("to", "document")}
    body["attachments"] = [{"name": "image.dd", "size": spelling}]
    created = httpx.post(node.url + "/api/v1/evidence/drafts", json=body, headers=officer)
    _error(created, 422, "invalid_request")
    assert created.json()["fields"][0]["loc"] == ["body", "attachments", 0, "size"]


@pytest.mark.parametrize("spelling", ["no", "false", "0", "off", 0, 0.0])
def test_confidentiality_is_a_json_boolean(node: LocalNode, spelling: object) -> None:
    """Lax mode read these as `false`: a request meant confidential sent as not, on a typo."""
    officer = headers(node, "officer")
    body = {key: EXAMPLE[key] for key in ("to", "document")}
    document = json.loads(json.dumps(body["document"]))
    document["confidentiality"] = {"confidential": spelling, "level": "standard"}
    body["document"] = document
    submitted = httpx.post(node.url + "/api/v1/requests", json=body, headers=officer)
    _error(submitted, 422, "invalid_request")
    locations = [field["loc"] for field in submitted.json()["fields"]]
    assert ["body", "document", "confidentiality", "confidential"] in locations


@pytest.mark.parametrize(
    ("media", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        (None, 415),  # none: FastAPI reads it as bytes too (from review)
        # JSON: the route's own answer (this node pins no peer to send it to).
        ("application/json; charset=utf-8", 404),
        ("application/merge-patch+json", 404),
    ],
)
def test_a_json_body_sent_as_another_type_is_415(
    node: LocalNode, media: str | None, status: int
) -> None:
    """From an operator's review: a valid request sent as text/plain was answered 422 "Input
    should be a valid dictionary", about a body that was one."""
    body = json.dumps({key: EXAMPLE[key] for key in ("to", "document")}).encode()
    typed = {} if media is None else {"content-type": media}
    sent = httpx.post(
        node.url + "/api/v1/requests", content=body, headers={**headers(node, "officer"), **typed}
    )
    if status == 415:
        _error(sent, 415, "unsupported_media_type")
        assert "application/json" in sent.json()["detail"]
    else:
        assert sent.status_code == status, sent.text
    # Only a caller with the route's token learns that: the token is judged first.
    unknown = httpx.post(
        node.url + "/api/v1/requests",
        content=body,
        headers={"authorization": "Bearer ent_unknown", **typed},
    )
    assert unknown.status_code == 401
    # No body at all is the route's to judge, whatever the type (here: the body is required).
    empty = httpx.post(node.url + "/api/v1/requests", headers={**headers(node, "officer"), **typed})
    assert empty.status_code == 422, empty.text


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/v1/requests", {"GET", "POST"}),
        ("OPTIONS", "/api/v1/evidence/drafts/" + "ab" * 16, {"GET", "DELETE"}),
        ("OPTIONS", "/api/v1/evidence/drafts/" + "ab" * 16 + "/attachments/1", {"HEAD", "PATCH"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
    ],
)
def test_a_405_names_every_method_of_the_path(
    node: LocalNode, method: str, path: str, allowed: set[str]
) -> None:
    """From review: Allow named the methods of the path's first route alone (`POST` where
    GET is served too), which RFC 9110 §15.5.6 and generated clients read as the whole list."""
    answer = httpx.request(method, node.url + path, headers=headers(node, "officer"))
    _error(answer, 405, "method_not_allowed")
    assert allowed <= {name.strip() for name in answer.headers["allow"].split(",")}


@pytest.mark.parametrize(
    ("target", "extra", "status", "code"),
    [
        ("/api/v1/nope", {}, 404, "not_found"),
        ("/api/v1/evidence/drafts/" + "ab" * 16 + "/submit", {}, 405, "method_not_allowed"),
        ("/api/v1/requests?x=%00", {}, 400, "invalid_request"),
        ("/healthz", {"x-padding": "p" * 9000}, 413, "headers_too_large"),
    ],
)
def test_a_refused_head_says_its_code_in_a_header(
    node: LocalNode, target: str, extra: dict[str, str], status: int, code: str
) -> None:
    """An answer to HEAD has no body: api.md promises its code in `Entraide-Error`, which
    these refusals, made before any route, left out (from review)."""
    answer = httpx.head(node.url + target, headers={**headers(node, "officer"), **extra})
    assert answer.status_code == status
    assert answer.headers["entraide-error"] == code

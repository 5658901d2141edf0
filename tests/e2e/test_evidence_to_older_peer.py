"""Evidence sent to a peer that does not implement streamed envelopes (docs/protocol.md §8.5).

A receiver that implements §8.5 must also accept envelopes by §8.2, but one that implements
only §8.2 answers the announcement `404`. The sender then posts the envelope whole by §8.2
when it fits the body limit, and otherwise fails it saying why (from review: it failed it at
once as "HTTP 404 not_found", and never tried §8.2).

The peer here is a real node (AR/MPF) behind a small real HTTP server that answers `404` on
every §8.5 route and passes everything else through, as a node of an older version would
answer; ES/MJ pins AR/MPF at that server's address, so every exchange crosses it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from app.localnodes import LocalNode
from tests.conftest import BACKENDS, make_databases
from tests.e2e.conftest import wait_for
from tests.e2e.evidence import (
    create_draft,
    delivery_of,
    detail,
    download,
    submit,
    upload,
    wait_receipt,
)

KIB = 1024
# ES/MJ's own body limit, the one it holds a peer to for §8.2 (docs/protocol.md §7).
ES_MAX_BODY = 2 * 1024 * KIB
STREAMED = "/p2p/v1/evidence/"


class OlderPeer:
    """AR/MPF seen through a server without §8.5: what it was asked, in order."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[tuple[str, str, int]] = []  # method, path, status answered

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        if handler.path.startswith(STREAMED):
            status, headers, content = 404, {"content-type": "application/json"}, b""
            content = json.dumps({"error": "not_found", "detail": "Not Found"}).encode()
        else:
            passed = {
                name: value
                for name, value in handler.headers.items()
                if name.lower() not in ("host", "content-length", "connection")
            }
            response = httpx.request(
                handler.command,
                self.target + handler.path,
                content=body or None,
                headers=passed,
                timeout=30.0,
            )
            status, content = response.status_code, response.content
            headers = {
                name: value
                for name, value in response.headers.items()
                if name.lower() not in ("content-length", "connection", "transfer-encoding")
            }
        self.seen.append((handler.command, handler.path.split("?")[0], status))
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("content-length", str(len(content)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(content)


@contextmanager
def older_peer(target: LocalNode) -> Iterator[tuple[str, OlderPeer]]:
    peer = OlderPeer(target.url)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            peer.answer(self)

        do_POST = do_PUT = do_HEAD = do_GET

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", peer
    finally:
        server.shutdown()
        server.server_close()


class Pair:
    def __init__(self, es: LocalNode, ar: LocalNode, peer: OlderPeer) -> None:
        self.es, self.ar, self.peer = es, ar, peer


@pytest.fixture(scope="module", params=BACKENDS)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    base = tmp_path_factory.mktemp("nodes")
    es = LocalNode(
        "ES/MJ",
        "Ministerio de Justicia",
        base / "es",
        databases.new("es", migrated=True),
        extra_env={"ENTRAIDE_MAX_BODY_BYTES": str(ES_MAX_BODY)},
    )
    ar_db = databases.new("ar", migrated=True)
    ar = LocalNode("AR/MPF", "Ministerio Publico Fiscal", base / "ar", ar_db)
    try:
        for node in (es, ar):
            node.init(clients={"admin": ("admin",), "officer": ("officer",)})
            node.start()
        ar.pin(es)
        with older_peer(ar) as (url, peer):
            with es.client("admin") as http:
                pinned = http.post(
                    "/api/v1/admin/peers", json={"url": url, "fingerprint": ar.fingerprint}
                )
            assert pinned.status_code in (200, 201), pinned.text
            yield Pair(es, ar, peer)
    finally:
        for node in (es, ar):
            node.stop()
        databases.drop_all()


def _send_evidence(pair: Pair, data: bytes) -> str:
    draft = create_draft(pair.es, [len(data)])
    with pair.es.client("officer") as http:
        upload(http, draft["attachments"][0]["href"], data, piece=1024 * KIB)
    submit(pair.es, draft["id"])
    return str(draft["id"])


def _settled(node: LocalNode, request_id: str) -> dict[str, Any] | None:
    delivery = delivery_of(node, request_id)
    return delivery if delivery["state"] in ("delivered", "failed") else None


def test_evidence_that_fits_one_post_is_sent_whole_to_a_peer_without_streaming(
    pair: Pair,
) -> None:
    data = os.urandom(300 * KIB + 7)
    request_id = _send_evidence(pair, data)
    delivery = wait_for("the delivery to end", lambda: _settled(pair.es, request_id), timeout=60)
    assert delivery["state"] == "delivered", delivery
    wait_receipt(pair.es, request_id)
    posts = [(method, path) for method, path, _ in pair.peer.seen if method != "GET"]
    # Announced once, refused as an unknown route, then posted whole, once.
    assert posts == [("POST", "/p2p/v1/evidence/envelopes"), ("POST", "/p2p/v1/envelopes")]
    received = wait_for("the request at AR", lambda: detail(pair.ar, request_id))
    attachment = received["messages"][0]["attachments"][0]
    got, shown = download(pair.ar, attachment["href"])
    assert got == data
    assert shown == attachment["sha256"]
    # Known from then on: the next one goes whole at once, with no 404 to count against us.
    before = len(pair.peer.seen)
    second = _send_evidence(pair, data[:1000])
    delivery = wait_for("the delivery to end", lambda: _settled(pair.es, second), timeout=60)
    assert delivery["state"] == "delivered", delivery
    posts = [(method, path) for method, path, _ in pair.peer.seen[before:] if method != "GET"]
    assert posts == [("POST", "/p2p/v1/envelopes")]


def test_evidence_too_large_for_one_post_fails_saying_why(pair: Pair) -> None:
    before = len(pair.peer.seen)
    request_id = _send_evidence(pair, os.urandom(ES_MAX_BODY))

    delivery = wait_for("the delivery to end", lambda: _settled(pair.es, request_id), timeout=60)
    assert delivery["state"] == "failed", delivery
    error = delivery["last_error"]
    assert "does not accept streamed evidence" in error, error
    assert f"over the {ES_MAX_BODY}-byte limit" in error, error
    # Announced (the peer may have gained streamed parts since), and nothing posted whole:
    # the peer would have refused it, or read 2 MiB for nothing.
    posts = [(method, path) for method, path, _ in pair.peer.seen[before:] if method != "GET"]
    assert posts == [("POST", "/p2p/v1/evidence/envelopes")]
    assert detail(pair.ar, request_id) is None

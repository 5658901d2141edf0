"""`entraide requests send --attach` through a reverse proxy that says "not now": a node
restarting behind it (502, 504), its storage out of reach for a moment (503 with
Retry-After), or full (507). The command waits and resumes from the node's offset for the
first, and ends saying how to resume for the last; the file arrives whole either way.

The proxy is a fake at the network edge (what an authority puts in front of its node); the
node and the command are real. The behaviour is the command's, so one backend suffices.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import EXAMPLE
from tests.e2e.evidence import MIB, Pair, detail, download, evidence_pair, wait_receipt
from tests.requests_cli import run_requests

NGINX_502 = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"
# Hop-by-hop, or set again by whoever sends the message on.
NOT_FORWARDED = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}


@dataclass
class Fault:
    method: str
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0  # calls of `method` let through first


@dataclass
class Proxy:
    url: str
    faults: list[Fault]
    # (method, path, status) of every call, as the command made them
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with evidence_pair("sqlite", tmp_path_factory) as started:
        yield started


@pytest.fixture
def proxy(pair: Pair) -> Iterator[Proxy]:
    node = httpx.Client(base_url=pair.es.url, timeout=60.0)
    state = Proxy(url="", faults=[])
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _relay(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            with lock:
                fault = next((f for f in state.faults if f.method == self.command), None)
                if fault is not None and fault.after:
                    fault.after -= 1
                    fault = None
                elif fault is not None:
                    state.faults.remove(fault)
            if fault is not None:
                status, headers, content = fault.status, fault.headers, fault.body
            else:
                answer = node.request(
                    self.command,
                    self.path,
                    content=body,
                    headers={
                        k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED
                    },
                )
                status, content = answer.status_code, answer.content
                headers = {
                    k: v for k, v in answer.headers.items() if k.lower() not in NOT_FORWARDED
                }
            with lock:
                state.seen.append((self.command, self.path.split("?")[0], status))
                state.answered_at.append(time.monotonic())
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_POST = do_PATCH = do_HEAD = do_DELETE = _relay

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        node.close()


def _request_file(tmp_path: Path) -> Path:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({key: EXAMPLE[key] for key in ("to", "document")}))
    return request


def _arrived_whole(pair: Pair, request_id: str, data: bytes) -> None:
    wait_receipt(pair.es, request_id)
    received = detail(pair.ar, request_id)
    assert received is not None
    entry = received["messages"][0]["attachments"][0]
    got, sha256 = download(pair.ar, entry["href"])
    assert got == data
    assert sha256 == hashlib.sha256(data).hexdigest()


def _patched(proxy: Proxy) -> list[int]:
    return [status for method, path, status in proxy.seen if method == "PATCH"]


def test_an_upload_waits_out_a_restart_and_a_busy_storage(
    pair: Pair, proxy: Proxy, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB + 11)
    evidence = tmp_path / "image.dd"
    evidence.write_bytes(data)
    unavailable = json.dumps(
        {"error": "storage_unavailable", "detail": "the evidence storage could not be written"}
    ).encode()
    proxy.faults += [
        Fault("HEAD", 502, NGINX_502, {"content-type": "text/html"}),
        Fault(
            "PATCH",
            503,
            unavailable,
            {"content-type": "application/json", "retry-after": "3"},
        ),
    ]
    done = run_requests(
        proxy.url,
        pair.es.tokens["officer"],
        "send",
        str(_request_file(tmp_path)),
        "--attach",
        str(evidence),
    )
    assert done.returncode == 0, done.stderr
    assert proxy.faults == []  # both were met
    # Said, on one line each, with the wait; never the proxy's page.
    assert "image.dd: HTTP 502 Bad Gateway; trying again in 1 s" in done.stderr
    assert (
        "image.dd: HTTP 503 storage_unavailable: the evidence storage could not be written; "
        "trying again in 3 s" in done.stderr  # Retry-After, not the back-off's 2 s
    )
    assert "<html>" not in done.stderr
    # The 503's Retry-After was waited out before the HEAD that followed it.
    refused = next(i for i, call in enumerate(proxy.seen) if call[2] == 503)
    assert proxy.answered_at[refused + 1] - proxy.answered_at[refused] >= 3.0
    assert proxy.seen[refused + 1][0] == "HEAD"
    # The piece refused was sent again; nothing else twice.
    assert _patched(proxy) == [503, 204]
    _arrived_whole(pair, done.stdout.strip(), data)


def test_a_full_storage_ends_the_upload_saying_how_to_resume(
    pair: Pair, proxy: Proxy, tmp_path: Path
) -> None:
    data = os.urandom(10 * MIB + 3)  # two pieces of the command's: the first is stored
    evidence = tmp_path / "mailbox.pst"
    evidence.write_bytes(data)
    full = json.dumps(
        {"error": "insufficient_storage", "detail": "the evidence storage is full"}
    ).encode()
    request = _request_file(tmp_path)
    token = pair.es.tokens["officer"]
    # The second PATCH: the first is let through, and stored.
    proxy.faults.append(Fault("PATCH", 507, full, {"content-type": "application/json"}, after=1))
    ended = run_requests(proxy.url, token, "send", str(request), "--attach", str(evidence))
    assert ended.returncode == 1, ended.stderr
    assert "error: HTTP 507 insufficient_storage: the evidence storage is full" in ended.stderr
    assert "trying again" not in ended.stderr  # an operator's to free: not waited for
    draft = ended.stderr.split("resume with --draft ")[1].split()[0]
    assert _patched(proxy) == [204, 507]
    # Resumed, once there is room, from the node's offset: the stored piece is not sent again.
    proxy.seen.clear()
    resumed = run_requests(
        proxy.url, token, "send", str(request), "--draft", draft, "--attach", str(evidence)
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == draft
    assert _patched(proxy) == [204]
    _arrived_whole(pair, draft, data)

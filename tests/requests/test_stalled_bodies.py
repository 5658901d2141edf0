"""A request whose body goes silent without its connection closing (the sender lost power, a
NAT dropped the connection's state) is taken for gone after a while: it held its part's or
attachment's staging file locked, and every retry was refused as busy, until the node
restarted (from review). What it sent is kept, as after a disconnect, and the client, which
may still be there, is told: 408 `body_timeout` as JSON with the offset to resume from, on
record as a silent JSON body's refusal (from review: it got a bare 499 and an empty body)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.crypto.encoding import b64d
from app.evidence.drafts import upload_id
from app.evidence.inbound import receive_upload_id
from app.evidence.node_store import blob_store
from tests.requests.conftest import Harness
from tests.requests.test_transfer_parts_again import _sealed
from tests.requests.test_upload_key_streams import _draft


def _stall(
    ar: Harness, method: str, path: str, headers: dict[str, str], length: int
) -> socket.socket:
    """Send a request's head and the start of its body, then nothing (the socket stays open)."""
    address = urlsplit(str(ar.http.base_url))
    stalled = socket.create_connection((address.hostname, address.port))
    lines = [f"{method} {path} HTTP/1.1", f"host: {address.netloc}", f"content-length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    stalled.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"\0" * 100)
    return stalled


def _answer(stalled: socket.socket) -> tuple[int, dict[str, str], dict[str, object]]:
    """The answer the silent request gets, read to the end of the connection."""
    stalled.settimeout(15)
    received = b""
    while chunk := stalled.recv(65536):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def _locked(ar: Harness, upload_id: str) -> None:
    """Wait until the silent request holds the staging file (it creates it, locked)."""
    staging = blob_store(ar.node.settings).uploads / upload_id
    deadline = time.monotonic() + 10
    while not staging.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _documented(ar: Harness, path: str, method: str) -> dict[str, Any]:
    """The answers /openapi.json lists for an operation (a client generated from it)."""
    spec = ar.http.get("/api/v1/openapi.json", headers=ar.as_("officer")).json()
    responses: dict[str, Any] = spec["paths"][path][method]["responses"]
    return responses


def _once_free(send: Callable[[], httpx.Response], busy: str) -> httpx.Response:
    """Send again while refused as busy (the silent request holds the file), for 15 s at
    most; the first other answer."""
    deadline = time.monotonic() + 15
    while True:
        answer = send()
        if answer.status_code != 409 or answer.json()["error"] != busy:
            return answer
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)


def test_a_part_whose_sender_went_silent_is_not_kept_busy(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ar.node.settings, "peer_timeout_seconds", 0.5)  # silent for 1 s: gone
    wire, parts = _sealed(ar)  # parts of several chunks each
    announced = ar.http.post(
        "/p2p/v1/evidence/envelopes", json={**wire, "parts": wire["parts"][:1]}
    )
    assert announced.status_code == 202, announced.text
    msg_id = json.loads(b64d(wire["header"]))["msg_id"]
    href = f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"
    part = parts[1]
    headers = {**ar.signed_put(msg_id, 0), "content-type": "application/octet-stream"}
    stalled = _stall(ar, "PUT", href, headers, len(part))
    _locked(ar, receive_upload_id(msg_id, 1))
    try:
        refused = len(ar.audit("envelope.refused"))
        status, told, body = _answer(stalled)
        assert status == 408, body
        assert body == {"error": "body_timeout", "detail": "the body sent nothing for 1 s"}
        head = ar.http.head(href)
        assert told["upload-offset"] == head.headers["upload-offset"]
        assert told["upload-length"] == str(len(part))
        assert ar.audit("envelope.refused")[refused:] == [("peer:unknown", "body_timeout", None)]
        assert "408" in _documented(ar, "/p2p/v1/evidence/envelopes/{msg_id}/parts/{index}", "put")
        answer = _once_free(lambda: ar.http.put(href, content=part, headers=headers), "part_busy")
        # Part 1 whole (part 2 still to come): taken as soon as the silent one was let go.
        assert answer.status_code == 204, answer.text
        assert answer.headers["upload-offset"] == str(len(part))
    finally:
        stalled.close()


def _trickle(stalled: socket.socket, stop: threading.Event) -> None:
    """A byte every 0.2 s, never enough for a chunk, never silent for the idle limit."""
    try:
        while not stop.wait(0.2):
            stalled.sendall(b"\0")
    except OSError:  # the node closed the connection: its answer is read after
        return


def test_a_part_held_by_a_replayed_put_that_stores_nothing_is_taken_over(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PUT's signature covers its envelope, part and offset, not a time: replayed by
    whoever captured it, with a trickled body that never makes a chunk, it held the part, the
    real sender refused `part_busy`, for as long as it went on (from review). A signed PUT
    at the offset where the part stands takes it over once the holder stored no chunk for
    two idle limits; before that, it is refused busy as ever."""
    monkeypatch.setattr(ar.node.settings, "peer_timeout_seconds", 0.5)  # idle limit 1 s
    wire, parts = _sealed(ar)
    announced = ar.http.post(
        "/p2p/v1/evidence/envelopes", json={**wire, "parts": wire["parts"][:1]}
    )
    assert announced.status_code == 202, announced.text
    msg_id = json.loads(b64d(wire["header"]))["msg_id"]
    href = f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"
    part = parts[1]
    headers = {**ar.signed_put(msg_id, 0), "content-type": "application/octet-stream"}
    replayed = _stall(ar, "PUT", href, headers, len(part))
    stop = threading.Event()
    trickling = threading.Thread(target=_trickle, args=(replayed, stop))
    trickling.start()
    try:
        _locked(ar, receive_upload_id(msg_id, 1))
        busy = ar.http.put(href, content=part, headers=headers)
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"] == "part_busy"
        time.sleep(2.2)  # two idle limits without a chunk stored
        taken = ar.http.put(href, content=part, headers=headers)
        assert taken.status_code == 204, taken.text
        assert taken.headers["upload-offset"] == str(len(part))
        stop.set()
        trickling.join(5)
        status, told, body = _answer(replayed)
        assert status == 409, body
        assert body["error"] == "part_busy"
        assert "took it over" in str(body["detail"])
        assert told["upload-offset"] == "0"
        assert ar.audit("evidence.part_taken_over") == [("node", "stalled", None)]
    finally:
        stop.set()
        replayed.close()


def test_an_attachment_whose_uploader_went_silent_is_not_kept_busy(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ar.node.settings, "peer_timeout_seconds", 0.5)
    data = os.urandom(1000)
    draft_id, href = _draft(ar, len(data))
    headers = {**ar.as_("officer"), "upload-offset": "0"}
    stalled = _stall(ar, "PATCH", href, headers, len(data))
    _locked(ar, upload_id(draft_id, 1))
    try:
        refused = len(ar.audit("api.refused"))
        status, told, body = _answer(stalled)
        assert status == 408, body
        assert body == {"error": "body_timeout", "detail": "the body sent nothing for 1 s"}
        head = ar.http.head(href, headers=ar.as_("officer"))
        assert told["upload-offset"] == head.headers["upload-offset"]
        assert told["upload-length"] == str(len(data))
        assert ar.audit("api.refused")[refused:] == [("client:officer", "body_timeout", draft_id)]
        documented = _documented(
            ar, "/api/v1/evidence/drafts/{draft_id}/attachments/{index}", "patch"
        )
        assert "Upload-Offset" in documented["408"]["headers"]  # where to resume, declared
        answer = _once_free(
            lambda: ar.http.patch(href, content=data, headers=headers), "upload_busy"
        )
        assert answer.status_code == 204, answer.text
        assert answer.headers["upload-complete"] == "?1"
    finally:
        stalled.close()

"""Sending a streamed part in several PUTs of whole chunks, each resuming at the peer's offset.

The peer is a fake at the network edge (httpx.MockTransport) that keeps what it is sent and
answers as docs/protocol.md section 8.5 says.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from app.crypto.encoding import b64e, canonical_json
from app.delivery import outbox
from app.delivery.worker import classify
from app.errors import PeerError
from app.evidence import transfer
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.stream import CIPHER_CHUNK
from app.evidence.transfer import SegmentSizer, StreamedPart, send_streamed
from app.peers.client import PeerAnswer

MSG_ID = "ab" * 16


def _blob(tmp_path: Path, size: int) -> tuple[DirectoryBlobStore, StreamedPart, bytes]:
    store = DirectoryBlobStore(tmp_path / "blobs")
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    with store.upload("out-test-1") as upload:
        upload.write(data)
        store.finalise(upload, digest)
    return store, StreamedPart(1, digest, size), data


class Peer:
    """Holds the bytes of part 1 it was sent; answers the receipt once it has them all."""

    def __init__(self, length: int, *, stall: bool = False) -> None:
        self.length = length
        self.held = bytearray()
        self.puts: list[tuple[int, int]] = []  # (Upload-Offset, body length) of each PUT
        self.stall = stall

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"parts": [{"index": 1, "offset": len(self.held)}]})
        if request.method == "HEAD":
            return httpx.Response(204, headers={"upload-offset": str(len(self.held))})
        offset = int(request.headers["upload-offset"])
        assert offset == len(self.held)
        body = request.read()
        assert int(request.headers["content-length"]) == len(body)
        self.puts.append((offset, len(body)))
        if not self.stall:
            self.held += body
        if len(self.held) == self.length:
            return httpx.Response(201, json={"receipt": "signed"})
        return httpx.Response(204, headers={"upload-offset": str(len(self.held))})


def _send(peer: Peer, store: DirectoryBlobStore, part: StreamedPart) -> PeerAnswer:
    header = b64e(canonical_json({"msg_id": MSG_ID}))
    with httpx.Client(transport=httpx.MockTransport(peer), timeout=30.0) as http:
        return send_streamed(
            http,
            "http://peer",
            {"v": 1, "header": header, "signature": "", "parts": []},
            [part],
            store,
            headers={},
            keep_alive=lambda: True,
        )


def test_a_part_goes_in_segments_of_whole_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "FIRST_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(transfer, "MAX_SEGMENT_CHUNKS", 3)
    monkeypatch.setattr(transfer, "MIN_SEGMENT_CHUNKS", 1)
    length = 7 * CIPHER_CHUNK + 18
    store, part, data = _blob(tmp_path, length)
    peer = Peer(length)
    status, body, _ = _send(peer, store, part)
    assert (status, body) == (201, {"receipt": "signed"})
    assert bytes(peer.held) == data
    # Every segment but the last ends on a chunk boundary; none is sent twice.
    assert peer.puts == [
        (0, 2 * CIPHER_CHUNK),
        (2 * CIPHER_CHUNK, 3 * CIPHER_CHUNK),
        (5 * CIPHER_CHUNK, 2 * CIPHER_CHUNK + 18),
    ]


def test_a_peer_that_does_not_advance_is_a_transport_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "FIRST_SEGMENT_CHUNKS", 1)
    store, part, _ = _blob(tmp_path, 3 * CIPHER_CHUNK)
    peer = Peer(part.length, stall=True)
    with pytest.raises(PeerError):
        _send(peer, store, part)
    assert len(peer.puts) == 1  # not an endless loop of the same segment


def test_segments_last_about_the_client_timeout() -> None:
    sizer = SegmentSizer(30.0)
    assert sizer.next_bytes() == transfer.FIRST_SEGMENT_CHUNKS * CIPHER_CHUNK
    sizer.observe(64 * CIPHER_CHUNK, 2.0)  # 32 chunks a second: 960 in 30 s
    assert sizer.next_bytes() == 960 * CIPHER_CHUNK
    sizer.observe(CIPHER_CHUNK, 60.0)  # a very slow link: the floor
    assert sizer.next_bytes() == transfer.MIN_SEGMENT_CHUNKS * CIPHER_CHUNK
    sizer.observe(1 << 40, 1.0)  # a very fast one: the ceiling
    assert sizer.next_bytes() == transfer.MAX_SEGMENT_CHUNKS * CIPHER_CHUNK


def test_the_segment_length_follows_the_client_timeout() -> None:
    with httpx.Client(timeout=12.0) as http:
        assert transfer._segment_seconds(http) == 12.0
    with httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as http:
        assert transfer._segment_seconds(http) == transfer.DEFAULT_SEGMENT_SECONDS


class RefusingHead(Peer):
    """Refuses HEAD as a receiver that no longer has the transfer (its operator suspended us,
    or replaced our key, between two parts), with or without the refusal's code header."""

    def __init__(self, length: int, status: int, code: str | None) -> None:
        super().__init__(length)
        self.status, self.code = status, code

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            headers = {"entraide-error": self.code} if self.code else {}
            return httpx.Response(self.status, headers=headers)
        return super().__call__(request)


@pytest.mark.parametrize(
    ("status", "code", "state"),
    [
        (404, "unknown_transfer", outbox.RETRY),
        (404, None, outbox.RETRY),  # section 8.5: HEAD's 404 is unknown_transfer
        (409, "part_out_of_order", outbox.RETRY),
        (400, "expired", outbox.FAILED),
    ],
)
def test_a_refused_head_is_read_by_its_code(
    tmp_path: Path, status: int, code: str | None, state: str
) -> None:
    """From a review: a refused HEAD was read without its code (it has no body), so a
    retryable refusal failed the delivery for good, as a final one."""
    store, part, _ = _blob(tmp_path, CIPHER_CHUNK)
    answer = _send(RefusingHead(part.length, status, code), store, part)
    outcome = classify(answer.status, answer.body, answer.retry_after)
    assert (outcome.state, outcome.error) == (state, f"HTTP {status} {code or 'unknown_transfer'}")

"""Sending a streamed part in several PUTs of whole chunks, each resuming at the peer's offset.

The peer is a fake at the network edge (httpx.MockTransport) that keeps what it is sent and
answers as docs/protocol.md section 8.5 says.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

from app.crypto.encoding import b64e, canonical_json
from app.crypto.part_put import HEADER as PART_PUT_HEADER
from app.crypto.part_put import part_put_signed
from app.delivery import outbox
from app.delivery.worker import classify
from app.errors import PeerError
from app.evidence import transfer
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.stream import CIPHER_CHUNK
from app.evidence.transfer import SegmentSizer, StreamedPart, send_streamed
from app.evidence.whole import TooLargeForOnePost, send_evidence
from app.peers.client import PeerAnswer

MSG_ID = "ab" * 16
SENDER_KEY = SigningKey.generate()
# The envelope hash of the header these tests announce: what each PUT's signature names.
ENVELOPE_HASH = hashlib.sha256(canonical_json({"msg_id": MSG_ID})).hexdigest()


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
        signature = request.headers.get(PART_PUT_HEADER)
        assert part_put_signed([bytes(SENDER_KEY.verify_key)], ENVELOPE_HASH, 1, offset, signature)
        body = request.read()
        assert int(request.headers["content-length"]) == len(body)
        self.puts.append((offset, len(body)))
        if not self.stall:
            self.held += body
        if len(self.held) == self.length:
            return httpx.Response(201, json={"receipt": "signed"})
        return httpx.Response(204, headers={"upload-offset": str(len(self.held))})


def _send(peer: Any, store: DirectoryBlobStore, part: StreamedPart) -> PeerAnswer:
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
            signing_key=SENDER_KEY,
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


class _Counting(DirectoryBlobStore):
    """The sender's store, counting the bytes read from its blobs (and able to lose some)."""

    def __init__(self, root: Path, *, cut: int = 0) -> None:
        super().__init__(root)
        self.read = 0
        self.cut = cut

    def open(self, digest: str) -> Any:
        store, blob = self, super().open(digest)
        end = blob.seek(0, os.SEEK_END) - self.cut
        blob.seek(0)

        class Reader:
            def __enter__(self) -> Reader:
                return self

            def __exit__(self, *_: object) -> None:
                blob.close()

            def seek(self, offset: int) -> None:
                blob.seek(offset)

            def read(self, size: int) -> bytes:
                data: bytes = blob.read(max(0, min(size, end - blob.tell())))
                store.read += len(data)
                return data

        return Reader()


def _counting(tmp_path: Path, chunks: int, *, cut: int = 0) -> tuple[_Counting, StreamedPart]:
    _, part, _ = _blob(tmp_path, chunks * CIPHER_CHUNK)
    return _Counting(tmp_path / "blobs", cut=cut), part


def _answers(post: httpx.Response, put: httpx.Response | None = None) -> Any:
    def peer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return post
        if request.method == "HEAD":
            return httpx.Response(204, headers={"upload-offset": "0"})
        request.read()
        assert put is not None
        return put

    return peer


def test_a_peer_holding_the_whole_envelope_gets_no_look_at_the_senders_blob(
    tmp_path: Path,
) -> None:
    """Its receipt was lost, then the sender's blob: the peer's stored receipt still comes
    back (from review: the lengths were checked before the announce, and the delivery of an
    envelope the peer held failed as the sender's damaged storage)."""
    store, part = _counting(tmp_path, 2)
    store.delete(part.digest)
    answer = _send(_answers(httpx.Response(200, json={"receipt": "stored"})), store, part)
    assert answer.status == 200


def test_a_refusal_that_is_not_final_never_reads_the_whole_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer answering 503 with a damage code would have had every retry hash the whole
    blob (tens of GiB) (from review); a final refusal (400) is checked against the sender's
    own blob once, and stays the peer's answer when the blob is sound."""
    monkeypatch.setattr(transfer, "FIRST_SEGMENT_CHUNKS", 2)
    store, part = _counting(tmp_path, 8)
    refusal = {"error": "decrypt_failed", "detail": "a part chunk failed authentication"}
    announced = httpx.Response(202, json={"parts": [{"index": 1, "offset": 0}]})
    busy = _send(_answers(announced, httpx.Response(503, json=refusal)), store, part)
    assert busy.status == 503
    assert store.read == 2 * CIPHER_CHUNK  # the one segment sent, nothing more
    store.read = 0
    final = _send(_answers(announced, httpx.Response(400, json=refusal)), store, part)
    assert final.status == 400  # the blob is sound: the peer's refusal stands
    assert store.read == 2 * CIPHER_CHUNK + part.length


def test_a_blob_cut_short_while_it_is_sent_is_the_senders_fault(tmp_path: Path) -> None:
    """Not h11's 'too little data' (an internal error retried until the deadline)."""
    store, part = _counting(tmp_path, 3, cut=CIPHER_CHUNK)
    announced = httpx.Response(202, json={"parts": [{"index": 1, "offset": 0}]})
    with pytest.raises(transfer.StoredPartCorrupt, match="part 1: the blob ended"):
        _send(_answers(announced, httpx.Response(204)), store, part)


class WithoutStreaming:
    """A peer of an older version: no section 8.5 routes; keeps the whole envelope posted."""

    def __init__(self, status: int = 404) -> None:
        self.status = status
        self.posted: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/p2p/v1/envelopes":
            self.posted.append(request.read())
            return httpx.Response(201, json={"receipt": "signed"})
        return httpx.Response(self.status, json={"error": "not_found", "detail": "Not Found"})


def _send_evidence(
    peer: Callable[[httpx.Request], httpx.Response],
    store: DirectoryBlobStore,
    part: StreamedPart,
    max_body: int,
    without_parts: set[str] | None = None,
) -> PeerAnswer:
    wire: dict[str, object] = {
        "v": 1,
        "header": b64e(canonical_json({"msg_id": MSG_ID})),
        "signature": "c2ln",
        "parts": ["bWFuaWZlc3Q="],
    }
    with httpx.Client(transport=httpx.MockTransport(peer), timeout=30.0) as http:
        return send_evidence(
            http,
            "http://peer",
            wire,
            [part],
            store,
            max_body_bytes=max_body,
            without_parts=set() if without_parts is None else without_parts,
            headers={},
            keep_alive=lambda: True,
            signing_key=SENDER_KEY,
        )


@pytest.mark.parametrize("status", [404, 405])
def test_a_peer_without_streamed_parts_gets_the_envelope_whole(tmp_path: Path, status: int) -> None:
    """Section 8.5: such a peer takes the envelope by section 8.2 (from review: it was failed
    as `HTTP 404 not_found`). The size the limit is checked against is the body's, exactly."""
    store, part, data = _blob(tmp_path, 2 * CIPHER_CHUNK + 18)
    peer = WithoutStreaming(status)
    fits = len(json.dumps({"v": 1, "header": "", "signature": "", "parts": []})) + 4 * 10**6
    answer = _send_evidence(peer, store, part, fits)
    assert (answer.status, answer.body) == (201, {"receipt": "signed"})
    [body] = peer.posted
    assert json.loads(body)["parts"] == ["bWFuaWZlc3Q=", b64e(data)]
    exact = len(body)
    assert _send_evidence(WithoutStreaming(status), store, part, exact).status == 201
    with pytest.raises(TooLargeForOnePost, match=f"HTTP {status}.* over the {exact - 1}-byte"):
        _send_evidence(WithoutStreaming(status), store, part, exact - 1)


def test_a_damaged_blob_is_not_posted_whole(tmp_path: Path) -> None:
    store, part, data = _blob(tmp_path, CIPHER_CHUNK)
    path = next(p for p in (tmp_path / "blobs").rglob("*") if p.is_file() and p.stat().st_size)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    peer = WithoutStreaming()
    with pytest.raises(transfer.StoredPartCorrupt, match="part 1: the part's hash"):
        _send_evidence(peer, store, part, 1 << 30)
    assert peer.posted == []


def test_a_peer_found_without_streamed_parts_is_sent_whole_at_once(tmp_path: Path) -> None:
    """As for batches (section 8.6), from then on: each announcement it refused would count
    against our address there, as a refused call does here. One too large for a single post
    is announced all the same, in case the peer has gained section 8.5 since."""
    store, part, data = _blob(tmp_path, CIPHER_CHUNK)
    known: set[str] = set()
    peer = WithoutStreaming()
    assert _send_evidence(peer, store, part, 1 << 30, known).status == 201
    assert known == {"http://peer"}
    calls: list[str] = []

    def watched(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return peer(request)

    assert _send_evidence(watched, store, part, 1 << 30, known).status == 201
    assert calls == ["/p2p/v1/envelopes"]
    with pytest.raises(TooLargeForOnePost):
        _send_evidence(watched, store, part, 1000, known)
    assert calls[1:] == ["/p2p/v1/evidence/envelopes"]
    # A peer that has gained them is streamed to, and no longer known as without them.
    streaming = Peer(part.length)
    assert _send_evidence(streaming, store, part, 1000, known).status == 201
    assert bytes(streaming.held) == data
    assert known == set()

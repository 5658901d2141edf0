"""An attachment's key stream is used once: whatever an upload leaves behind (a blob published
but not recorded, one another request is still recording), bytes encrypted again from the
first byte are under a new stream header. Two ciphertexts of different plaintexts under one
XChaCha20 key stream would give away the XOR of the two evidence files to anyone who reads
the blob store (from review). Faults are injected at the disk (a failing or slow directory
sync), never in the node's own code."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.crypto.envelope import part_key
from app.db import unit_of_work
from app.evidence import blobstore, drafts
from app.evidence.node_store import blob_store
from app.evidence.stream import CHUNK_BYTES, CIPHER_CHUNK
from app.models import EvidenceDraft, EvidenceUpload
from tests.requests.conftest import EXAMPLE, Harness


def _draft(ar: Harness, size: int) -> tuple[str, str]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["attachments"] = [
        {"name": "e.bin", "media_type": "application/octet-stream", "size": size}
    ]
    created = ar.post("/api/v1/evidence/drafts", body)
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["attachments"][0]["href"]


def _blobs_of_size(ar: Harness, length: int) -> list[bytes]:
    store = blob_store(ar.node.settings)
    return [
        path.read_bytes() for path in store.blobs.glob("*/*/*") if path.stat().st_size == length
    ]


def _one_key_stream(first: bytes, second: bytes, plain_first: bytes, plain_second: bytes) -> bool:
    """Whether two secretstream chunks were made by the same key stream: a chunk is its
    encrypted tag byte, the message XOR the key stream, then the MAC."""
    count = min(len(plain_first), len(plain_second))
    cipher_xor = bytes(
        a ^ b for a, b in zip(first[1 : 1 + count], second[1 : 1 + count], strict=True)
    )
    return cipher_xor == bytes(
        a ^ b for a, b in zip(plain_first[:count], plain_second[:count], strict=True)
    )


def _header(ar: Harness, draft_id: str) -> bytes:
    with unit_of_work(ar.node.sessions) as session:
        found = session.scalar(
            select(EvidenceUpload.stream_header).where(EvidenceUpload.draft_id == draft_id)
        )
    assert found is not None
    return found


def test_a_blob_published_but_not_recorded_is_never_followed_under_its_key_stream(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob was renamed into the store, then the disk failed to sync its directory: the
    upload is answered with an error and not recorded, so the client starts again from the
    first byte, and with other bytes (the file changed, or another file was picked)."""
    size = CHUNK_BYTES + 100  # two chunks: the first is a whole one
    draft_id, href = _draft(ar, size)
    first, second = os.urandom(size), os.urandom(size)
    real_fsync = blobstore._fsync_dir
    published = {"now": False}
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        real_replace(source, target)
        published["now"] = "blobs" in str(target)

    def failing_fsync(path: Path) -> None:
        if published["now"]:
            published["now"] = False
            raise OSError(5, "Input/output error")
        real_fsync(path)

    headers = {**ar.as_("officer"), "upload-offset": "0"}
    with monkeypatch.context() as disk:
        disk.setattr(os, "replace", replace)
        disk.setattr(blobstore, "_fsync_dir", failing_fsync)
        failed = ar.http.patch(href, content=first, headers=headers)
    assert failed.status_code >= 500, failed.text
    assert "Input/output" not in failed.text
    head = ar.http.head(href, headers=ar.as_("officer"))
    assert (head.headers["upload-offset"], head.headers["upload-complete"]) == ("0", "?0")
    header_before = _header(ar, draft_id)

    again = ar.http.patch(href, content=second, headers=headers)
    assert again.status_code == 204, again.text
    assert _header(ar, draft_id) != header_before
    blobs = _blobs_of_size(ar, CIPHER_CHUNK + 100 + 17)
    assert len(blobs) == 2  # the unrecorded one is left to the sweep
    one, other = (blob[:CIPHER_CHUNK] for blob in blobs)
    plain_one, plain_other = first[:CHUNK_BYTES], second[:CHUNK_BYTES]
    assert not _one_key_stream(one, other, plain_one, plain_other)
    assert not _one_key_stream(one, other, plain_other, plain_one)


def test_an_upload_that_finishes_while_another_starts_again_replaces_nothing(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clients (or a client's retry) send the same attachment at once: A's blob is
    published but its row not yet written (a slow directory sync) when B starts from the
    first byte. B writes under a new header; A's record is refused, not B's evidence
    silently replaced by A's, and both were not told "complete" for different files."""
    size = 5000
    draft_id, href = _draft(ar, size)
    bytes_a, bytes_b = os.urandom(size), os.urandom(size)
    store = blob_store(ar.node.settings)
    real_fsync, real_replace = blobstore._fsync_dir, os.replace
    b_done = threading.Event()
    hold = {"armed": False, "used": False}

    def replace(source: Any, target: Any) -> None:
        real_replace(source, target)
        if "blobs" in str(target) and not hold["used"]:
            hold["armed"] = hold["used"] = True

    def slow_fsync(path: Path) -> None:
        if hold["armed"] and Path(path) == store.uploads:
            hold["armed"] = False
            b_done.wait(20)  # A's disk is slow until B is done
        real_fsync(path)

    answers: dict[str, httpx.Response] = {}
    headers = {**ar.as_("officer"), "upload-offset": "0"}
    monkeypatch.setattr(blobstore, "_fsync_dir", slow_fsync)
    monkeypatch.setattr(os, "replace", replace)

    def client_a() -> None:
        answers["A"] = ar.http.patch(href, content=bytes_a, headers=headers)

    thread = threading.Thread(target=client_a)
    thread.start()
    deadline = time.monotonic() + 20
    while not _blobs_of_size(ar, size + 17):  # A's blob is published
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with httpx.Client(base_url=str(ar.http.base_url), timeout=30) as other:
        answers["B"] = other.patch(href, content=bytes_b, headers=headers)
    b_done.set()
    thread.join(30)
    monkeypatch.undo()

    assert answers["B"].status_code == 204, answers["B"].text
    refused = answers["A"]
    assert (refused.status_code, refused.json()["error"]) == (409, "upload_changed")
    with unit_of_work(ar.node.sessions) as session:
        row = session.scalar(select(EvidenceUpload).where(EvidenceUpload.draft_id == draft_id))
        assert row is not None
        draft = session.get(EvidenceDraft, draft_id)
        assert draft is not None
        key = part_key(drafts._content_key(ar.node, draft), bytes.fromhex(draft_id), 1)
        digest, plain = row.digest, drafts.open_sha256(key, row)
    assert plain == hashlib.sha256(bytes_b).hexdigest()  # B's evidence, recorded once
    assert store.exists(str(digest))
    blobs = _blobs_of_size(ar, size + 17)
    assert len(blobs) == 2
    assert not _one_key_stream(blobs[0], blobs[1], bytes_a, bytes_b)
    assert not _one_key_stream(blobs[0], blobs[1], bytes_b, bytes_a)


def _target(draft_id: str, stream_header: bytes) -> drafts.UploadTarget:
    """What a renewal and a start compare: the attachment and the header written under."""
    return drafts.UploadTarget(
        draft_id=draft_id,
        index=1,
        size=0,
        upload_id=drafts.upload_id(draft_id, 1),
        key=b"",
        ad=b"",
        stream_header=stream_header,
        complete=False,
    )


def test_a_restart_leaves_alone_a_stream_another_request_started_since(ar: Harness) -> None:
    """A request whose upload failed renews the header it wrote under, never one another
    request put in place since, under which that request's chunks now are (from review)."""
    draft_id, _ = _draft(ar, 10)
    read = _header(ar, draft_id)
    started = drafts.new_stream_header()
    with unit_of_work(ar.node.sessions) as session:
        assert drafts.start_stream(session, _target(draft_id, read), started)
    with unit_of_work(ar.node.sessions) as session:
        assert not drafts.start_stream(session, _target(draft_id, read), os.urandom(24))
        drafts.renew_stream_header(session, _target(draft_id, read))  # the failed one's
    assert _header(ar, draft_id) == started
    with unit_of_work(ar.node.sessions) as session:
        drafts.renew_stream_header(session, _target(draft_id, started))
    assert _header(ar, draft_id) not in (read, started)


def test_a_kept_writer_is_not_used_under_a_header_renewed_since(ar: Harness) -> None:
    """This process kept the writer of the client's last PATCH; the attachment was started
    again since (its header renewed). Writing on with the kept writer would finish under the
    old header a part the row says is under the new one: a blob nobody could open."""
    size = 3 * CHUNK_BYTES
    draft_id, href = _draft(ar, size)
    data = os.urandom(size)
    headers = {**ar.as_("officer"), "upload-offset": "0"}
    first = ar.http.patch(href, content=data[: CHUNK_BYTES + 10], headers=headers)
    assert (first.status_code, first.headers["upload-offset"]) == (204, str(CHUNK_BYTES))
    with unit_of_work(ar.node.sessions) as session:
        drafts.renew_stream_header(session, _target(draft_id, _header(ar, draft_id)))
    resumed = ar.http.patch(
        href, content=data[CHUNK_BYTES:], headers={**headers, "upload-offset": str(CHUNK_BYTES)}
    )
    assert (resumed.status_code, resumed.json()["error"]) == (409, "offset_mismatch")
    assert resumed.headers["upload-offset"] == "0"
    done = ar.http.patch(href, content=data, headers=headers)
    assert done.status_code == 204, done.text
    submitted = ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {})
    assert submitted.status_code == 201, submitted.text


def test_a_request_at_another_offset_starts_nothing_again(ar: Harness) -> None:
    """A client's stray resend at an offset the node does not hold (while, say, the request
    that sent the last bytes is being recorded) is refused, and starts nothing: a new header
    there would have refused the finishing request its record (from review)."""
    draft_id, href = _draft(ar, 2 * CHUNK_BYTES)
    header = _header(ar, draft_id)
    stray = ar.http.patch(
        href, content=b"x" * 10, headers={**ar.as_("officer"), "upload-offset": str(CHUNK_BYTES)}
    )
    assert (stray.status_code, stray.json()["error"]) == (409, "offset_mismatch")
    assert stray.headers["upload-offset"] == "0"
    assert _header(ar, draft_id) == header

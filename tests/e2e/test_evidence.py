"""Large evidence between two real nodes: upload, resume, transfer, receipt, download.

Attachments are uploaded to ES/MJ's local API in pieces (each PATCH may stop anywhere),
sealed and sent to AR/MPF by the part-transfer protocol, and downloaded back at both ends,
byte for byte, with the manifest's SHA-256 shown and checked; uploads and transfers broken
off (a dropped connection, a killed receiver, a full disk, damaged staging) resume without
sending again what was kept. What happens to evidence once stored (damage, proofs, the
CLI) is in test_evidence_stored.py: two files, so that two test processes share them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select, text

from app.db import make_engine
from app.localnodes import LocalNode
from app.models import DeliveryAttempt, EvidenceUpload
from tests.conftest import BACKENDS
from tests.e2e.conftest import EXAMPLE, audit_details, submit_example, wait_for
from tests.e2e.evidence import (
    CHUNK,
    MIB,
    Pair,
    blob_dir,
    create_draft,
    detail,
    download,
    evidence_pair,
    head_offset,
    submit,
    upload,
    wait_receipt,
)


@pytest.fixture(scope="module", params=BACKENDS)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    with evidence_pair(request.param, tmp_path_factory) as started:
        yield started


def test_attachments_of_every_boundary_size_round_trip(pair: Pair) -> None:
    sizes = [0, 1, CHUNK, CHUNK + 1, 50 * MIB]
    blobs = [os.urandom(size) for size in sizes]
    draft = create_draft(pair.es, sizes)
    with pair.es.client("officer") as http:
        for item, data in zip(draft["attachments"], blobs, strict=True):
            upload(http, item["href"], data, piece=7 * MIB + 3)
    submitted = submit(pair.es, draft["id"])
    sent = wait_receipt(pair.es, submitted["id"])
    received = wait_for("the request at AR", lambda: detail(pair.ar, submitted["id"]))
    for node, view in ((pair.ar, received), (pair.es, sent)):
        listed = view["messages"][0]["attachments"]
        assert [entry["size"] for entry in listed] == sizes
        for entry, data in zip(listed, blobs, strict=True):
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            got, shown = download(node, entry["href"])
            assert got == data
            assert shown == entry["sha256"]
    # No plaintext on disk, anywhere under either node's blob store.
    for node in (pair.es, pair.ar):
        for path in blob_dir(node).rglob("*"):
            if path.is_file() and path.stat().st_size >= 64:
                assert blobs[-1][:64] not in path.read_bytes()


def _stream_headers(node: LocalNode, draft_id: str) -> list[bytes]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(EvidenceUpload.stream_header)
                .where(EvidenceUpload.draft_id == draft_id)
                .order_by(EvidenceUpload.part_index)
            )
            return [bytes(header) for (header,) in rows]
    finally:
        engine.dispose()


def test_an_upload_refused_for_sending_more_than_declared_keeps_none_of_it(pair: Pair) -> None:
    # Chunked, so no Content-Length lets the node refuse it before reading: the declared size
    # is reached exactly by the first piece (for the larger one, after two whole chunks),
    # and the request goes on.
    sizes = [5, 2 * CHUNK + 10]
    right = [os.urandom(size) for size in sizes]
    draft = create_draft(pair.es, sizes)
    first_headers = _stream_headers(pair.es, draft["id"])
    with pair.es.client("officer") as http:
        for item, data in zip(draft["attachments"], right, strict=True):
            wrong = os.urandom(len(data) + 20)
            refused = http.patch(
                item["href"],
                content=iter([wrong[: len(data)], wrong[len(data) :]]),
                headers={"upload-offset": "0"},
            )
            assert refused.status_code == 413, refused.text
            assert refused.json()["error"] == "too_large"
            assert head_offset(http, item["href"]) == 0
            upload(http, item["href"], data, piece=len(data))
    # The larger one had two chunks encrypted and written before the refusal: the right
    # bytes are encrypted under a new stream header, never under the wrong ones' key stream.
    # So are the smaller one's (none were written: its only chunk waits for the end), as
    # every start from the first byte is.
    later_headers = _stream_headers(pair.es, draft["id"])
    assert later_headers[0] != first_headers[0]
    assert later_headers[1] != first_headers[1]
    submitted = submit(pair.es, draft["id"])
    sent = detail(pair.es, submitted["id"])
    assert sent is not None
    for entry, data in zip(sent["messages"][0]["attachments"], right, strict=True):
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert download(pair.es, entry["href"])[0] == data


def test_an_upload_interrupted_at_random_offsets_resumes(pair: Pair) -> None:
    """Each attempt breaks off at a random byte (the client drops the connection); the next
    asks the node where to resume. Only bytes of the chunk a break cut are sent again."""
    rng = random.Random(6)
    size = 9 * MIB + 12345
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    href = draft["attachments"][0]["href"]
    sent = interruptions = 0
    with pair.es.client("officer") as http:
        while True:
            offset = head_offset(http, href)
            assert offset % CHUNK == 0 or offset == size
            if offset == size:
                break
            stop = rng.randrange(offset + 1, size + 1) if interruptions < 5 else size
            body = data[offset:stop]

            def body_then_break(body: bytes = body, stop: int = stop) -> Iterator[bytes]:
                for start in range(0, len(body), 256 * 1024):
                    yield body[start : start + 256 * 1024]
                if stop < size:
                    raise ConnectionAbortedError("the link broke")

            try:
                response = http.patch(
                    href,
                    content=body_then_break(),
                    headers={"upload-offset": str(offset), "content-length": str(size - offset)},
                )
                assert response.status_code == 204, response.text
            except ConnectionAbortedError:
                interruptions += 1
            sent += len(body)
            time.sleep(0.05)  # the node notices the disconnect and keeps its whole chunks
    assert interruptions == 5
    assert sent - size < interruptions * CHUNK
    submitted = submit(pair.es, draft["id"])
    wait_receipt(pair.es, submitted["id"])
    received = wait_for("the request at AR", lambda: detail(pair.ar, submitted["id"]))
    got, _ = download(pair.ar, received["messages"][0]["attachments"][0]["href"])
    assert got == data


def test_head_waits_for_a_patch_that_has_arrived_but_not_begun(pair: Pair) -> None:
    """A client whose link broke asks HEAD at once; the PATCH it broke off may not have
    reached the attachment's staging file yet (on a busy node, its token and draft still
    being read). HEAD waits for it and says where it left off, not the offset from before
    it: otherwise the client sent those bytes again and met that PATCH's 409 upload_busy.
    Here the PATCH is held at the row the node locks to start writing (PostgreSQL)."""
    if not pair.es.database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: the test's lock would hold HEAD too")
    data = os.urandom(2 * CHUNK)
    draft = create_draft(pair.es, [len(data) + 1])
    href = draft["attachments"][0]["href"]
    engine = make_engine(pair.es.database_url)
    try:
        with (
            engine.connect() as holding,
            pair.es.client("officer") as patching,
            pair.es.client("officer") as asking,
            ThreadPoolExecutor(max_workers=2) as pool,
        ):
            transaction = holding.begin()
            holding.execute(
                select(EvidenceUpload.id)
                .where(EvidenceUpload.draft_id == draft["id"])
                .with_for_update()
            )
            patched = pool.submit(
                patching.patch, href, content=data, headers={"upload-offset": "0"}
            )
            try:
                wait_for("the PATCH held at the row", lambda: _waiting_on_a_lock(engine))
                head = pool.submit(head_offset, asking, href)
                time.sleep(1.0)
                assert not head.done(), "HEAD answered while the PATCH was under way"
            finally:  # the PATCH let go, whatever happened: the pool waits for it
                transaction.rollback()
            assert patched.result(timeout=30).status_code == 204
            assert head.result(timeout=30) == 2 * CHUNK
    finally:
        engine.dispose()


def _waiting_on_a_lock(engine: Engine) -> bool | None:
    # A connection of its own: a transaction sees pg_stat_activity as it first read it.
    with engine.connect() as connection:
        waiting = connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return True if waiting else None


def test_declared_sizes_over_the_limits_are_refused_early(pair: Pair) -> None:
    body = json.loads(json.dumps(EXAMPLE))
    body["attachments"] = [{"name": "huge.img", "size": 1 << 50}]
    with pair.es.client("officer") as http:
        response = http.post("/api/v1/evidence/drafts", json=body)
        assert response.status_code == 413, response.text
        # The attachment by its place: a file name is case content, not for error bodies.
        assert "huge.img" not in response.text
        assert "attachment 1 exceeds" in response.json()["detail"]
        draft = create_draft(pair.es, [10])
        href = draft["attachments"][0]["href"]
        response = http.patch(href, content=b"x" * 11, headers={"upload-offset": "0"})
        assert response.status_code == 413, response.text


def _receiver_killed_mid_part(
    pair: Pair, size: int, past: int
) -> tuple[bytes, dict[str, Any], Path]:
    """An attachment of `size` bytes submitted at ES/MJ; AR/MPF killed once it has staged
    more than `past` bytes of it. Returns the data, the draft and AR's staging file."""
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    with pair.es.client("officer") as http:
        upload(http, draft["attachments"][0]["href"], data, piece=size)
    staging = blob_dir(pair.ar) / "uploads" / f"in-{draft['id']}-1"
    submit(pair.es, draft["id"])
    # Looked at often: a part goes through in a fraction of a second on a fast host, and its
    # staging file is gone once it is complete.
    deadline = time.monotonic() + 60
    while not (staging.exists() and staging.stat().st_size > past):
        assert time.monotonic() < deadline, "timed out waiting for AR to be mid-part"
        time.sleep(0.005)
    pair.ar.kill()
    return data, draft, staging


def test_a_receiver_killed_mid_part_resumes_without_resending(pair: Pair) -> None:
    data, draft, staging = _receiver_killed_mid_part(pair, 48 * MIB, 8 * MIB)
    held = staging.stat().st_size
    pair.ar.start()
    wait_receipt(pair.es, draft["id"], timeout=180)
    completed = [d for d in audit_details(pair.ar, "evidence.part_received") if d.get("index") == 1]
    resumed_from = completed[-1]["from_offset"]
    # The peer resumed where AR's whole chunks ended: nothing AR held was sent again.
    assert resumed_from > 0
    assert held - (CHUNK + 17) < resumed_from <= held
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    got, _ = download(pair.ar, received["messages"][0]["attachments"][0]["href"])
    assert got == data


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_receivers_damaged_staging_restarts_the_part_without_failing_it(
    pair: Pair, chunk: int
) -> None:
    """What the receiver stored of a part no longer opens (its disk's fault, not the
    sender's): it cuts the part back to the chunks before the damage (each was checked when
    it arrived) and says where to resume, as for any unknown offset. It was refused with a
    final code, and the sender failed a delivery the next attempt completes; then every
    earlier chunk was thrown away with it, and sent again (from review)."""
    data, draft, staging = _receiver_killed_mid_part(pair, 48 * MIB, 8 * MIB)
    cipher_chunk = CHUNK + 17
    with staging.open("r+b") as stored:
        stored.seek(chunk * cipher_chunk + 100)
        byte = stored.read(1)
        stored.seek(chunk * cipher_chunk + 100)
        stored.write(bytes([byte[0] ^ 1]))
    pair.ar.start()
    wait_receipt(pair.es, draft["id"], timeout=180)
    restarted = [d for d in audit_details(pair.ar, "evidence.part_restarted") if d["part"] == 1]
    assert restarted[-1]["outcome"] == "decrypt_failed"
    assert restarted[-1]["from_offset"] == chunk * cipher_chunk
    completed = [d for d in audit_details(pair.ar, "evidence.part_received") if d["index"] == 1]
    assert completed[-1]["from_offset"] == chunk * cipher_chunk  # not one byte more was resent
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    got, _ = download(pair.ar, received["messages"][0]["attachments"][0]["href"])
    assert got == data


@contextmanager
def disk_full_past(node: LocalNode, limit: int) -> Iterator[None]:
    """The running node's writes past `limit` bytes of any file fail (EFBIG), as on a full
    disk: RLIMIT_FSIZE set from outside (CPython ignores SIGXFSZ), lifted on exit. The
    node's database and log must stay under it: they are checked, not assumed."""
    assert node.process is not None
    if node.database_url.startswith("sqlite:///"):
        database = Path(node.database_url.removeprefix("sqlite:///"))
        for path in database.parent.glob(database.name + "*"):  # with its WAL
            assert path.stat().st_size < limit // 2, path
    assert node.log_path.stat().st_size < limit // 2
    pid = node.process.pid
    # The soft limit only: raising a hard limit again takes privileges.
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        with suppress(ProcessLookupError):  # a node that died: its own failure says why
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def attempt_statuses(node: LocalNode) -> list[int | None]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            return list(
                connection.scalars(select(DeliveryAttempt.http_status).order_by(DeliveryAttempt.id))
            )
    finally:
        engine.dispose()


def test_a_full_disk_refuses_an_upload_with_507_and_loses_nothing(pair: Pair) -> None:
    size, limit = 40 * MIB, 24 * MIB
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    href = draft["attachments"][0]["href"]
    with pair.es.client("officer") as http:
        with disk_full_past(pair.es, limit):
            response = http.patch(href, content=data, headers={"upload-offset": "0"})
            assert response.status_code == 507, response.text
            assert response.json()["error"] == "insufficient_storage"
            held = head_offset(http, href)
            assert limit - 2 * CHUNK < held < limit
            # Said by /readyz, but not out of service: requests without evidence still flow.
            ready = httpx.get(pair.es.url + "/readyz", timeout=10).json()
            assert (ready["status"], ready["failing"]) == ("degraded", ["evidence"]), ready
            assert ready["checks"]["evidence"].startswith("failing: the evidence storage was full")
            assert ready["checks"]["storage"] == "ok"
            submit_example(pair.es)  # asserts 201
            with pair.es.client("admin") as admin:
                metrics = admin.get("/metrics").text
            assert 'entraide_storage_full{storage="evidence"} 1.0' in metrics
            assert 'entraide_storage_full{storage="database"} 0.0' in metrics
            # Still full: refused again, and what was stored stays.
            response = http.patch(href, content=data[held:], headers={"upload-offset": str(held)})
            assert response.status_code == 507, response.text
            assert head_offset(http, href) == held
        # Room again: the upload resumes where it stopped, and nothing stored is sent again.
        assert upload(http, href, data, piece=size) == size - held
    submit(pair.es, draft["id"])
    wait_receipt(pair.es, draft["id"])
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    got, _ = download(pair.ar, received["messages"][0]["attachments"][0]["href"])
    assert got == data


def test_a_receiver_with_a_full_disk_answers_507_and_the_part_resumes(pair: Pair) -> None:
    size, limit = 40 * MIB, 24 * MIB
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    with pair.es.client("officer") as http:
        upload(http, draft["attachments"][0]["href"], data, piece=size)
    staging = blob_dir(pair.ar) / "uploads" / f"in-{draft['id']}-1"
    before = len(attempt_statuses(pair.es))
    with disk_full_past(pair.ar, limit):
        submit(pair.es, draft["id"])
        wait_for("a 507 from AR", lambda: 507 in attempt_statuses(pair.es)[before:] or None)
        held = staging.stat().st_size
        assert limit - 2 * (CHUNK + 17) < held <= limit
    wait_receipt(pair.es, draft["id"], timeout=180)
    completed = [d for d in audit_details(pair.ar, "evidence.part_received") if d.get("index") == 1]
    # The part resumed after AR's whole chunks: nothing AR held was sent again.
    assert held - (CHUNK + 17) < completed[-1]["from_offset"] <= held
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    got, _ = download(pair.ar, received["messages"][0]["attachments"][0]["href"])
    assert got == data


def test_an_upload_whose_stored_chunks_were_damaged_starts_again(pair: Pair) -> None:
    size = 5 * CHUNK + 10
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    href = draft["attachments"][0]["href"]
    with pair.es.client("officer") as http:
        response = http.patch(href, content=data[: 3 * CHUNK + 5], headers={"upload-offset": "0"})
        assert response.status_code == 204, response.text
        assert response.headers["upload-offset"] == str(3 * CHUNK)
    staging = blob_dir(pair.es) / "uploads" / f"out-{draft['id']}-1"
    stored = bytearray(staging.read_bytes())
    stored[100] ^= 1
    staging.write_bytes(bytes(stored))
    header_before = _stream_headers(pair.es, draft["id"])
    pair.es.stop()  # the writer kept in memory goes: the next one is rebuilt from the disk
    pair.es.start()
    with pair.es.client("officer") as http:
        offset = head_offset(http, href)
        response = http.patch(href, content=data[offset:], headers={"upload-offset": str(offset)})
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "offset_mismatch"
        assert response.headers["upload-offset"] == "0"
        # Started again from its first byte, under a new key stream: the client may now
        # send other bytes (a corrected file), never under the stream of the damaged ones.
        assert _stream_headers(pair.es, draft["id"]) != header_before
        # An offset past the attachment's end is a mismatch too, not "too large".
        past = http.patch(href, content=b"", headers={"upload-offset": str(size + 1)})
        assert (past.status_code, past.json()["error"]) == (409, "offset_mismatch")
        assert past.headers["upload-offset"] == "0"
        assert upload(http, href, data, piece=size) == size
    submit(pair.es, draft["id"])
    wait_receipt(pair.es, draft["id"])
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    got, _ = download(pair.ar, received["messages"][0]["attachments"][0]["href"])
    assert got == data


def test_node_memory_stays_flat_under_an_address_space_limit(
    pair: Pair, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Both node processes get at most HEADROOM more address space than they have when idle
    (RLIMIT_AS, set on the running processes); an attachment of twice that goes through."""
    if pair.databases.backend != "sqlite":
        pytest.skip("one backend is enough for the memory bound")
    import resource

    # Virtual address space, not resident memory: thread stacks and arenas reserve plenty
    # that is never touched, so the headroom is generous; the file is still twice it.
    headroom = 128 * MIB
    size = 2 * headroom
    for node in (pair.es, pair.ar):
        assert node.process is not None
        status = Path(f"/proc/{node.process.pid}/status").read_text()
        vm_size = (
            int(next(line for line in status.splitlines() if line.startswith("VmSize")).split()[1])
            * 1024
        )
        limit = vm_size + headroom
        resource.prlimit(node.process.pid, resource.RLIMIT_AS, (limit, limit))
    path = tmp_path_factory.mktemp("big") / "disk.img"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        block = os.urandom(MIB)
        for number in range(size // MIB):
            piece = number.to_bytes(8, "big") + block[8:]
            digest.update(piece)
            out.write(piece)
    draft = create_draft(pair.es, [size])

    def read_file() -> Iterator[bytes]:
        with path.open("rb") as source:
            while data := source.read(MIB):
                yield data

    with pair.es.client("officer") as http:
        http.timeout = httpx.Timeout(300.0)
        response = http.patch(
            draft["attachments"][0]["href"],
            content=read_file(),
            headers={"upload-offset": "0", "content-length": str(size)},
        )
        assert response.headers["upload-complete"] == "?1", response.text
    submit(pair.es, draft["id"])
    wait_receipt(pair.es, draft["id"], timeout=300)
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    href = received["messages"][0]["attachments"][0]["href"]
    got = hashlib.sha256()
    with pair.ar.client("officer") as http, http.stream("GET", href, timeout=300.0) as response:
        assert response.status_code == 200
        for data in response.iter_bytes(MIB):
            got.update(data)
    assert got.hexdigest() == digest.hexdigest()
    for node in (pair.es, pair.ar):
        assert node.process is not None
        assert node.process.poll() is None  # still running, under its limit

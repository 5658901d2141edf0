"""Large evidence between two real nodes: upload, resume, transfer, receipt, download.

Attachments are uploaded to ES/MJ's local API in pieces (each PATCH may stop anywhere),
sealed and sent to AR/MPF by the part-transfer protocol, and downloaded back at both ends,
byte for byte, with the manifest's SHA-256 shown and checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.crypto.envelope import CHUNK_BYTES
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import Base, DeliveryAttempt, EvidenceUpload, Message
from tests.conftest import BACKENDS, Databases, make_databases
from tests.e2e.conftest import EXAMPLE, audit_details, wait_for
from tests.requests_cli import requests_output, run_requests

CHUNK = CHUNK_BYTES
MIB = 1 << 20


class Pair:
    def __init__(self, es: LocalNode, ar: LocalNode, databases: Databases) -> None:
        self.es, self.ar, self.databases = es, ar, databases


def _prepare(node: LocalNode) -> None:
    node.init(clients={"admin": ("admin",), "officer": ("officer",)})
    node.start()


@pytest.fixture(scope="module", params=BACKENDS)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    base = tmp_path_factory.mktemp("nodes")
    es = LocalNode("ES/MJ", "Ministerio de Justicia", base / "es", databases.new("es"))
    ar = LocalNode("AR/MPF", "Ministerio Publico Fiscal", base / "ar", databases.new("ar"))
    try:
        for node in (es, ar):
            _prepare(node)
        es.pin(ar)
        ar.pin(es)
        yield Pair(es, ar, databases)
    finally:
        for node in (es, ar):
            node.stop()
        databases.drop_all()


def blob_dir(node: LocalNode) -> Path:
    return node.workdir / "blobs"


def newest_blob(node: LocalNode, length: int) -> Path:
    """The newest blob of this ciphertext length: the part a test has just sent."""
    blobs = [p for p in (blob_dir(node) / "blobs").rglob("*") if p.is_file()]
    return max((p for p in blobs if p.stat().st_size == length), key=lambda p: p.stat().st_mtime_ns)


def create_draft(node: LocalNode, sizes: list[int]) -> dict[str, Any]:
    body = json.loads(json.dumps(EXAMPLE))
    del body["attachments"]
    body["attachments"] = [
        {"name": f"evidence-{n}.bin", "media_type": "application/octet-stream", "size": size}
        for n, size in enumerate(sizes, 1)
    ]
    with node.client("officer") as http:
        response = http.post("/api/v1/evidence/drafts", json=body)
    assert response.status_code == 201, response.text
    draft: dict[str, Any] = response.json()
    return draft


def head_offset(http: httpx.Client, href: str) -> int:
    response = http.head(href)
    assert response.status_code == 204, response.status_code
    return int(response.headers["upload-offset"])


def upload(http: httpx.Client, href: str, data: bytes, piece: int) -> int:
    """PATCH in requests of `piece` bytes, each resuming from the node's answer; returns
    the number of bytes sent in all."""
    sent = 0
    offset = head_offset(http, href)
    while True:
        body = data[offset : offset + piece]
        response = http.patch(href, content=body, headers={"upload-offset": str(offset)})
        assert response.status_code == 204, response.text
        sent += len(body)
        offset = int(response.headers["upload-offset"])
        if response.headers["upload-complete"] == "?1":
            return sent


def submit(node: LocalNode, draft_id: str) -> dict[str, Any]:
    with node.client("officer") as http:
        response = http.post(f"/api/v1/evidence/drafts/{draft_id}/submit")
    assert response.status_code == 201, response.text
    submitted: dict[str, Any] = response.json()
    return submitted


def detail(node: LocalNode, request_id: str) -> dict[str, Any] | None:
    with node.client("officer") as http:
        response = http.get(f"/api/v1/requests/{request_id}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def wait_receipt(node: LocalNode, request_id: str, timeout: float = 120.0) -> dict[str, Any]:
    def receipted() -> dict[str, Any] | None:
        found = detail(node, request_id)
        return found if found and found["messages"][0]["receipt"] else None

    result: dict[str, Any] = wait_for("the receipt", receipted, timeout=timeout)
    return result


def download(node: LocalNode, href: str) -> tuple[bytes, str]:
    with node.client("officer") as http, http.stream("GET", href) as response:
        assert response.status_code == 200, response.read()
        data = b"".join(response.iter_bytes())
        return data, response.headers["x-entraide-sha256"]


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


@pytest.mark.parametrize("damage", ["altered", "truncated"])
def test_a_damaged_blob_is_refused_at_download_on_both_sides(pair: Pair, damage: str) -> None:
    size = 3 * MIB + 5
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    with pair.es.client("officer") as http:
        upload(http, draft["attachments"][0]["href"], data, piece=size)
    submit(pair.es, draft["id"])
    sent = wait_receipt(pair.es, draft["id"])
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    for node, view in ((pair.ar, received), (pair.es, sent)):
        digest = view["messages"][0]["attachments"][0]
        href = digest["href"]
        target = newest_blob(node, size + 4 * 17)  # this test's part
        original = target.read_bytes()
        if damage == "altered":
            target.write_bytes(original[:1000] + bytes([original[1000] ^ 1]) + original[1001:])
        else:
            target.write_bytes(original[: len(original) - CHUNK])
        with node.client("officer") as http:
            response = http.get(href)
        assert response.status_code == 500
        assert response.json()["error"] == "stored_envelope_corrupt"
        refused = audit_details(node, "attachment.downloaded")
        assert refused[-1]["outcome"] == "stored_envelope_corrupt"
        target.write_bytes(original)
        assert download(node, href)[0] == data
        if damage == "altered":
            _backdated_row_is_refused(node, draft["id"], href)


def _where_in_clear(node: LocalNode, secrets: list[bytes]) -> list[str]:
    """Every table.column of the node's database holding one of `secrets` (as text or bytes)."""
    engine = make_engine(node.database_url)
    found = []
    try:
        with engine.connect() as connection:
            for table in Base.metadata.sorted_tables:
                for row in connection.execute(select(table)):
                    for column, value in row._mapping.items():
                        data = value.encode() if isinstance(value, str) else value
                        if isinstance(data, bytes) and any(s in data for s in secrets):
                            found.append(f"{table.name}.{column}")
    finally:
        engine.dispose()
    return found


def test_an_attachments_plaintext_hash_is_never_stored_in_clear(pair: Pair) -> None:
    """Only routing metadata is in clear (DESIGN.md section 3): a copy of either database must
    not confirm which known file was sent, while it is uploaded, once sent and received, or
    once downloaded and audited (from two reviews: the upload's row kept it, and so did the
    download's audit entry)."""
    size = CHUNK + 1
    data = os.urandom(size)
    digest = hashlib.sha256(data).digest()
    secrets = [digest, digest.hex().encode(), digest.hex().upper().encode()]
    draft = create_draft(pair.es, [size])
    with pair.es.client("officer") as http:
        upload(http, draft["attachments"][0]["href"], data, piece=size)
    assert _where_in_clear(pair.es, secrets) == []
    submit(pair.es, draft["id"])
    sent = wait_receipt(pair.es, draft["id"])
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    for node, view in ((pair.ar, received), (pair.es, sent)):
        attachment = view["messages"][0]["attachments"][0]
        got, shown = download(node, attachment["href"])
        assert (got, shown) == (data, digest.hex())  # shown to the reader, checked
        assert _where_in_clear(node, secrets) == []
        entry = audit_details(node, "attachment.downloaded")[-1]
        assert entry["index"] == 1
        assert len(entry["part_sha256"]) == 64


def _signing_kid(node: LocalNode) -> str:
    shown = node.cli("keys", "show").stdout
    return next(
        line.split()[-1] for line in shown.splitlines() if line.startswith("signing key id")
    )


def test_either_side_proves_what_was_sent_and_received_to_a_court(
    pair: Pair, tmp_path: Path
) -> None:
    """Issue 6: "the receipt plus the manifest prove what was sent and received". Each node
    exports a custody proof of the message (audited), which `entraide proof verify` checks
    with no node, database or key of its own, and against the files themselves."""
    sizes = [CHUNK + 1, 7]
    files = [os.urandom(size) for size in sizes]
    draft = create_draft(pair.es, sizes)
    with pair.es.client("officer") as http:
        for attachment, data in zip(draft["attachments"], files, strict=True):
            upload(http, attachment["href"], data, piece=len(data))
    submit(pair.es, draft["id"])
    wait_receipt(pair.es, draft["id"])
    wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    on_disk = []
    for index, data in enumerate(files, 1):
        path = tmp_path / f"evidence-{index}.bin"
        path.write_bytes(data)
        on_disk.append(path)
    for node in (pair.es, pair.ar):
        with node.client("officer") as http:
            answer = http.get(f"/api/v1/requests/{draft['id']}/messages/{draft['id']}/proof")
        assert answer.status_code == 200, answer.text
        proof = tmp_path / f"proof-{node.authority_id.replace('/', '-')}.json"
        proof.write_text(answer.text)
        assert audit_details(node, "proof.exported")[-1]["outcome"] == "ok"
        for index, path in enumerate(on_disk, 1):
            checked = node.cli(
                "proof", "verify", str(proof), "--file", str(path), "--attachment", str(index)
            )
            assert f"is attachment {index}" in checked.stdout
        assert "received by     AR/MPF" in checked.stdout
        assert "Key ids NOT checked" in checked.stdout
        # The key ids each authority publishes, read out of band: pinned, or refused.
        kids = [_signing_kid(side) for side in (pair.es, pair.ar)]
        pinned = node.cli(
            "proof", "verify", str(proof), "--sender-kid", kids[0], "--receiver-kid", kids[1]
        )
        assert "Both key ids are those given." in pinned.stdout
        swapped = node.cli(
            "proof",
            "verify",
            str(proof),
            "--sender-kid",
            kids[1],
            "--receiver-kid",
            kids[0],
            check=False,
        )
        assert swapped.returncode == 1
        assert "the sender's key id is" in swapped.stderr
        wrong = node.cli("proof", "verify", str(proof), "--file", str(on_disk[1]), check=False)
        assert wrong.returncode == 1
        assert "is NOT attachment 1" in wrong.stderr
        altered = json.loads(answer.text)
        altered["receipt"] = altered["receipt"].replace("A", "B", 1)
        proof.write_text(json.dumps(altered))
        refused = node.cli("proof", "verify", str(proof), check=False)
        assert refused.returncode == 1
        assert "REFUSED" in refused.stderr


def _delivery_of(node: LocalNode, request_id: str) -> dict[str, Any]:
    with node.client("admin") as http:
        response = http.get("/api/v1/admin/deliveries", params={"limit": 20})
    assert response.status_code == 200, response.text
    found = [d for d in response.json()["items"] if d["request_id"] == request_id]
    assert len(found) == 1, found
    delivery: dict[str, Any] = found[0]
    return delivery


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing"])
def test_a_senders_damaged_blob_fails_its_delivery_as_its_own_fault(
    pair: Pair, damage: str
) -> None:
    """The sender's own blob of a part damaged before it went (a disk, a bad restore): the
    delivery fails as `stored_envelope_corrupt`, the sender's fault, audited and logged there,
    not as the peer's refusal nor as an internal error retried until it expires (from
    review); once the blob is put back, an operator's retry delivers it whole."""
    size = 3 * MIB + 5
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    with pair.es.client("officer") as http:
        upload(http, draft["attachments"][0]["href"], data, piece=size)
    refused_before = len(audit_details(pair.ar, "envelope.refused"))
    pair.ar.stop()  # the delivery waits while the blob is damaged
    try:
        submit(pair.es, draft["id"])
        target = newest_blob(pair.es, size + 4 * 17)
        original = target.read_bytes()
        if damage == "altered":
            target.write_bytes(original[:1000] + bytes([original[1000] ^ 1]) + original[1001:])
        elif damage == "truncated":
            target.write_bytes(original[: len(original) - CHUNK])
        else:
            target.unlink()
    finally:
        pair.ar.start()

    def failed() -> dict[str, Any] | None:
        delivery = _delivery_of(pair.es, draft["id"])
        return delivery if delivery["state"] == "failed" else None

    delivery = wait_for("the delivery to fail", failed, timeout=60)
    assert delivery["last_error"].startswith("stored_envelope_corrupt: part 1: "), delivery
    attempts = [d for d in audit_details(pair.es, "delivery.attempt") if d["outcome"] == "failed"]
    assert attempts[-1]["error"].startswith("stored_envelope_corrupt: part 1: ")
    # Not the peer's doing: nothing of this message was received as damaged there, bar the
    # one refused chunk of the altered blob, which the peer cannot tell from an attack.
    refused = audit_details(pair.ar, "envelope.refused")[refused_before:]
    assert len(refused) <= (1 if damage == "altered" else 0), refused
    target.write_bytes(original)
    with pair.es.client("admin") as http:
        retried = http.post(f"/api/v1/admin/deliveries/{delivery['id']}/retry")
    assert retried.status_code == 200, retried.text
    wait_receipt(pair.es, draft["id"])
    received = wait_for("the request at AR", lambda: detail(pair.ar, draft["id"]))
    got, _ = download(pair.ar, received["messages"][0]["attachments"][0]["href"])
    assert got == data


def _backdated_row_is_refused(node: LocalNode, msg_id: str, href: str) -> None:
    """The message row's copies of its signed header are checked too (a protocol review: a
    row backdated in the database read as verified); nothing is changed by the refusal."""
    engine = make_engine(node.database_url)
    try:
        with engine.begin() as connection:
            where = Message.msg_id == msg_id
            created = connection.scalar(select(Message.created_at).where(where))
            connection.execute(
                update(Message).where(where).values(created_at=datetime(2024, 1, 1, tzinfo=UTC))
            )
        with node.client("officer") as http:
            response = http.get(href)
        assert response.status_code == 500
        assert "differ from its signed header" in response.json()["detail"]
        with engine.begin() as connection:
            connection.execute(update(Message).where(where).values(created_at=created))
        assert download(node, href)[1] is not None
    finally:
        engine.dispose()


def test_a_download_checks_its_blob_with_no_transaction_open(pair: Pair) -> None:
    # The blob is replaced by a pipe: the node's check of it waits, as a check of tens of
    # GiB would, until the test writes the bytes. Meanwhile the node must take other
    # writes: SQLite has one writer, and a check inside a transaction would hold it.
    size = 2 * MIB + 7
    data = os.urandom(size)
    draft = create_draft(pair.es, [size])
    with pair.es.client("officer") as http:
        upload(http, draft["attachments"][0]["href"], data, piece=size)
    submit(pair.es, draft["id"])
    view = wait_receipt(pair.es, draft["id"])  # the transfer to AR/MPF is over
    href = view["messages"][0]["attachments"][0]["href"]
    target = newest_blob(pair.es, size + 3 * 17)
    original = target.read_bytes()
    kept = target.with_name(target.name + ".kept")
    target.rename(kept)
    os.mkfifo(target)
    downloaded: list[bytes] = []
    reader = threading.Thread(target=lambda: downloaded.append(download(pair.es, href)[0]))
    reader.start()
    try:
        time.sleep(1.0)  # the download reaches the pipe in milliseconds; then it waits there
        with pair.es.client("officer") as http:
            started = time.monotonic()
            response = http.post("/api/v1/requests", json=EXAMPLE, timeout=8)
            assert response.status_code == 201, response.text
            assert (
                time.monotonic() - started < 15
            )  # the blob's check, held at the pipe, takes for ever
        assert reader.is_alive()  # the download was still waiting on the pipe meanwhile
        assert not downloaded
    finally:
        _feed_and_restore(target, kept, original)
        reader.join(timeout=60)
    assert downloaded == [data]


def _feed_and_restore(fifo: Path, kept: Path, data: bytes) -> None:
    """Writes `data` into the pipe for the reader waiting on it, and puts the real file
    back in its place first (the reader's next open finds the file)."""
    deadline = time.monotonic() + 30
    while True:
        try:  # non-blocking: fails with ENXIO until the node holds the pipe open
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            if time.monotonic() > deadline:
                os.replace(kept, fifo)
                return
            time.sleep(0.05)
    os.set_blocking(descriptor, True)
    os.replace(kept, fifo)
    with os.fdopen(descriptor, "wb") as pipe:
        pipe.write(data)


def test_cli_sends_and_downloads_with_attachments(pair: Pair, tmp_path: Path) -> None:

    files = []
    (tmp_path / "copy").mkdir()
    # Two attachments of one name (from two folders): both are kept at download.
    # Python guesses `application/vnd.ms-excel.sheet.macroEnabled.12` and `audio/AMR` for the
    # last two: media types are case-insensitive, and they are sent in lower case.
    for name, size in (
        ("mailbox.pst", 2 * MIB + 7),
        ("empty.txt", 0),
        ("copy/mailbox.pst", 9),
        ("ledger.xlsm", 5),
        ("call.amr", 3),
    ):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        files.append(path)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({key: EXAMPLE[key] for key in ("to", "document")}))

    def entraide(node: LocalNode, *args: str, exit_code: int = 0) -> str:
        token = node.tokens["officer"]
        return requests_output(node.url, token, *args, exit_code=exit_code)

    attach = [argument for path in files for argument in ("--attach", str(path))]
    sent = entraide(pair.es, "send", str(request), *attach)
    assert sent.count("\n") == 1  # stdout holds the request id alone, for scripts
    request_id = sent.strip()
    # Resumed once submitted: said so, not advice to resume or discard it (both refused).
    again = entraide(pair.es, "send", str(request), "--draft", request_id, *attach, exit_code=1)
    assert f"draft {request_id} was already submitted: it is request {request_id}" in again
    assert "discard" not in again
    assert "--draft" not in again
    wait_receipt(pair.es, request_id)
    wait_for("the request at AR", lambda: detail(pair.ar, request_id))
    listing = entraide(pair.ar, "download", request_id, "--out", str(tmp_path / "got"))
    saved_as = ["mailbox.pst", "empty.txt", "mailbox (2).pst", "ledger.xlsm", "call.amr"]
    for path, saved in zip(files, saved_as, strict=True):
        got = tmp_path / "got" / saved
        assert got.read_bytes() == path.read_bytes()
        assert got.stat().st_mode & 0o777 == 0o600  # decrypted evidence: this user's only
        assert f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {saved}" in listing
    received = detail(pair.ar, request_id)
    assert received is not None
    assert [item["media_type"] for item in received["messages"][0]["attachments"][3:]] == [
        "application/vnd.ms-excel.sheet.macroenabled.12",
        "audio/amr",
    ]
    # Again into the same folder: nothing is overwritten, and it says why.
    again = entraide(pair.ar, "download", request_id, "--out", str(tmp_path / "got"), exit_code=1)
    assert "already in" in again
    assert (tmp_path / "got" / "mailbox.pst").read_bytes() == files[0].read_bytes()
    # A request the node does not know: said, and no empty folder left behind.
    unknown = entraide(pair.ar, "download", "ab" * 16, "--out", str(tmp_path / "no"), exit_code=1)
    assert "HTTP 404" in unknown
    assert not (tmp_path / "no").exists()


def _sent_with_inline_attachments(pair: Pair, names: list[str], contents: list[bytes]) -> str:
    """A request from ES/MJ with these attachments (names a peer may choose), once at AR/MPF."""
    body = {key: EXAMPLE[key] for key in ("to", "document")}
    body["attachments"] = [
        {"name": name, "content_base64": base64.b64encode(data).decode()}
        for name, data in zip(names, contents, strict=True)
    ]
    with pair.es.client("officer") as http:
        response = http.post("/api/v1/requests", json=body)
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    wait_for("the request at AR", lambda: detail(pair.ar, request_id))
    return request_id


def test_cli_downloads_attachments_whose_names_are_too_long_for_a_file(
    pair: Pair, tmp_path: Path
) -> None:
    """Names the API accepts (255 characters) but a file system does not (255 bytes, with
    the partial file's `.` and `.partial`): each was an ENAMETOOLONG traceback that stopped
    the whole download."""
    import subprocess

    names = ["a" * 251 + ".txt", "é" * 128, "€" * 90, "€" * 90]
    contents = [os.urandom(n + 1) for n in range(len(names))]
    request_id = _sent_with_inline_attachments(pair, names, contents)

    def entraide(*args: str) -> subprocess.CompletedProcess[str]:
        return run_requests(pair.ar.url, pair.ar.tokens["officer"], *args)

    done = entraide("download", request_id, "--out", str(tmp_path / "got"))
    assert done.returncode == 0, done.stderr
    saved = [line.split("  ", 1)[1] for line in done.stdout.splitlines()]
    assert len(set(saved)) == len(names)
    for name, data, file_name in zip(names, contents, saved, strict=True):
        assert (tmp_path / "got" / file_name).read_bytes() == data
        assert name.startswith(file_name.removesuffix(".txt").removesuffix(" (2)"))
    assert saved[0].endswith(".txt")
    assert saved[3].endswith(" (2)")
    # A folder that cannot be written in: one line saying so, not a traceback.
    (tmp_path / "a-file").write_text("")
    done = entraide("download", request_id, "--out", str(tmp_path / "a-file"))
    assert done.returncode == 1
    assert "cannot write into" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


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


def test_cli_downloads_never_delete_a_file_named_like_a_partial_one(
    pair: Pair, tmp_path: Path
) -> None:
    """From review: partial files were `.NAME.partial` beside the others, so a peer's
    attachment `.x.partial` was deleted when attachment `x` was downloaded (and so was a
    user's own file of that name). They are now in a folder of their own, removed after."""
    import subprocess
    import sys

    names = [".x.partial", "x"]
    contents = [b"first, named like a partial file", b"second"]
    request_id = _sent_with_inline_attachments(pair, names, contents)
    out = tmp_path / "got"
    out.mkdir()
    (out / ".y.partial").write_bytes(b"the user's own")
    env = {**os.environ, "ENTRAIDE_URL": pair.ar.url, "ENTRAIDE_TOKEN": pair.ar.tokens["officer"]}
    done = subprocess.run(
        [sys.executable, "-m", "app", "requests", "download", request_id, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in out.iterdir()) == [".x.partial", ".y.partial", "x"]
    assert (out / ".x.partial").read_bytes() == contents[0]
    assert (out / "x").read_bytes() == contents[1]
    assert (out / ".y.partial").read_bytes() == b"the user's own"

"""Large evidence once stored, between two real nodes: a damaged blob refused at download
and failed as the sender's own fault before it goes, no plaintext hash kept in clear, a
custody proof for a court from either side, downloads that hold no transaction while they
check a blob, and the `entraide requests` CLI sending and downloading attachments.

(Uploads and transfers, and their resumption, are in test_evidence.py.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db import make_engine
from app.localnodes import LocalNode
from app.models import Base, Message
from tests.conftest import BACKENDS
from tests.e2e.conftest import EXAMPLE, audit_details, wait_for
from tests.e2e.evidence import (
    CHUNK,
    MIB,
    Pair,
    create_draft,
    delivery_of,
    detail,
    download,
    evidence_pair,
    newest_blob,
    submit,
    upload,
    wait_receipt,
)
from tests.requests_cli import requests_output, run_requests


@pytest.fixture(scope="module", params=BACKENDS)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    with evidence_pair(request.param, tmp_path_factory) as started:
        yield started


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


def _fingerprint(node: LocalNode) -> str:
    shown = node.cli("keys", "show").stdout
    lines = shown.splitlines()
    return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("fingerprint"))


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
    # The key ids each authority publishes, read out of band (once: both proofs use them).
    kids = [_signing_kid(side) for side in (pair.es, pair.ar)]
    prints = [_fingerprint(side) for side in (pair.es, pair.ar)]
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
        # The key ids given: pinned, or refused.
        pinned = node.cli(
            "proof", "verify", str(proof), "--sender-kid", kids[0], "--receiver-kid", kids[1]
        )
        assert "Both keys are those given." in pinned.stdout
        # Or the fingerprints the operators read to each other when they pinned (`init`,
        # `keys show`): grouped, any case (from review: refused on a valid proof).
        by_fingerprint = node.cli(
            "proof",
            "verify",
            str(proof),
            "--sender-kid",
            prints[0],
            "--receiver-kid",
            prints[1].replace(" ", "").lower(),
        )
        assert "Both keys are those given." in by_fingerprint.stdout
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
        assert prints[0] in swapped.stderr  # named as the operator knows it too
        wrong = node.cli("proof", "verify", str(proof), "--file", str(on_disk[1]), check=False)
        assert wrong.returncode == 1
        assert "is NOT attachment 1" in wrong.stderr
        assert "verified" not in wrong.stdout  # a script reading the output is not misled
        altered = json.loads(answer.text)
        altered["receipt"] = altered["receipt"].replace("A", "B", 1)
        proof.write_text(json.dumps(altered))
        refused = node.cli("proof", "verify", str(proof), check=False)
        assert refused.returncode == 1
        assert "REFUSED" in refused.stderr


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
        delivery = delivery_of(pair.es, draft["id"])
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
    descriptor = None
    try:
        # The download has reached the pipe (the node opened it to check the blob); it waits.
        descriptor = _opened_by_a_reader(target)
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
        _feed_and_restore(target, kept, original, descriptor)
        reader.join(timeout=60)
    assert downloaded == [data]


def _opened_by_a_reader(fifo: Path, timeout: float = 30.0) -> int:
    """The pipe's write end, once the node holds the pipe open to read it (a non-blocking
    open fails with ENXIO until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the download did not open the blob in {timeout} s") from None
            time.sleep(0.05)


def _feed_and_restore(fifo: Path, kept: Path, data: bytes, descriptor: int | None) -> None:
    """Puts the real file back in its place (the reader's next open finds the file), then
    writes `data` into the pipe for the reader waiting on it, if one came."""
    if descriptor is None:
        os.replace(kept, fifo)
        return
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


def test_cli_downloads_never_delete_a_file_named_like_a_partial_one(
    pair: Pair, tmp_path: Path
) -> None:
    """From review: partial files were `.NAME.partial` beside the others, so a peer's
    attachment `.x.partial` was deleted when attachment `x` was downloaded (and so was a
    user's own file of that name). They are now in a folder of their own, removed after."""
    names = [".x.partial", "x"]
    contents = [b"first, named like a partial file", b"second"]
    request_id = _sent_with_inline_attachments(pair, names, contents)
    out = tmp_path / "got"
    out.mkdir()
    (out / ".y.partial").write_bytes(b"the user's own")
    done = run_requests(
        pair.ar.url, pair.ar.tokens["officer"], "download", request_id, "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in out.iterdir()) == [".x.partial", ".y.partial", "x"]
    assert (out / ".x.partial").read_bytes() == contents[0]
    assert (out / "x").read_bytes() == contents[1]
    assert (out / ".y.partial").read_bytes() == b"the user's own"


def test_the_readmes_send_command_sends_the_projects_example(pair: Pair, tmp_path: Path) -> None:
    """README's `entraide requests send` with the project's own example files: its request
    (docs/examples/request.json) holds its letter inline, which `send` refuses, so an operator
    trying the command from the documentation had to decode it first (from an operator's
    walkthrough). docs/examples/send.json and letter-of-request.txt are that example as
    `send` takes it (tests/domain/test_document.py checks they stay the same request)."""
    examples = Path(__file__).resolve().parents[2] / "docs" / "examples"
    letter = examples / "letter-of-request.txt"
    token = pair.es.tokens["officer"]
    sent = requests_output(
        pair.es.url, token, "send", str(examples / "send.json"), "--attach", str(letter)
    )
    request_id = sent.strip()
    wait_receipt(pair.es, request_id)
    wait_for("the request at AR", lambda: detail(pair.ar, request_id))
    out = tmp_path / "got"
    requests_output(
        pair.ar.url, pair.ar.tokens["officer"], "download", request_id, "--out", str(out)
    )
    assert (out / "letter-of-request.txt").read_bytes() == letter.read_bytes()

"""A client whose link broke asks `HEAD` where to resume at once, while the request that
broke may still be keeping what reached the node: answered then, the offset was short of the
chunks that request went on to keep, and the client sent them again or was refused as busy
(seen under load: 8.9 MB sent twice over five breaks of a 9 MiB upload). `HEAD` waits for
the request under way, for a while, and answers where it ended."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import update

from app.db import unit_of_work
from app.evidence import router
from app.evidence.drafts import upload_id
from app.evidence.node_store import blob_store
from app.evidence.stream import CHUNK_BYTES, CIPHER_CHUNK
from app.models import EvidenceUpload
from tests.requests.conftest import Harness
from tests.requests.test_upload_key_streams import _draft
from tests.requests_cli import run_requests


def _patch_then_hold(ar: Harness, href: str, data: bytes, sent: int) -> socket.socket:
    """A PATCH of all of `data` whose client sends the first `sent` bytes, then nothing."""
    address = urlsplit(str(ar.http.base_url))
    held = socket.create_connection((address.hostname, address.port))
    lines = [f"PATCH {href} HTTP/1.1", f"host: {address.netloc}", f"content-length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in ar.as_("officer").items()]
    lines.append("upload-offset: 0")
    held.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data[:sent])
    return held


def _staged(ar: Harness, draft_id: str, chunks: int) -> None:
    """Wait until the node has written `chunks` whole chunks of what it was sent."""
    staging = blob_store(ar.node.settings).uploads / upload_id(draft_id, 1)
    deadline = time.monotonic() + 20
    while not (staging.exists() and staging.stat().st_size >= chunks * CIPHER_CHUNK):
        assert time.monotonic() < deadline, "the node never wrote what it was sent"
        time.sleep(0.02)


def _head_in_thread(ar: Harness, href: str) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    headers = ar.as_("officer")
    asking = threading.Thread(target=lambda: answers.append(ar.http.head(href, headers=headers)))
    asking.start()
    return asking, answers


def test_head_asked_as_the_link_breaks_answers_where_the_broken_request_ended(
    ar: Harness,
) -> None:
    """Every whole chunk that reached the node is kept, the ones received after the last
    batch handed to the encryption too (they were dropped: up to 1 MiB sent again)."""
    data = os.urandom(4 * CHUNK_BYTES + 5)
    draft_id, href = _draft(ar, len(data))
    held = _patch_then_hold(ar, href, data, 3 * CHUNK_BYTES + 100)
    _staged(ar, draft_id, 1)
    asking, answers = _head_in_thread(ar, href)
    asking.join(1.0)
    assert not answers, "HEAD answered while a PATCH of the attachment was still under way"
    held.close()  # the link breaks: the node keeps the three whole chunks, lets the file go
    asking.join(20)
    assert answers, "HEAD never answered once the link broke"
    assert answers[0].status_code == 204
    assert answers[0].headers["upload-offset"] == str(3 * CHUNK_BYTES)
    # Taken at once from there: nothing sent again but the broken chunk, never refused busy.
    rest = ar.http.patch(
        href,
        content=data[3 * CHUNK_BYTES :],
        headers={**ar.as_("officer"), "upload-offset": str(3 * CHUNK_BYTES)},
    )
    assert rest.status_code == 204, rest.text
    assert rest.headers["upload-complete"] == "?1"


def test_head_does_not_wait_for_ever_on_a_request_still_sending(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client may be sending the attachment, alive but slow: `HEAD` gives the offset
    so far once it has waited its while (a PATCH from it is then refused as busy)."""
    monkeypatch.setattr(router, "RESUME_WAIT_SECONDS", 1.0)
    data = os.urandom(3 * CHUNK_BYTES + 5)
    draft_id, href = _draft(ar, len(data))
    held = _patch_then_hold(ar, href, data, 2 * CHUNK_BYTES + 100)
    try:
        _staged(ar, draft_id, 1)
        started = time.monotonic()
        answer = ar.http.head(href, headers=ar.as_("officer"))
        assert time.monotonic() - started >= 1.0
        assert answer.status_code == 204
        assert int(answer.headers["upload-offset"]) in (0, CHUNK_BYTES, 2 * CHUNK_BYTES)
        busy = ar.http.patch(
            href,
            content=data[:CHUNK_BYTES],
            headers={**ar.as_("officer"), "upload-offset": answer.headers["upload-offset"]},
        )
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"] == "upload_busy"
    finally:
        held.close()


def test_waiting_heads_hold_no_thread_other_requests_need(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More waiting HEADs than the node has threads for its routes (40): a route that needs
    one still answers at once (a HEAD that waited in a thread would have held them all)."""
    monkeypatch.setattr(router, "RESUME_WAIT_SECONDS", 6.0)
    data = os.urandom(3 * CHUNK_BYTES + 5)
    draft_id, href = _draft(ar, len(data))
    held = _patch_then_hold(ar, href, data, 2 * CHUNK_BYTES + 100)
    headers = ar.as_("officer")
    try:
        _staged(ar, draft_id, 1)
        with ThreadPoolExecutor(max_workers=45) as pool:
            waiting = [pool.submit(ar.http.head, href, headers=headers) for _ in range(45)]
            time.sleep(1.0)
            assert not any(head.done() for head in waiting)
            started = time.monotonic()
            alive = ar.http.get("/healthz")  # a sync route: it runs in one of those threads
            assert alive.status_code == 200
            assert time.monotonic() - started < 3.0
            held.close()
            assert {head.result(timeout=20).status_code for head in waiting} == {204}
    finally:
        held.close()


def test_the_cli_asks_again_where_to_resume_when_told_to(
    ar: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`entraide requests send --draft` whose PATCH is refused as busy (the attachment still
    held by a request its link left) asks HEAD again, and finishes once the node let the
    attachment go. It gave up at the first such refusal, one the API says to ask again."""
    monkeypatch.setattr(router, "RESUME_WAIT_SECONDS", 0.2)
    data = os.urandom(3 * CHUNK_BYTES + 5)
    draft_id, href = _draft(ar, len(data))
    evidence = tmp_path / "e.bin"
    evidence.write_bytes(data)
    held = _patch_then_hold(ar, href, data, 2 * CHUNK_BYTES + 100)
    try:
        _staged(ar, draft_id, 1)
        with ThreadPoolExecutor(max_workers=1) as pool:
            sending = pool.submit(
                run_requests,
                str(ar.http.base_url),
                ar.tokens["officer"],
                *("send", str(evidence), "--draft", draft_id, "--attach", str(evidence)),
            )
            deadline = time.monotonic() + 60
            while ("client:officer", "upload_busy", draft_id) not in ar.audit("api.refused"):
                assert not sending.done(), sending.result().stderr
                assert time.monotonic() < deadline, "the CLI's PATCH was never refused as busy"
                time.sleep(0.1)
            held.close()  # the link breaks: the node lets the attachment go
            done = sending.result(timeout=180)
    finally:
        held.close()
    assert done.returncode == 0, done.stderr
    # Said as a wait, not as the end of the command.
    assert "error:" not in done.stderr
    assert "e.bin: HTTP 409 upload_busy: " in done.stderr
    assert "; trying again in " in done.stderr
    assert ar.get(f"/api/v1/evidence/drafts/{draft_id}").json()["state"] == "submitted"


def test_a_resumed_draft_whose_file_changed_between_runs_is_not_submitted(
    ar: Harness, tmp_path: Path
) -> None:
    """The first chunk uploaded from one version of a file, the rest from a later one (same
    size): `send --draft` would have submitted the mix, the node hashing what it received.
    The draft shows the SHA-256 the node computed, and the command compares the file with
    it before submitting anything."""
    first = os.urandom(2 * CHUNK_BYTES + 5)
    draft_id, href = _draft(ar, len(first))
    began = ar.http.patch(
        href,
        content=first[:CHUNK_BYTES],
        headers={**ar.as_("officer"), "upload-offset": "0"},
    )
    assert began.status_code == 204, began.text
    evidence = tmp_path / "e.bin"
    evidence.write_bytes(os.urandom(len(first)))  # rewritten between the two runs
    resumed = run_requests(
        str(ar.http.base_url),
        ar.tokens["officer"],
        *("send", str(evidence), "--draft", draft_id, "--attach", str(evidence)),
    )
    assert resumed.returncode == 1, resumed.stderr
    assert "is not the file whose upload this draft holds" in resumed.stderr
    view = ar.get(f"/api/v1/evidence/drafts/{draft_id}").json()
    assert view["state"] == "open"
    mixed = first[:CHUNK_BYTES] + evidence.read_bytes()[CHUNK_BYTES:]
    assert view["attachments"][0]["complete"] is True
    assert view["attachments"][0]["sha256"] == hashlib.sha256(mixed).hexdigest()


def test_a_resumed_draft_of_the_same_file_is_submitted(ar: Harness, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 5)
    draft_id, href = _draft(ar, len(data))
    assert ar.get(f"/api/v1/evidence/drafts/{draft_id}").json()["attachments"][0]["sha256"] is None
    began = ar.http.patch(
        href, content=data[:CHUNK_BYTES], headers={**ar.as_("officer"), "upload-offset": "0"}
    )
    assert began.status_code == 204, began.text
    evidence = tmp_path / "e.bin"
    evidence.write_bytes(data)
    resumed = run_requests(
        str(ar.http.base_url),
        ar.tokens["officer"],
        *("send", str(evidence), "--draft", draft_id, "--attach", str(evidence)),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert ar.get(f"/api/v1/evidence/drafts/{draft_id}").json()["state"] == "submitted"


def test_a_draft_whose_recorded_hash_no_longer_opens_is_still_shown(ar: Harness) -> None:
    """Its view shows no hash then (a 500 made the draft unreachable, even to discard it;
    from review); `send --draft` refuses to submit it, and so does the node."""
    data = os.urandom(5)
    draft_id, href = _draft(ar, len(data))
    done = ar.http.patch(href, content=data, headers={**ar.as_("officer"), "upload-offset": "0"})
    assert done.status_code == 204, done.text
    with unit_of_work(ar.node.sessions) as session:
        session.execute(
            update(EvidenceUpload)
            .where(EvidenceUpload.draft_id == draft_id)
            .values(sealed_sha256=b"\0" * 48)
        )
    view = ar.get(f"/api/v1/evidence/drafts/{draft_id}")
    assert view.status_code == 200, view.text
    assert view.json()["attachments"][0]["complete"] is True
    assert view.json()["attachments"][0]["sha256"] is None

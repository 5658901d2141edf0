"""Discarding drafts: by their author (`DELETE`), or by the node once idle too long. Before
this, a draft a system abandoned kept its uploads, gigabytes of ciphertext, for ever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.evidence import drafts
from app.evidence.cleanup import OrphanSweep
from app.evidence.node_store import blob_store
from app.models import AuditEntry, EvidenceDraft, EvidenceUpload
from tests.requests.conftest import EXAMPLE, Harness


def _draft_body(*sizes: int) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["attachments"] = [
        {"name": f"e{n}.bin", "media_type": "application/octet-stream", "size": size}
        for n, size in enumerate(sizes)
    ]
    return body


def _draft(ar: Harness, *sizes: int, client: str = "officer") -> tuple[str, list[str]]:
    created = ar.post("/api/v1/evidence/drafts", _draft_body(*sizes), client)
    assert created.status_code == 201, created.text
    return created.json()["id"], [item["href"] for item in created.json()["attachments"]]


def _patch(ar: Harness, href: str, data: bytes, offset: int = 0) -> None:
    headers = {**ar.as_("officer"), "upload-offset": str(offset)}
    answer = ar.http.patch(href, content=data, headers=headers)
    assert answer.status_code == 204, answer.text


def _files(ar: Harness, draft_id: str) -> tuple[list[str], list[str]]:
    """(this draft's staging files, its complete attachments' blobs still on disk)."""
    store = blob_store(ar.node.settings)
    with unit_of_work(ar.node.sessions) as session:
        digests = list(
            session.scalars(
                select(EvidenceUpload.digest).where(
                    EvidenceUpload.draft_id == draft_id, EvidenceUpload.digest.is_not(None)
                )
            )
        )
    staging = sorted(p.name for p in store.uploads.iterdir() if draft_id in p.name)
    return staging, [str(d) for d in digests if d is not None and store.exists(str(d))]


def _discards(ar: Harness, draft_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    with unit_of_work(ar.node.sessions) as session:
        rows = session.execute(
            select(AuditEntry.actor, AuditEntry.outcome, AuditEntry.entry)
            .where(AuditEntry.action == "evidence.draft_discarded")
            .where(AuditEntry.msg_id == draft_id)
        )
        return [(actor, outcome, json.loads(entry)["details"]) for actor, outcome, entry in rows]


def _exists(ar: Harness, draft_id: str) -> bool:
    with unit_of_work(ar.node.sessions) as session:
        return session.get(EvidenceDraft, draft_id) is not None


def test_its_author_discards_an_open_draft_and_its_files_go_at_once(ar: Harness) -> None:
    chunk = drafts.CHUNK_BYTES
    draft_id, (whole, partial) = _draft(ar, 5, 2 * chunk + 7)
    _patch(ar, whole, b"12345")
    _patch(ar, partial, b"x" * chunk)  # one whole chunk staged, the rest never sent
    staging, blobs = _files(ar, draft_id)
    assert (len(staging), len(blobs)) == (1, 1)
    store = blob_store(ar.node.settings)

    answer = ar.http.delete(f"/api/v1/evidence/drafts/{draft_id}", headers=ar.as_("officer"))

    assert answer.status_code == 204, answer.text
    assert _files(ar, draft_id) == ([], [])
    assert not store.exists(blobs[0])
    assert not _exists(ar, draft_id)
    assert _discards(ar, draft_id) == [
        ("client:officer", "by_author", {"attachments": 2, "complete": 1, "bytes": 2 * chunk + 12})
    ]
    # Gone for every route, as an id never used is.
    for answer in (
        ar.get(f"/api/v1/evidence/drafts/{draft_id}"),
        ar.http.patch(partial, content=b"x", headers={**ar.as_("officer"), "upload-offset": "0"}),
        ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}),
        ar.http.delete(f"/api/v1/evidence/drafts/{draft_id}", headers=ar.as_("officer")),
    ):
        assert (answer.status_code, answer.json()["error"]) == (404, "unknown_draft")
    assert _files(ar, draft_id) == ([], [])  # the refused PATCH left nothing behind


def test_a_submitted_draft_is_a_request_and_stays(ar: Harness) -> None:
    draft_id, (href,) = _draft(ar, 3)
    _patch(ar, href, b"abc")
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}).status_code == 201

    answer = ar.http.delete(f"/api/v1/evidence/drafts/{draft_id}", headers=ar.as_("officer"))

    assert (answer.status_code, answer.json()["error"]) == (409, "draft_submitted")
    assert _exists(ar, draft_id)
    assert _discards(ar, draft_id) == []
    assert len(_files(ar, draft_id)[1]) == 1  # its blob is the request's part now
    assert ar.get(f"/api/v1/requests/{draft_id}").status_code == 200


def test_another_officer_cannot_discard_it(ar: Harness) -> None:
    draft_id, (href,) = _draft(ar, 3)
    _patch(ar, href, b"abc")

    answer = ar.http.delete(f"/api/v1/evidence/drafts/{draft_id}", headers=ar.as_("alice"))

    assert (answer.status_code, answer.json()["error"]) == (404, "unknown_draft")
    assert _exists(ar, draft_id)
    assert len(_files(ar, draft_id)[1]) == 1
    auditor = ar.http.delete(f"/api/v1/evidence/drafts/{draft_id}", headers=ar.as_("auditor"))
    assert auditor.status_code == 403
    assert _exists(ar, draft_id)


def test_a_draft_being_uploaded_to_is_not_discarded_under_the_upload(ar: Harness) -> None:
    """Another server process of the node writing an attachment holds its staging file's
    lock; the discard waits for no one and removes nothing: 409, and the draft whole."""
    draft_id, (href,) = _draft(ar, 2 * drafts.CHUNK_BYTES)
    _patch(ar, href, b"y" * drafts.CHUNK_BYTES)
    store = blob_store(ar.node.settings)
    with store.upload(drafts.upload_id(draft_id, 1)):
        answer = ar.http.delete(f"/api/v1/evidence/drafts/{draft_id}", headers=ar.as_("officer"))
    assert (answer.status_code, answer.json()["error"]) == (409, "upload_busy")
    assert _exists(ar, draft_id)
    assert _discards(ar, draft_id) == []
    head = ar.http.head(href, headers=ar.as_("officer"))
    assert head.headers["upload-offset"] == str(drafts.CHUNK_BYTES)  # nothing lost
    _patch(ar, href, b"y" * drafts.CHUNK_BYTES, offset=drafts.CHUNK_BYTES)
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}).status_code == 201


def _open_files() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            continue
    return links


def _age(ar: Harness, draft_id: str, days: float) -> None:
    """As if the draft had last been touched `days` ago, its staging files too."""
    with unit_of_work(ar.node.sessions) as session:
        session.execute(
            update(EvidenceDraft)
            .where(EvidenceDraft.id == draft_id)
            .values(updated_at=utc_now() - timedelta(days=days))
        )
    then = time.time() - days * 86400
    for path in blob_store(ar.node.settings).uploads.iterdir():
        if draft_id in path.name:
            os.utime(path, (then, then))


def test_the_sweep_discards_drafts_idle_too_long(ar: Harness) -> None:
    idle_days = ar.node.settings.evidence_draft_days
    idle, (idle_href,) = _draft(ar, 2 * drafts.CHUNK_BYTES)
    _patch(ar, idle_href, b"z" * drafts.CHUNK_BYTES)
    _age(ar, idle, idle_days + 1)
    recent_upload, (recent_href,) = _draft(ar, 2 * drafts.CHUNK_BYTES)
    _patch(ar, recent_href, b"z" * drafts.CHUNK_BYTES)
    _age(ar, recent_upload, idle_days + 1)
    staging = blob_store(ar.node.settings).uploads / drafts.upload_id(recent_upload, 1)
    os.utime(staging)  # an upload still moving, its draft's row untouched since creation
    young, _ = _draft(ar, 1)
    _age(ar, young, idle_days - 1)
    submitted, (href,) = _draft(ar, 1)
    _patch(ar, href, b"s")
    assert ar.post(f"/api/v1/evidence/drafts/{submitted}/submit", {}).status_code == 201
    _age(ar, submitted, idle_days + 1)

    OrphanSweep(ar.node).run_due()

    assert not _exists(ar, idle)
    assert _files(ar, idle) == ([], [])
    assert _discards(ar, idle) == [
        ("node", "expired", {"attachments": 1, "complete": 0, "bytes": 2 * drafts.CHUNK_BYTES})
    ]
    # The idle draft's writer, kept by this process between its PATCHes, let its removed
    # staging file go: no descriptor holds its space.
    assert not [link for link in _open_files() if idle in link]
    for kept in (recent_upload, young, submitted):
        assert _exists(ar, kept)
        assert _discards(ar, kept) == []
    assert staging.exists()


def test_an_upload_finished_keeps_its_draft_alive(ar: Harness, tmp_path: Path) -> None:
    draft_id, (first, second) = _draft(ar, 1, 1)
    _age(ar, draft_id, ar.node.settings.evidence_draft_days + 1)
    _patch(ar, first, b"1")  # activity: the draft's last-touched time moves
    OrphanSweep(ar.node).run_due()
    assert _exists(ar, draft_id)
    _patch(ar, second, b"2")
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}).status_code == 201


def test_the_command_line_discards_a_draft(ar: Harness) -> None:
    draft_id, (href,) = _draft(ar, 3)
    _patch(ar, href, b"abc")
    env = {
        **os.environ,
        "ENTRAIDE_URL": str(ar.http.base_url).rstrip("/"),
        "ENTRAIDE_TOKEN": ar.tokens["officer"],
    }

    def discard() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app", "requests", "discard", draft_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = discard()
    assert (done.returncode, done.stdout.strip()) == (0, f"draft {draft_id} discarded"), done
    assert not _exists(ar, draft_id)
    assert _files(ar, draft_id) == ([], [])
    again = discard()
    assert again.returncode == 1
    assert "HTTP 404" in again.stderr
    assert "unknown_draft" in again.stderr

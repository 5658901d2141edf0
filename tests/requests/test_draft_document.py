"""An open evidence draft's document can be read back and replaced, its uploads kept.

Before, a draft whose document was wrong (a hash attested for a file other than the one
uploaded, a postponement's date passed while tens of GiB uploaded) could only be discarded,
its uploads with it: the officer made another and sent every byte again. Now its author
replaces the document (`PUT .../document`), judged as the route that made the draft judges
it, and submits. The node is AR/MPF, in process (tests/requests/conftest.py), on both backends.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.evidence.cleanup import OrphanSweep
from app.models import EvidenceDraft, EvidenceUpload
from tests.requests.conftest import EXAMPLE, Harness
from tests.requests.test_draft_discard import _age, _exists
from tests.requests.test_reply_drafts import (
    _accepted_request,
    _create,
    _draft_body,
    _postponement_drafted_days_ago,
    _result,
    _submit,
    _upload_all,
)


def _document_of(ar: Harness, draft_id: str, client: str = "officer") -> httpx.Response:
    return ar.get(f"/api/v1/evidence/drafts/{draft_id}/document", client)


def _replace(
    ar: Harness, draft_id: str, document: object, client: str = "officer"
) -> httpx.Response:
    return ar.http.put(
        f"/api/v1/evidence/drafts/{draft_id}/document",
        headers=ar.as_(client),
        json={"document": document},
    )


def _stored(ar: Harness, draft_id: str) -> tuple[bytes, list[tuple[int, str | None, bytes]]]:
    """The draft's sealed content and its uploads' (index, digest, stream header)."""
    with unit_of_work(ar.node.sessions) as session:
        draft = session.get(EvidenceDraft, draft_id)
        assert draft is not None
        uploads = session.execute(
            select(EvidenceUpload.part_index, EvidenceUpload.digest, EvidenceUpload.stream_header)
            .where(EvidenceUpload.draft_id == draft_id)
            .order_by(EvidenceUpload.part_index)
        )
        return draft.sealed_content, [(i, d, h) for i, d, h in uploads]


def _request_draft(ar: Harness, summary: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(
        requesting_authority="AR/MPF", requested_authority="ES/MJ", summary_of_facts=summary
    )
    body["attachments"] = [
        {"name": "image.dd", "media_type": "application/octet-stream", "size": 5}
    ]
    created = ar.post("/api/v1/evidence/drafts", body)
    assert created.status_code == 201, created.text
    draft: dict[str, Any] = created.json()
    draft["document"] = body["document"]
    return draft


def test_a_wrong_hash_is_corrected_without_uploading_again(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"the statement as uploaded", b"%PDF-1.7 annex"]
    wrong = _result(files, attested=[b"the statement as the officer hashed it", files[1]])
    draft = _create(ar, _draft_body(request_id, wrong, files)).json()
    _upload_all(ar, draft, files, "officer")
    refused = _submit(ar, draft["id"])
    assert refused.json()["error"] == "evidence_hash_mismatch", refused.text
    _, uploads = _stored(ar, draft["id"])
    reads, edits = (
        len(ar.audit("evidence.draft_document_read")),
        len(ar.audit("evidence.draft_edited")),
    )

    shown = _document_of(ar, draft["id"])
    assert shown.status_code == 200, shown.text
    assert [item["sha256"] for item in shown.json()["document"]["evidence"]] == [
        item["sha256"] for item in wrong["evidence"]
    ]
    right = _result(files)
    replaced = _replace(ar, draft["id"], right)

    assert replaced.status_code == 200, replaced.text
    assert replaced.json() == _document_of(ar, draft["id"]).json()
    # Its uploads untouched: same blobs, same stream headers, nothing to send again.
    assert _stored(ar, draft["id"])[1] == uploads
    assert ar.get(f"/api/v1/evidence/drafts/{draft['id']}").json()["state"] == "open"
    submitted = _submit(ar, draft["id"])
    assert submitted.status_code == 201, submitted.text
    sent = ar.get(f"/api/v1/requests/{request_id}").json()["messages"][-1]
    assert sent["msg_id"] == draft["id"]
    assert [item["sha256"] for item in sent["content"]["evidence"]] == [
        hashlib.sha256(data).hexdigest() for data in files
    ]
    assert [a["sha256"] for a in sent["attachments"]] == [
        hashlib.sha256(data).hexdigest() for data in files
    ]
    # On the request's trail: who read and who replaced the draft's document.
    assert ar.audit("evidence.draft_document_read")[reads:][0] == (
        "client:officer",
        "ok",
        request_id,
    )
    assert ar.audit("evidence.draft_edited")[edits:] == [("client:officer", "ok", request_id)]


def test_a_postponement_whose_date_passed_is_given_a_new_one(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    postponement, draft = _postponement_drafted_days_ago(ar, request_id)
    assert _submit(ar, draft["id"]).json()["error"] == "postponement_until_past"

    # Judged by today's clock, as POST .../messages judges a message.
    still_past = _replace(ar, draft["id"], postponement)
    assert still_past.status_code == 422, still_past.text
    assert [(f["loc"], f["type"]) for f in still_past.json()["fields"]] == [
        (["body", "document", "until"], "postponement_until_past")
    ]
    later = {**postponement, "until": (utc_now() + timedelta(days=30)).date().isoformat()}
    assert _replace(ar, draft["id"], later).status_code == 200

    submitted = _submit(ar, draft["id"])
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["status"] == "postponed"
    sent = ar.get(f"/api/v1/requests/{request_id}").json()["messages"][-1]
    assert sent["content"]["until"] == later["until"]


def test_a_new_requests_draft_is_sent_with_its_replaced_document(ar: Harness) -> None:
    draft = _request_draft(ar, "First wording of the facts.")
    sent = ar.http.patch(
        draft["attachments"][0]["href"],
        content=b"image",
        headers={**ar.as_("officer"), "upload-offset": "0"},
    )
    assert sent.status_code == 204, sent.text
    sealed_before, uploads = _stored(ar, draft["id"])
    marker = "Reworded: funds moved through 14 accounts between March and May."
    document = {**draft["document"], "summary_of_facts": marker}

    replaced = _replace(ar, draft["id"], document)

    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["document"]["summary_of_facts"] == marker
    sealed_after, uploads_after = _stored(ar, draft["id"])
    assert uploads_after == uploads
    # Encrypted at rest, as at creation: the new text is not in the row.
    assert sealed_after != sealed_before
    assert marker.encode() not in sealed_after
    assert ar.post(f"/api/v1/evidence/drafts/{draft['id']}/submit", {}).status_code == 201
    request = ar.get(f"/api/v1/requests/{draft['id']}").json()
    assert request["messages"][0]["content"]["summary_of_facts"] == marker


def test_refused_replacements_change_nothing(ar: Harness) -> None:
    draft = _request_draft(ar, "The facts as first drafted.")
    draft_id = draft["id"]
    sealed, uploads = _stored(ar, draft_id)
    refusals = len(ar.audit("api.refused"))
    elsewhere = {**draft["document"], "requested_authority": "FR/DACG"}
    not_a_document = {**draft["document"], "offences": []}
    answers = [
        _replace(ar, draft_id, elsewhere),  # the recipient is the draft's
        _replace(ar, draft_id, not_a_document),
        _replace(ar, draft_id, "a string"),
        _replace(ar, draft_id, draft["document"], client="alice"),  # not her draft
        _replace(ar, "0" * 32, draft["document"]),
        _document_of(ar, draft_id, client="alice"),
    ]

    assert [(a.status_code, a.json()["error"]) for a in answers] == [
        (400, "recipient_mismatch"),
        (422, "invalid_request"),
        (422, "invalid_request"),
        (404, "unknown_draft"),
        (404, "unknown_draft"),
        (404, "unknown_draft"),
    ]
    assert answers[1].json()["fields"][0]["loc"][:3] == ["body", "document", "offences"]
    assert "The facts" not in answers[1].text
    assert _stored(ar, draft_id) == (sealed, uploads)
    assert len(ar.audit("api.refused")) > refusals


def test_a_reply_document_naming_an_undeclared_attachment_is_refused(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"records"]
    draft = _create(ar, _draft_body(request_id, _result(files), files)).json()
    sealed = _stored(ar, draft["id"])
    naming_two = _result([b"records", b"a second file never declared"])

    refused = _replace(ar, draft["id"], naming_two)

    assert refused.status_code == 422, refused.text
    assert ["body", "document", "evidence", 1, "attachment"] in [
        field["loc"] for field in refused.json()["fields"]
    ]
    assert _stored(ar, draft["id"]) == sealed


def test_a_submitted_draft_is_read_and_answered_as_its_request(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"records"]
    draft = _create(ar, _draft_body(request_id, _result(files), files)).json()
    _upload_all(ar, draft, files, "officer")
    assert _submit(ar, draft["id"]).status_code == 201
    edits = len(ar.audit("evidence.draft_edited"))

    answers = [
        _document_of(ar, draft["id"]),
        _replace(ar, draft["id"], _result(files)),
        _replace(ar, draft["id"], {"type": "result"}),  # said before what is wrong with it
    ]

    assert [(a.status_code, a.json()["error"]) for a in answers] == [
        (409, "draft_submitted"),
        (409, "draft_submitted"),
        (409, "draft_submitted"),
    ]
    assert len(ar.audit("evidence.draft_edited")) == edits


def test_a_replaced_document_keeps_its_draft_alive(ar: Harness) -> None:
    draft = _request_draft(ar, "Facts drafted a month ago.")
    _age(ar, draft["id"], ar.node.settings.evidence_draft_days + 1)
    reworded = {**draft["document"], "summary_of_facts": "Facts reworded today."}
    assert _replace(ar, draft["id"], reworded).status_code == 200  # activity, as an upload

    OrphanSweep(ar.node).run_due()

    assert _exists(ar, draft["id"])


def test_the_command_line_replaces_a_drafts_document(ar: Harness, tmp_path: Path) -> None:
    request_id = _accepted_request(ar)
    files = [b"the statement as uploaded"]
    wrong = _result(files, attested=[b"another statement"])
    draft = _create(ar, _draft_body(request_id, wrong, files)).json()
    _upload_all(ar, draft, files, "officer")
    message = tmp_path / "result.json"
    env = {
        **os.environ,
        "ENTRAIDE_URL": str(ar.http.base_url).rstrip("/"),
        "ENTRAIDE_TOKEN": ar.tokens["officer"],
    }

    def edit(document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        message.write_text(json.dumps({"document": document}), encoding="utf-8")
        command = ["requests", "edit-draft", draft["id"], str(message)]
        return subprocess.run(
            [sys.executable, "-m", "app", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    refused = edit(_result([*files, b"a file never declared"]))
    assert refused.returncode == 1, refused
    assert "HTTP 422" in refused.stderr
    done = edit(_result(files))
    assert (done.returncode, done.stdout.strip()) == (0, f"draft {draft['id']}: document replaced")
    assert _submit(ar, draft["id"]).status_code == 201

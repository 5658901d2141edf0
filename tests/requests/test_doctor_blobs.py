"""`entraide doctor` names evidence that stored messages name and the blob folder no longer
holds (from an operator's review: after a restore without the blob folder, which is not in
`entraide backup`, only a download said so, as `stored_envelope_corrupt`)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from app.db import unit_of_work
from app.doctor import FAIL, check_database
from app.evidence.node_store import blob_store
from app.models import BlobPart, Message
from tests.requests.conftest import EXAMPLE, Harness


def _submitted_with_evidence(ar: Harness) -> str:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["attachments"] = [{"name": "e.bin", "media_type": "application/octet-stream", "size": 3}]
    created = ar.post("/api/v1/evidence/drafts", body)
    assert created.status_code == 201, created.text
    draft_id, href = created.json()["id"], created.json()["attachments"][0]["href"]
    headers = {**ar.as_("officer"), "upload-offset": "0"}
    assert ar.http.patch(href, content=b"abc", headers=headers).status_code == 204
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}).status_code == 201
    return str(draft_id)


def test_doctor_names_evidence_missing_from_the_blob_folder(fresh_ar: Harness) -> None:
    ar = fresh_ar
    request_id = _submitted_with_evidence(ar)
    settings, engine = ar.node.settings, ar.node.engine
    assert not [f for f in check_database(settings, engine) if f.area == "evidence"]
    with unit_of_work(ar.node.sessions) as session:
        digest = session.scalar(
            select(BlobPart.digest)
            .join(Message, Message.id == BlobPart.message_id)
            .where(Message.request_id == request_id)
        )
    assert digest is not None
    store = blob_store(settings)
    (store.blobs / digest[:2] / digest[2:4] / digest).unlink()  # a restore without the blobs
    (finding,) = [f for f in check_database(settings, engine) if f.area == "evidence"]
    assert finding.level == FAIL
    assert finding.message.startswith("1 of 1 evidence blobs that stored messages name are not in")
    assert "put back the evidence folder from its own backup" in finding.message

"""Refusals of the evidence routes, from a review of them: a streamed request whose
announcement (its header and part 0) would be over the body limit between nodes is refused
when it is made, as an inline one is (accepted, it could never arrive: the peer answers 413 to
every attempt); an upload at the wrong offset is on record like every refusal; a part sent at
an offset past its end is an offset mismatch, not "too large"."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.crypto.encoding import b64d
from tests.requests.conftest import EXAMPLE, Harness, example_document


def _draft_body() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["attachments"] = [{"name": "e.bin", "media_type": "application/octet-stream", "size": 3}]
    return body


def _refused(response: Any) -> None:
    assert (response.status_code, response.json()["error"]) == (413, "too_large"), response.text
    assert "limit between nodes" in response.json()["detail"]


def test_a_draft_too_large_to_announce_is_refused_at_creation(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The peers' limit, lowered under the example's size (the node's own body limit, set
    # when it started, still admits the body).
    monkeypatch.setattr(ar.node.settings, "max_body_bytes", 4096)
    drafts = len(ar.audit("evidence.draft_created"))
    _refused(ar.post("/api/v1/evidence/drafts", _draft_body()))
    assert len(ar.audit("evidence.draft_created")) == drafts
    assert ar.audit("api.refused")[-1][1] == "too_large"


def test_a_draft_found_too_large_at_submission_stays_open(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = ar.post("/api/v1/evidence/drafts", _draft_body())
    assert created.status_code == 201, created.text
    draft_id, href = created.json()["id"], created.json()["attachments"][0]["href"]
    sent = ar.http.patch(href, content=b"abc", headers={**ar.as_("officer"), "upload-offset": "0"})
    assert sent.status_code == 204, sent.text
    with monkeypatch.context() as lowered:
        lowered.setattr(ar.node.settings, "max_body_bytes", 4096)
        _refused(ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}))
    assert ar.get(f"/api/v1/requests/{draft_id}").status_code == 404  # nothing was queued
    assert ar.get(f"/api/v1/evidence/drafts/{draft_id}").json()["state"] == "open"
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}).status_code == 201


def test_an_upload_at_the_wrong_offset_is_refused_on_record(ar: Harness) -> None:
    created = ar.post("/api/v1/evidence/drafts", _draft_body())
    assert created.status_code == 201, created.text
    href = created.json()["attachments"][0]["href"]
    refusals = len(ar.audit("api.refused"))
    wrong = ar.http.patch(href, content=b"c", headers={**ar.as_("officer"), "upload-offset": "2"})
    assert (wrong.status_code, wrong.json()["error"]) == (409, "offset_mismatch")
    assert wrong.headers["upload-offset"] == "0"
    entries = ar.audit("api.refused")
    assert len(entries) == refusals + 1
    assert entries[-1][1] == "offset_mismatch"


def test_a_part_sent_past_its_end_is_an_offset_mismatch(ar: Harness) -> None:
    content = {"kind": "request", "document": example_document()}
    wire = ar._seal(content, None, None).to_wire()
    announced = ar.http.post(
        "/p2p/v1/evidence/envelopes", json={**wire, "parts": wire["parts"][:1]}
    )
    assert announced.status_code == 202, announced.text
    msg_id = json.loads(b64d(wire["header"]))["msg_id"]
    part = b64d(wire["parts"][1])
    past = ar.http.put(
        f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1",
        content=part,
        headers={"upload-offset": str(len(part) + 5)},
    )
    assert (past.status_code, past.json()["error"]) == (409, "offset_mismatch"), past.text
    assert past.headers["upload-offset"] == "0"

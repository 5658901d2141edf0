"""Large evidence in a reply: a draft on a request this node holds, judged by the request's
lifecycle and need-to-know rule before any byte is uploaded and again when it is submitted.

The requested authority (AR/MPF, a real node in process, its worker off) answers a request
from ES/MJ with a result whose evidence is streamed; what reaches the peer is in
tests/e2e/test_evidence_replies.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.models import EvidenceDraft, IdempotencyKey, OutboxItem
from tests.requests.conftest import Harness

ACK = {"type": "acknowledgement", "text": "Registered."}
ACCEPT = {"type": "acceptance", "text": "Accepted for execution."}
NEED_TO_KNOW = {
    "confidential": True,
    "level": "need_to_know",
    "use_limitation": "Only in proceedings DP 1873/2026.",
}


def _evidence(ref: str, sha256: str, attachment: int) -> dict[str, Any]:
    return {
        "ref": ref,
        "description": "Bank records produced under the production order",
        "obtained_at": "2026-11-19T15:00:00-03:00",
        "sha256": sha256,
        "attachment": attachment,
        "use_limitation": "Only in proceedings DP 1873/2026.",
    }


def _result(files: list[bytes], *, attested: list[bytes] | None = None) -> dict[str, Any]:
    return {
        "type": "result",
        "text": "Executed: the records are attached.",
        "evidence": [
            _evidence(f"E-{n}", hashlib.sha256(data).hexdigest(), n)
            for n, data in enumerate(attested or files, 1)
        ],
    }


def _draft_body(request_id: str, document: dict[str, Any], files: list[bytes]) -> dict[str, Any]:
    return {
        "request_id": request_id,  # where to post it: the route's, not the body's
        "document": document,
        "attachments": [
            {"name": f"records-{n}.pdf", "media_type": "application/pdf", "size": len(data)}
            for n, data in enumerate(files, 1)
        ],
    }


def _accepted_request(ar: Harness, **changes: Any) -> str:
    request_id = ar.receive_request(**changes)
    for document in (ACK, ACCEPT):
        assert ar.reply(request_id, document).status_code == 201
    return request_id


def _upload_all(ar: Harness, draft: dict[str, Any], files: list[bytes], client: str) -> None:
    for item, data in zip(draft["attachments"], files, strict=True):
        response = ar.http.patch(
            item["href"],
            content=data,
            headers={**ar.as_(client), "upload-offset": "0"},
        )
        assert response.status_code == 204, response.text
        assert response.headers["upload-complete"] == "?1"


def _create(ar: Harness, body: dict[str, Any], client: str = "officer") -> httpx.Response:
    body = dict(body)
    request_id = body.pop("request_id")
    return ar.post(f"/api/v1/requests/{request_id}/messages/drafts", body, client)


def _submit(ar: Harness, draft_id: str, client: str = "officer") -> httpx.Response:
    return ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", None, client)


def _drafts_of(ar: Harness, request_id: str) -> list[EvidenceDraft]:
    with unit_of_work(ar.node.sessions) as session:
        rows = session.scalars(select(EvidenceDraft).where(EvidenceDraft.request_id == request_id))
        return list(rows)


def test_a_result_with_streamed_evidence_moves_the_request_and_queues_one_message(
    ar: Harness,
) -> None:
    request_id = _accepted_request(ar)
    files = [b"", os.urandom(70_000), b"%PDF-1.7 statement\n"]
    document = _result(files)
    created = _create(ar, _draft_body(request_id, document, files))
    assert created.status_code == 201, created.text
    draft = created.json()
    assert draft["request_id"] == request_id
    assert draft["to"] == "ES/MJ"
    _upload_all(ar, draft, files, "officer")
    before = ar.messages(request_id)

    submitted = _submit(ar, draft["id"])

    assert submitted.status_code == 201, submitted.text
    assert submitted.json() | {"delivery": None} == {
        "id": request_id,
        "msg_id": draft["id"],
        "status": "executed",
        "delivery": None,
    }
    assert ar.messages(request_id) == before + 1
    detail = ar.get(f"/api/v1/requests/{request_id}").json()
    assert detail["status"] == "executed"
    sent = detail["messages"][-1]
    assert (sent["msg_id"], sent["kind"], sent["direction"]) == (draft["id"], "message", "outbound")
    assert sent["content"]["type"] == "result"
    assert [item["sha256"] for item in sent["content"]["evidence"]] == [
        item["sha256"] for item in document["evidence"]
    ]
    assert [(a["size"], a["sha256"]) for a in sent["attachments"]] == [
        (len(data), hashlib.sha256(data).hexdigest()) for data in files
    ]
    for attachment, data in zip(sent["attachments"], files, strict=True):
        assert ar.get(attachment["href"]).content == data
    with unit_of_work(ar.node.sessions) as session:
        item = session.scalars(select(OutboxItem).where(OutboxItem.request_id == request_id)).all()[
            -1
        ]
        # The move is kept with the delivery, to be put back if the message is lost.
        assert (item.state, item.moved_from, item.moved_to) == ("queued", "accepted", "executed")
    assert ("client:officer", "ok", request_id) in ar.audit("message.submitted")
    assert _submit(ar, draft["id"]).json()["error"] == "draft_submitted"


def test_a_reply_draft_is_judged_by_the_lifecycle_before_any_upload(ar: Harness) -> None:
    request_id = ar.receive_request()  # delivered: not yet acknowledged, nor accepted
    files = [b"records"]

    refused = _create(ar, _draft_body(request_id, _result(files), files))

    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "transition_not_allowed"
    assert _drafts_of(ar, request_id) == []


def test_evidence_naming_an_undeclared_attachment_is_refused(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"one", b"two"]
    body = _draft_body(request_id, _result(files), files[:1])  # evidence 2 names attachment 2

    refused = _create(ar, body)

    assert refused.status_code == 422, refused.text
    problem = refused.json()["fields"][0]
    assert problem["loc"] == ["body", "document", "evidence", 1, "attachment"]
    assert problem["type"] == "unknown_attachment"
    assert _drafts_of(ar, request_id) == []


def test_a_reply_body_naming_a_recipient_is_refused(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    body = _draft_body(request_id, _result([b"x"]), [b"x"]) | {"to": "FR/DACG"}

    refused = _create(ar, body)

    assert refused.status_code == 422, refused.text
    assert [(f["loc"], f["type"]) for f in refused.json()["fields"]] == [
        (["body", "to"], "extra_forbidden")
    ]


def test_a_hash_that_is_not_the_uploaded_files_is_refused_at_submission(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"the statement as uploaded"]
    document = _result(files, attested=[b"the statement as the officer hashed it"])
    draft = _create(ar, _draft_body(request_id, document, files)).json()
    _upload_all(ar, draft, files, "officer")
    before = ar.messages(request_id)

    refused = _submit(ar, draft["id"])

    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "evidence_hash_mismatch"
    assert "document.evidence.0.sha256" in refused.json()["detail"]
    assert ar.status(request_id) == "accepted"
    assert ar.messages(request_id) == before
    # Nothing lost: the draft is still there to discard (and its upload with it).
    assert ar.get(f"/api/v1/evidence/drafts/{draft['id']}").json()["state"] == "open"
    gone = ar.http.delete(f"/api/v1/evidence/drafts/{draft['id']}", headers=ar.as_("officer"))
    assert gone.status_code == 204


def test_a_request_moved_since_the_draft_was_made_is_judged_again(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"records"]
    draft = _create(ar, _draft_body(request_id, _result(files), files)).json()
    _upload_all(ar, draft, files, "officer")
    withdrawn = ar.peer_sends(request_id, {"type": "withdrawal", "text": "Withdrawn."})
    assert withdrawn.status_code == 201, withdrawn.text
    before = ar.messages(request_id)

    refused = _submit(ar, draft["id"])

    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "transition_not_allowed"
    assert ar.status(request_id) == "withdrawn"
    assert ar.messages(request_id) == before


@pytest.mark.parametrize("when", ["before the draft", "after the draft"])
def test_a_restricted_request_is_unknown_to_officers_not_named_on_it(
    ar: Harness, when: str
) -> None:
    request_id = _accepted_request(ar)
    files = [b"records"]
    body = _draft_body(request_id, _result(files), files)
    draft = _create(ar, body).json() if when == "after the draft" else None
    restricted = ar.http.put(
        f"/api/v1/admin/requests/{request_id}/officers",
        headers=ar.as_("admin"),
        json={"officers": ["alice"]},
    )
    assert restricted.status_code == 200, restricted.text
    refusals = len(ar.audit("evidence.draft_read")) + len(ar.audit("evidence.draft_created"))

    if draft is None:
        refused = _create(ar, body)
        assert (refused.status_code, refused.json()["error"]) == (404, "unknown_request")
        assert _drafts_of(ar, request_id) == []
    else:
        href = draft["attachments"][0]["href"]
        answers = [
            ar.get(f"/api/v1/evidence/drafts/{draft['id']}"),
            ar.http.head(href, headers=ar.as_("officer")),
            _submit(ar, draft["id"]),
        ]
        assert [answer.status_code for answer in answers] == [404, 404, 404]
        assert answers[0].json()["error"] == answers[2].json()["error"] == "unknown_draft"
        assert ar.get(f"/api/v1/requests/{request_id}", "alice").json()["status"] == "accepted"
        # Its author may still give it up: it would keep its key and uploads for a month.
        gone = ar.http.delete(f"/api/v1/evidence/drafts/{draft['id']}", headers=ar.as_("officer"))
        assert gone.status_code == 204, gone.text
        assert _drafts_of(ar, request_id) == []
    refused_now = [
        entry
        for action in ("evidence.draft_read", "evidence.draft_created")
        for entry in ar.audit(action)
    ]
    assert len(refused_now) > refusals
    assert ("client:officer", "refused_need_to_know", request_id) in refused_now
    # The officer named on it may go on.
    if draft is None:
        assert _create(ar, body, "alice").status_code == 201


def test_an_unknown_request_is_refused_as_unknown(ar: Harness) -> None:
    body = _draft_body("0" * 32, _result([b"x"]), [b"x"])
    refused = _create(ar, body)
    assert (refused.status_code, refused.json()["error"]) == (404, "unknown_request")


def test_evidence_dated_after_now_is_refused_at_the_field(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    document = _result([b"records"])
    document["evidence"][0]["obtained_at"] = "2999-01-01T00:00:00Z"

    refused = _create(ar, _draft_body(request_id, document, [b"records"]))

    assert refused.status_code == 422, refused.text
    assert [(f["loc"], f["type"]) for f in refused.json()["fields"]] == [
        (["body", "document", "evidence", 0, "obtained_at"], "evidence_in_future")
    ]
    assert _drafts_of(ar, request_id) == []


def _postponement_drafted_days_ago(
    ar: Harness, request_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A postponement until what was tomorrow three days ago, drafted then, its file uploaded
    since: (its document, the draft)."""
    drafted = utc_now() - timedelta(days=3)
    document = {
        "type": "postponement",
        "text": "Execution postponed: the account is under a domestic freeze.",
        "reason": "ongoing domestic proceedings",
        "until": (drafted + timedelta(days=1)).date().isoformat(),
    }
    files = [b"order of the domestic court"]
    ar.clock.now = drafted
    try:
        draft = _create(ar, _draft_body(request_id, document, files)).json()
    finally:
        ar.clock.now = None
    _upload_all(ar, draft, files, "officer")
    return document, draft


def test_a_postponement_drafted_days_ago_is_judged_again_at_submission(ar: Harness) -> None:
    """Uploads may take days: a postponement until what was tomorrow when it was drafted
    would, sent now, make the request overdue at once (as POST .../messages refuses)."""
    request_id = _accepted_request(ar)
    _, draft = _postponement_drafted_days_ago(ar, request_id)
    before = ar.messages(request_id)

    refused = _submit(ar, draft["id"])

    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "postponement_until_past"
    assert "document.until" in refused.json()["detail"]
    assert ar.status(request_id) == "accepted"
    assert ar.messages(request_id) == before
    assert ar.get(f"/api/v1/evidence/drafts/{draft['id']}").json()["state"] == "open"


def test_a_reply_drafts_uploads_and_discard_are_on_its_requests_trail(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"records"]
    draft = _create(ar, _draft_body(request_id, _result(files), files)).json()
    _upload_all(ar, draft, files, "officer")
    gone = ar.http.delete(f"/api/v1/evidence/drafts/{draft['id']}", headers=ar.as_("officer"))
    assert gone.status_code == 204

    for action in ("evidence.draft_created", "evidence.uploaded", "evidence.draft_discarded"):
        assert ar.audit(action)[-1][2] == request_id, action


def test_a_create_repeated_under_its_idempotency_key_is_one_draft(ar: Harness) -> None:
    request_id = _accepted_request(ar)
    files = [b"records"]
    body = _draft_body(request_id, _result(files), files)
    path = f"/api/v1/requests/{request_id}/messages/drafts"
    headers = {**ar.as_("officer"), "idempotency-key": f"reply-{request_id}"}
    payload = {key: value for key, value in body.items() if key != "request_id"}

    first = ar.http.post(path, json=payload, headers=headers)
    again = ar.http.post(path, json=payload, headers=headers)
    changed = payload | {"document": {**payload["document"], "text": "Another result."}}
    other = ar.http.post(path, json=changed, headers=headers)

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert (other.status_code, other.json()["error"]) == (422, "idempotency_key_reused")
    assert len(_drafts_of(ar, request_id)) == 1
    # The answer kept under the key is the draft's id alone: its view names the attachments,
    # case content the draft keeps sealed, which lay in clear for days (from review).
    assert again.json() == first.json()  # rebuilt from the draft itself
    with unit_of_work(ar.node.sessions) as session:
        kept = session.scalar(
            select(IdempotencyKey.response).where(IdempotencyKey.key == f"reply-{request_id}")
        )
    assert kept is not None
    assert json.loads(kept) == {"id": first.json()["id"]}
    for name in (item["name"] for item in payload["attachments"]):
        assert name not in kept
    # Discarded: a repeat finds no draft, as for any unknown one (it was answered "open").
    draft = f"/api/v1/evidence/drafts/{first.json()['id']}"
    gone = ar.http.delete(draft, headers=ar.as_("officer"))
    assert gone.status_code == 204
    late = ar.http.post(path, json=payload, headers=headers)
    assert (late.status_code, late.json()["error"]) == (404, "unknown_draft")

"""Refusals of the evidence routes, from a review of them: a streamed request whose
announcement (its header and part 0) would be over the body limit between nodes is refused
when it is made, as an inline one is (accepted, it could never arrive: the peer answers 413 to
every attempt); an upload at the wrong offset is on record like every refusal; a part sent at
an offset past its end is an offset mismatch, not "too large"."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select, update

from app.crypto.encoding import b64d
from app.crypto.envelope import Attachment
from app.db import unit_of_work
from app.evidence.inbound import PartTarget, receive_upload_id
from app.evidence.node_store import blob_store
from app.evidence.stream import CHUNK_BYTES
from app.models import EvidenceUpload, InboundTransfer
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
    # Finished, so that no writer is left open in this process's cache.
    done = ar.http.patch(href, content=b"abc", headers={**ar.as_("officer"), "upload-offset": "0"})
    assert done.status_code == 204, done.text


def test_a_part_sent_past_its_end_is_an_offset_mismatch(ar: Harness) -> None:
    wire, msg_id, _ = ar.announce_streamed()
    part = b64d(wire["parts"][1])
    past = ar.http.put(
        f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1",
        content=part,
        headers=ar.signed_put(msg_id, len(part) + 5),
    )
    assert (past.status_code, past.json()["error"]) == (409, "offset_mismatch"), past.text
    assert past.headers["upload-offset"] == "0"
    whole = ar.http.put(
        f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1",
        content=part,
        headers=ar.signed_put(msg_id, 0),
    )
    assert whole.status_code in (200, 201), whole.text  # and no receiver left open


def test_a_part_damaged_on_disk_between_two_puts_gets_no_receipt(ar: Harness) -> None:
    """The receiver kept between two PUTs held the hashes of the bytes as they arrived: a
    staging file altered in between (same file, same size) was published, and a receipt
    signed for it, though its blob no longer matched the signed hash."""
    data = os.urandom(2 * CHUNK_BYTES + 1000)
    content = {"kind": "request", "document": example_document()}
    disk = Attachment("disk.img", "application/octet-stream", data)
    wire = ar._seal(content, None, None, attachments=[disk]).to_wire()
    announced = ar.http.post(
        "/p2p/v1/evidence/envelopes", json={**wire, "parts": wire["parts"][:1]}
    )
    assert announced.status_code == 202, announced.text
    msg_id = json.loads(b64d(wire["header"]))["msg_id"]
    part, href = b64d(wire["parts"][1]), f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"
    first = ar.http.put(href, content=part[: len(part) // 2], headers=ar.signed_put(msg_id, 0))
    assert first.status_code == 204, first.text
    offset = int(first.headers["upload-offset"])
    assert offset > 0
    staging = blob_store(ar.node.settings).uploads / receive_upload_id(msg_id, 1)
    time.sleep(0.05)  # past the file system's clock tick: the change time moves
    with staging.open("r+b") as stored:
        stored.seek(100)
        byte = stored.read(1)
        stored.seek(100)
        stored.write(bytes([byte[0] ^ 1]))
    rest = ar.http.put(href, content=part[offset:], headers=ar.signed_put(msg_id, offset))
    assert (rest.status_code, rest.json()["error"]) == (409, "offset_mismatch"), rest.text
    assert rest.headers["upload-offset"] == "0"
    assert ar.audit("evidence.part_restarted")[-1][0] == "node"
    again = ar.http.put(href, content=part, headers=ar.signed_put(msg_id, 0))
    assert again.status_code in (200, 201), again.text


def test_an_attachment_whose_blob_is_lost_is_uploaded_again(ar: Harness) -> None:
    """Its blob gone (a damaged disk, an older copy of the blob folder put back), a complete
    attachment was stuck: complete to every route, and the draft never submittable."""
    created = ar.post("/api/v1/evidence/drafts", _draft_body())
    assert created.status_code == 201, created.text
    draft_id, href = created.json()["id"], created.json()["attachments"][0]["href"]
    headers = {**ar.as_("officer"), "upload-offset": "0"}
    assert ar.http.patch(href, content=b"abc", headers=headers).status_code == 204
    with unit_of_work(ar.node.sessions) as session:
        digest = session.scalar(
            select(EvidenceUpload.digest).where(EvidenceUpload.draft_id == draft_id)
        )
    assert digest is not None
    (blob_store(ar.node.settings).blobs / digest[:2] / digest[2:4] / digest).unlink()
    view = ar.get(f"/api/v1/evidence/drafts/{draft_id}").json()["attachments"][0]
    assert (view["complete"], view["offset"]) == (False, 0)
    head = ar.http.head(href, headers=ar.as_("officer"))
    assert (head.headers["upload-complete"], head.headers["upload-offset"]) == ("?0", "0")
    refused = ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {})
    assert (refused.status_code, refused.json()["error"]) == (409, "incomplete")
    assert ar.http.patch(href, content=b"abc", headers=headers).status_code == 204
    assert ar.audit("evidence.upload_restarted")[-1][1:] == ("blob_missing", draft_id)
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}).status_code == 201


def _alter_transfer(ar: Harness, msg_id: str, column: str) -> None:
    with unit_of_work(ar.node.sessions) as session:
        transfer = session.scalars(
            select(InboundTransfer).where(InboundTransfer.msg_id == msg_id)
        ).one()
        kept = getattr(transfer, column)
        setattr(transfer, column, kept[:-1] + bytes([kept[-1] ^ 1]))


def test_asking_where_a_part_stands_opens_no_key(ar: Harness) -> None:
    """Anyone who knows a message id may ask where its part stands (HEAD): answered from the
    stored bytes alone. The content key was unsealed and the manifest decrypted (megabytes,
    for many attachments) for every such question."""
    _, msg_id, href = ar.announce_streamed()
    # Nothing can decrypt part 0 now: only a caller that needs the key would notice.
    _alter_transfer(ar, msg_id, "manifest_part")
    head = ar.http.head(href)
    assert (head.status_code, head.headers["upload-offset"]) == (204, "0")
    target = PartTarget(msg_id, 1, 9, 0, {"key": b"k" * 32}, False)
    assert "kk" not in repr(target)


@pytest.mark.parametrize("column", ["manifest_part", "header"])
def test_a_transfer_damaged_in_storage_is_announced_again(ar: Harness, column: str) -> None:
    """Its stored announcement no longer opening (the database altered or damaged), a part
    got a 500, and every retry of its sender the same until the envelope expired. The row is
    dropped, on record, and the sender told to announce again: it still holds the envelope."""
    wire, msg_id, href = ar.announce_streamed()
    _alter_transfer(ar, msg_id, column)
    part = b64d(wire["parts"][1])
    put = ar.http.put(href, content=part, headers=ar.signed_put(msg_id, 0))
    assert (put.status_code, put.json()["error"]) == (404, "unknown_transfer"), put.text
    dropped = [entry for entry in ar.audit("evidence.transfer_dropped") if entry[0] == "node"]
    assert dropped, "the drop is on record"
    head = ar.http.head(href)  # the row is gone: what the sender hears until it announces
    assert (head.status_code, head.headers["entraide-error"]) == (404, "unknown_transfer")
    again = ar.http.post("/p2p/v1/evidence/envelopes", json={**wire, "parts": wire["parts"][:1]})
    assert again.status_code == 202, again.text
    put = ar.http.put(href, content=part, headers=ar.signed_put(msg_id, 0))
    assert put.status_code == 201, put.text


def test_a_transfer_held_whole_but_damaged_is_announced_again_not_refused(ar: Harness) -> None:
    """Every part held, its completion was left to a repeated announcement, which found the
    stored part 0 no longer opening and refused the envelope in its sender's name (400, a
    delivery failed for good) for what was this node's own storage."""
    wire, msg_id, href = ar.announce_streamed()
    part = b64d(wire["parts"][1])
    store = blob_store(ar.node.settings)
    with store.upload(f"test-{msg_id}") as upload:  # as if part 1 had been received whole
        upload.write(part)
        store.finalise(upload, hashlib.sha256(part).hexdigest())
    with unit_of_work(ar.node.sessions) as session:
        session.execute(
            update(InboundTransfer).where(InboundTransfer.msg_id == msg_id).values(parts_done=1)
        )
    _alter_transfer(ar, msg_id, "manifest_part")
    head = {**wire, "parts": wire["parts"][:1]}

    again = ar.http.post("/p2p/v1/evidence/envelopes", json=head)

    assert (again.status_code, again.json()["error"]) == (404, "unknown_transfer"), again.text
    assert ar.audit("evidence.transfer_dropped")[-1][0] == "node"
    assert ar.http.post("/p2p/v1/evidence/envelopes", json=head).status_code == 202
    assert ar.http.put(href, content=part, headers=ar.signed_put(msg_id, 0)).status_code == 201


def test_an_upload_to_a_complete_attachment_or_a_submitted_draft_says_which(ar: Harness) -> None:
    """From review: an upload after submission was told `upload_complete`, which the API
    keeps for an open draft's finished attachment; a submitted draft is `draft_submitted`, as
    a second submit and a discard are told."""
    created = ar.post("/api/v1/evidence/drafts", _draft_body())
    draft_id, href = created.json()["id"], created.json()["attachments"][0]["href"]

    def patch() -> Any:
        return ar.http.patch(
            href, content=b"abc", headers={**ar.as_("officer"), "upload-offset": "0"}
        )

    assert patch().status_code == 204
    again = patch()
    assert (again.status_code, again.json()["error"]) == (409, "upload_complete")
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}).status_code == 201
    after = patch()
    assert (after.status_code, after.json()["error"]) == (409, "draft_submitted")


def _draft_of(size: int) -> dict[str, Any]:
    body = _draft_body()
    body["attachments"][0]["size"] = size
    return body


def _create(ar: Harness, client: str, size: int = 3) -> Any:
    return ar.post("/api/v1/evidence/drafts", _draft_of(size), client=client)


def _too_many(response: Any) -> None:
    assert (response.status_code, response.json()["error"]) == (409, "too_many_open_drafts"), (
        response.text
    )
    assert "submit or discard some first" in response.json()["detail"]


def test_a_clients_open_drafts_are_bounded_in_number(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unbounded, one officer's token could open drafts without end, each staging up to the
    per-request limit on disk (a note's finding): past the client's budget a new draft is
    refused, on record, and a place comes back as soon as one is discarded or submitted."""
    monkeypatch.setattr(ar.node.settings, "max_open_drafts_per_client", 2)
    first, second = _create(ar, "bob"), _create(ar, "bob")
    assert (first.status_code, second.status_code) == (201, 201), second.text
    created = len(ar.audit("evidence.draft_created"))

    _too_many(refused := _create(ar, "bob"))
    assert "this client has 2 open drafts declaring 6 bytes" in refused.json()["detail"]
    assert len(ar.audit("evidence.draft_created")) == created  # nothing made
    assert ar.audit("api.refused")[-1][:2] == ("client:bob", "too_many_open_drafts")
    other = _create(ar, "alice")
    assert other.status_code == 201  # another client's budget is its own

    gone = ar.http.delete(f"/api/v1/evidence/drafts/{first.json()['id']}", headers=ar.as_("bob"))
    assert gone.status_code == 204, gone.text
    third = _create(ar, "bob")
    assert third.status_code == 201, third.text
    _too_many(_create(ar, "bob"))

    # A submitted draft is a request on its way: no longer open, no longer counted.
    href = second.json()["attachments"][0]["href"]
    sent = ar.http.patch(href, content=b"abc", headers={**ar.as_("bob"), "upload-offset": "0"})
    assert sent.status_code == 204, sent.text
    submitted = ar.post(f"/api/v1/evidence/drafts/{second.json()['id']}/submit", {}, "bob")
    assert submitted.status_code == 201, submitted.text
    fourth = _create(ar, "bob")
    assert fourth.status_code == 201, fourth.text
    for client, draft in (("bob", third), ("bob", fourth), ("alice", other)):
        ar.http.delete(f"/api/v1/evidence/drafts/{draft.json()['id']}", headers=ar.as_(client))


def test_a_clients_open_drafts_are_bounded_in_declared_bytes(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a client's open drafts declare is what their uploads may stage: bounded too. One
    draft is always taken, whatever its size (the per-request limit bounds it), or a budget
    under one request's size would refuse that client for ever."""
    monkeypatch.setattr(ar.node.settings, "max_open_draft_bytes_per_client", 5)
    alone = _create(ar, "bob", size=8)
    assert alone.status_code == 201, alone.text
    _too_many(refused := _create(ar, "bob", size=0))
    assert "declaring 8 bytes" in refused.json()["detail"]
    drafts = [alone.json()["id"]]
    gone = ar.http.delete(f"/api/v1/evidence/drafts/{drafts.pop()}", headers=ar.as_("bob"))
    assert gone.status_code == 204
    for size in (3, 2):
        made = _create(ar, "bob", size=size)
        assert made.status_code == 201, made.text
        drafts.append(made.json()["id"])
    _too_many(_create(ar, "bob", size=1))  # 3 + 2 + 1 > 5
    for draft_id in drafts:
        ar.http.delete(f"/api/v1/evidence/drafts/{draft_id}", headers=ar.as_("bob"))


@pytest.mark.parametrize("keyed", [False, True], ids=["no_key", "idempotency_keys"])
def test_drafts_made_at_once_never_exceed_the_budget(
    ar: Harness, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """Counted under a lock on the client's row: creations at once cannot all take the last
    place (PostgreSQL runs them side by side; SQLite one writer at a time). With an
    Idempotency-Key each, whose row's foreign key share-locks the client's row first: a
    FOR UPDATE there deadlocked two of them (from review), one answered 503."""
    monkeypatch.setattr(ar.node.settings, "max_open_drafts_per_client", 3)

    def create(number: int) -> Any:
        key = {"idempotency-key": f"budget-{uuid.uuid4().hex}"} if keyed else {}
        headers = {**ar.as_("bob"), **key}
        return ar.http.post("/api/v1/evidence/drafts", headers=headers, json=_draft_of(3))

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(create, range(8)))
    made = [answer for answer in answers if answer.status_code == 201]
    assert len(made) == 3, [answer.text for answer in answers]
    for answer in answers:
        if answer.status_code != 201:
            _too_many(answer)
    for answer in made:
        ar.http.delete(f"/api/v1/evidence/drafts/{answer.json()['id']}", headers=ar.as_("bob"))

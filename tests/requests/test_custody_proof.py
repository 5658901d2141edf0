"""Custody proofs of small, inline envelopes (the streamed ones: tests/e2e/test_evidence.py),
and what a node does when it cannot give one: no receipt yet, or a stored row altered."""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import select, update

from app.crypto import envelope as env
from app.crypto.proof import verify_proof
from app.db import unit_of_work
from app.models import Message
from tests.crypto.forge import reseal_manifest
from tests.requests.conftest import Harness, example_document
from tests.requests.test_lost_moves import ACK


def _proof_path(request_id: str, msg_id: str) -> str:
    return f"/api/v1/requests/{request_id}/messages/{msg_id}/proof"


def test_the_receiver_proves_what_it_received(ar: Harness) -> None:
    request_id = ar.receive_request()
    answer = ar.get(_proof_path(request_id, request_id))
    assert answer.status_code == 200, answer.text
    checked = verify_proof(answer.json())
    assert (checked.sender, checked.receiver) == ("ES/MJ", "AR/MPF")
    assert checked.attachment_matches(1, hashlib.sha256(b"letter of request").hexdigest())
    assert ar.audit("proof.exported")[-1] == ("client:officer", "ok", request_id)


def test_no_proof_before_the_receipt_and_none_of_an_altered_row(ar: Harness) -> None:
    request_id = ar.receive_request()
    reply = ar.reply(request_id, ACK)  # to ES/MJ, which is no process here: never receipted
    assert reply.status_code == 201, reply.text
    pending = ar.get(_proof_path(request_id, reply.json()["msg_id"]))
    assert (pending.status_code, pending.json()["error"]) == (409, "no_receipt")
    with unit_of_work(ar.node.sessions) as session:
        row = session.scalar(select(Message).where(Message.msg_id == request_id))
        assert row is not None
        original = row.signature
        altered = bytes([original[0] ^ 1]) + original[1:]
        session.execute(update(Message).where(Message.id == row.id).values(signature=altered))
    try:
        refused = ar.get(_proof_path(request_id, request_id))
        assert (refused.status_code, refused.json()["error"]) == (500, "stored_envelope_corrupt")
        assert ar.audit("proof.exported")[-1][1] == "stored_envelope_corrupt"
    finally:
        with unit_of_work(ar.node.sessions) as session:
            session.execute(
                update(Message).where(Message.msg_id == request_id).values(signature=original)
            )
    assert ar.get(_proof_path(request_id, request_id)).status_code == 200
    # Unknown or invisible: as for any read of a request.
    assert ar.get(_proof_path("0" * 32, "0" * 32)).status_code == 404


def test_a_message_accepted_under_earlier_rules_is_not_provable_not_corrupt(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: a message accepted before receivers refused members the protocol does
    not define reads as ever, but its proof was 500 `stored_envelope_corrupt`, alleging
    tampering. Intact rows that fail today's checks are 409 `not_provable`."""
    content = {"kind": "request", "document": example_document()}
    envelope = reseal_manifest(
        ar._seal(content, None, None), ar.peer_keys, lambda manifest: manifest.update(note="x")
    )
    with monkeypatch.context() as earlier:  # as a node before 2026-11-29 night accepted it
        earlier.setattr(env, "MANIFEST_FIELDS", env.MANIFEST_FIELDS | {"note"})
        assert ar.post_envelope(envelope).status_code == 201
    request_id = json.loads(envelope.header)["msg_id"]
    assert ar.get(f"/api/v1/requests/{request_id}").status_code == 200
    answer = ar.get(_proof_path(request_id, request_id))
    assert (answer.status_code, answer.json()["error"]) == (409, "not_provable")
    assert "its stored rows are intact" in answer.json()["detail"]
    corrupt = [
        entry
        for entry in ar.audit("proof.exported")
        if entry[2] == request_id and entry[1] == "stored_envelope_corrupt"
    ]
    assert corrupt == []  # no tampering alleged

"""Custody proofs of small, inline envelopes (the streamed ones: tests/e2e/test_evidence.py),
and what a node does when it cannot give one: no receipt yet, or a stored row altered."""

from __future__ import annotations

import hashlib

from sqlalchemy import select, update

from app.crypto.proof import verify_proof
from app.db import unit_of_work
from app.models import Message
from tests.requests.conftest import Harness
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

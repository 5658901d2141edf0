"""A peer whose consistency proofs come slowly, or never, holds up no delivery (from review).

Witnessing a checkpoint a receipt carries may ask the peer for a consistency proof. It ran in
the delivery loop, once per receipt: twenty receipts carrying a new checkpoint whose proof
the peer answered in 0.5 s with 503 held the loop 10 s, and nothing was claimed or settled
for any peer meanwhile (at a 30 s timeout and a batch of 64, half an hour). Now the checks
run in a thread of their own, and a peer's newest note alone waits to be checked.

The worker and its crypto are real; the peer (ES/MJ, pinned at http://es.invalid) is a fake
at the HTTP edge that signs real receipts and checkpoints with ES/MJ's keys, and whose proof
route hangs until the test lets it answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.audit.checkpoints import log_origin
from app.audit.merkle import leaf_hash, root_from_leaf_hashes
from app.audit.note import Checkpoint, sign_note
from app.crypto.encoding import utc_now
from app.crypto.envelope import decode_wire
from app.crypto.keys import NodeKeys
from app.crypto.receipts import issue_receipt
from app.db import unit_of_work
from app.delivery.worker import Worker
from app.models import OutboxItem
from tests.requests.conftest import EXAMPLE, Harness, worker_against


def _note(keys: NodeKeys, size: int) -> str:
    """ES/MJ's signed checkpoint of a log of `size` entries."""
    leaves = [leaf_hash(f"entry {n}".encode()) for n in range(size)]
    origin = log_origin("ES/MJ")
    checkpoint = Checkpoint(origin=origin, size=size, root_hash=root_from_leaf_hashes(leaves))
    return sign_note(checkpoint.format(), origin, keys.log)


class SlowProofPeer:
    """ES/MJ: receipts for every envelope, each carrying `checkpoint`; its consistency proofs
    answered (503) only once `answer` is set."""

    def __init__(self, keys: NodeKeys) -> None:
        self.keys = keys
        self.checkpoint: str | None = None
        self.answer = threading.Event()
        self.proofs_asked = 0
        self.proof_asked = threading.Event()
        self._lock = threading.Lock()

    def _receipt(self, wire: dict[str, Any]) -> dict[str, Any]:
        envelope = decode_wire(wire, max_parts=1000, max_header_bytes=10**7)
        receipt = issue_receipt(
            self.keys.signing,
            signer_kid=self.keys.signing_kid,
            msg_id=json.loads(envelope.header)["msg_id"],
            envelope_hash=envelope.envelope_hash,
            from_authority="AR/MPF",
            to_authority="ES/MJ",
            received_at=utc_now(),
            checkpoint=self.checkpoint,
        )
        return receipt.to_wire()

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/audit/consistency"):
            with self._lock:
                self.proofs_asked += 1
            self.proof_asked.set()
            self.answer.wait(30)
            return httpx.Response(503, json={"error": "busy", "detail": "try later"})
        body = json.loads(request.content)
        if request.url.path.endswith("/envelopes/batch"):
            results = [{"status": 201, **self._receipt(wire)} for wire in body["envelopes"]]
            return httpx.Response(200, json={"results": results})
        return httpx.Response(201, json=self._receipt(body))


def _submit(ar: Harness) -> None:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    submitted = ar.post("/api/v1/requests", body)
    assert submitted.status_code == 201, submitted.text


def _states(ar: Harness) -> list[str]:
    with unit_of_work(ar.node.sessions) as session:
        return list(session.scalars(select(OutboxItem.state)))


@pytest.fixture
def peer(fresh_ar: Harness) -> SlowProofPeer:
    return SlowProofPeer(fresh_ar.peer_keys)


@pytest.fixture
def worker(fresh_ar: Harness, peer: SlowProofPeer) -> Iterator[Worker]:
    with worker_against(fresh_ar.node, peer.handle) as worker:
        try:
            yield worker
        finally:
            peer.answer.set()  # before the worker is stopped: it waits for the check


def test_a_peer_slow_to_prove_its_checkpoint_holds_up_no_delivery(
    fresh_ar: Harness, peer: SlowProofPeer, worker: Worker
) -> None:
    # A first checkpoint: nothing known of the peer's log yet, so no proof is asked for.
    peer.checkpoint = _note(fresh_ar.peer_keys, 10)
    _submit(fresh_ar)
    worker.run_once()
    worker._finish_in_flight()
    assert worker.witnessing.wait_idle(10)
    assert peer.proofs_asked == 0
    # Twenty deliveries whose receipts carry a larger one: its proof hangs.
    peer.checkpoint = _note(fresh_ar.peer_keys, 20)
    for _ in range(20):
        _submit(fresh_ar)
    worker.run_once()
    worker._finish_in_flight()  # settled while the proof is still awaited
    assert _states(fresh_ar) == ["delivered"] * 21
    assert peer.proof_asked.wait(10)
    # More receipts with the same note while its check hangs: nothing more asked meanwhile.
    for _ in range(5):
        _submit(fresh_ar)
    worker.run_once()
    worker._finish_in_flight()
    assert _states(fresh_ar) == ["delivered"] * 26
    assert peer.proofs_asked == 1  # one check for 25 receipts of one note
    peer.answer.set()
    assert worker.witnessing.wait_idle(10)
    # Refused, so not witnessed: the five receipts that came meanwhile queued it once more.
    assert peer.proofs_asked == 2

"""What a peer's answer to a post means, when it is not the protocol's exact answer (from review).

docs/protocol.md §8.6 answers a batch with 200 and one result per envelope. A peer that
answered a batch 207 or 201, results and receipts included, got every envelope of the batch
marked failed for good, receipts thrown away, although the peer had stored them all; and one
envelope's answer that broke something other than its receipt's check (here the fetch of the
peer's identity, for a receipt naming a key we do not know) sent the whole batch to be posted
again, its good receipts thrown away. A success answer never fails an envelope for good now:
without a receipt the envelope is tried again (the peer answers a repeat with the receipt it
stored); and each envelope of a batch keeps its own outcome.

The worker and its crypto are real; the peer (ES/MJ, pinned at http://es.invalid) is a fake
at the HTTP edge that signs real receipts with ES/MJ's keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.crypto.envelope import decode_wire
from app.crypto.keys import NodeKeys
from app.crypto.receipts import issue_receipt
from app.db import unit_of_work
from app.delivery.worker import Worker
from app.models import OutboxItem
from tests.requests.conftest import EXAMPLE, Harness, worker_against

Answer = Callable[[list[dict[str, Any]]], httpx.Response]


class Peer:
    """ES/MJ: answers each post as `batch_answer` or `one_answer` says, with real receipts."""

    def __init__(self, keys: NodeKeys) -> None:
        self.keys = keys
        self.batch_answer: Answer = lambda receipts: httpx.Response(
            200, json={"results": [{"status": 201, **receipt} for receipt in receipts]}
        )
        self.one_answer: Answer = lambda receipts: httpx.Response(201, json=receipts[0])
        self.posts: list[str] = []  # "batch" or "one", in order
        self.unknown_kid_for: set[str] = set()  # msg_ids whose receipt names an unknown key

    def receipt(self, wire: dict[str, Any]) -> dict[str, Any]:
        envelope = decode_wire(wire, max_parts=1000, max_header_bytes=10**7)
        msg_id = json.loads(envelope.header)["msg_id"]
        kid = "ab" * 16 if msg_id in self.unknown_kid_for else self.keys.signing_kid
        receipt = issue_receipt(
            self.keys.signing,
            signer_kid=kid,
            msg_id=msg_id,
            envelope_hash=envelope.envelope_hash,
            from_authority="AR/MPF",
            to_authority="ES/MJ",
            received_at=utc_now(),
            checkpoint=None,
        )
        return receipt.to_wire()

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/.well-known/entraide/node"):
            raise RuntimeError("the identity route broke")  # not a transport error
        body = json.loads(request.content)
        if request.url.path.endswith("/envelopes/batch"):
            self.posts.append("batch")
            return self.batch_answer([self.receipt(wire) for wire in body["envelopes"]])
        self.posts.append("one")
        return self.one_answer([self.receipt(body)])


def _submit(ar: Harness, count: int) -> list[str]:
    msg_ids = []
    for _ in range(count):
        body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
        body["to"] = "ES/MJ"
        body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
        submitted = ar.post("/api/v1/requests", body)
        assert submitted.status_code == 201, submitted.text
        msg_ids.append(submitted.json()["msg_id"])
    return msg_ids


def _states(ar: Harness) -> list[tuple[str, str | None]]:
    with unit_of_work(ar.node.sessions) as session:
        rows = session.execute(
            select(OutboxItem.state, OutboxItem.last_error).order_by(OutboxItem.id)
        )
        return [(state, error) for state, error in rows]


@pytest.fixture
def peer(fresh_ar: Harness) -> Peer:
    return Peer(fresh_ar.peer_keys)


@pytest.fixture
def worker(fresh_ar: Harness, peer: Peer) -> Iterator[Worker]:
    with worker_against(fresh_ar.node, peer.handle) as worker:
        yield worker


def _round(worker: Worker) -> None:
    worker.run_once()
    worker._finish_in_flight()


@pytest.mark.parametrize("status", [201, 207])
def test_a_batch_answered_with_another_success_status_is_delivered(
    fresh_ar: Harness, peer: Peer, worker: Worker, status: int
) -> None:
    peer.batch_answer = lambda receipts: httpx.Response(
        status, json={"results": [{"status": 201, **receipt} for receipt in receipts]}
    )
    _submit(fresh_ar, 3)
    _round(worker)
    assert peer.posts == ["batch"]
    assert [state for state, _ in _states(fresh_ar)] == ["delivered"] * 3


def test_a_batch_answered_with_success_but_no_results_is_posted_one_by_one(
    fresh_ar: Harness, peer: Peer, worker: Worker
) -> None:
    peer.batch_answer = lambda receipts: httpx.Response(202, json={"accepted": True})
    _submit(fresh_ar, 2)
    _round(worker)
    assert peer.posts == ["batch", "one", "one"]
    assert [state for state, _ in _states(fresh_ar)] == ["delivered"] * 2


@pytest.mark.parametrize("status", [202, 204])
def test_a_success_without_a_receipt_is_tried_again_not_failed(
    fresh_ar: Harness, peer: Peer, worker: Worker, status: int
) -> None:
    peer.one_answer = lambda receipts: httpx.Response(status)
    _submit(fresh_ar, 1)
    _round(worker)
    [(state, error)] = _states(fresh_ar)
    assert state == "retry", error
    assert error is not None
    assert error.startswith("bad receipt"), error
    # The peer answers the repeat with the receipt it stored: delivered then.
    peer.one_answer = lambda receipts: httpx.Response(201, json=receipts[0])
    with unit_of_work(fresh_ar.node.sessions) as session:
        for row in session.scalars(select(OutboxItem)):
            row.next_attempt_at = utc_now()
    _round(worker)
    assert [state for state, _ in _states(fresh_ar)] == ["delivered"]


def test_one_envelope_whose_answer_breaks_something_keeps_the_batch_s_receipts(
    fresh_ar: Harness, peer: Peer, worker: Worker
) -> None:
    msg_ids = _submit(fresh_ar, 3)
    peer.unknown_kid_for = {msg_ids[1]}  # its receipt sends us to the peer's identity: broken
    _round(worker)
    states = _states(fresh_ar)
    assert [state for state, _ in states] == ["delivered", "retry", "delivered"], states
    assert states[1][1] == "internal: RuntimeError"

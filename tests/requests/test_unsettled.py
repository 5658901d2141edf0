"""A worker that stops after posts it could not settle: those, and only those, are on record
as of unknown outcome (the peer may hold them); the rest go back to the queue unrecorded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import outbox
from app.delivery import worker as worker_module
from app.delivery.settle import Outcome, settle_batch
from app.delivery.worker import Worker
from app.models import DeliveryAttempt, OutboxItem, Peer
from tests.requests.conftest import Harness
from tests.requests.test_lost_moves import ACK, _delivery_id

LEASE = timedelta(seconds=300)


def test_only_the_posts_whose_settlement_failed_are_recorded_at_a_stop(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ar = fresh_ar
    rows = []
    for _ in range(2):
        request_id = ar.receive_request()
        sent = ar.reply(request_id, ACK)
        assert sent.status_code == 201, sent.text
        rows.append(_delivery_id(ar, sent.json()["msg_id"]))
    settled_row, failing_row = rows
    worker = Worker(ar.node)
    try:
        with unit_of_work(ar.node.sessions) as session:
            claims = outbox.claim_due(
                session, now=utc_now(), lease=LEASE, limit=10, owner=worker.id
            )
        assert sorted(claim.outbox_id for claim in claims) == sorted(rows)

        def settle_but_one(
            session: Session,
            results: Sequence[tuple[outbox.Claim, Outcome]],
            *,
            worker: str,
            clock_steady: bool = True,
        ) -> list[bool]:
            if any(claim.outbox_id == failing_row for claim, _ in results):
                raise RuntimeError("the database went away")
            return settle_batch(session, results, worker=worker, clock_steady=clock_steady)

        monkeypatch.setattr(worker_module, "settle_batch", settle_but_one)
        never_reached = Outcome(outbox.RETRY, "transport: ConnectError")
        with pytest.raises(RuntimeError):
            worker._settle([(claim, never_reached) for claim in claims])
        # The row settled one by one is not taken for one the peer may hold.
        assert worker._unsettled == {failing_row}
        worker.release()
    finally:
        worker._pool.shutdown()
        worker.http.close()
    with unit_of_work(ar.node.sessions) as session:
        assert not outbox.peer_may_hold(session, settled_row)
        assert outbox.peer_may_hold(session, failing_row)
        states = dict(session.execute(select(OutboxItem.id, OutboxItem.state)).all())
    assert states[settled_row] == states[failing_row] == outbox.RETRY


def test_a_peer_suspended_after_the_claim_gets_no_post(fresh_ar: Harness) -> None:
    """From review: the claim skips suspended peers, but what it took just before `peers
    suspend` was posted all the same, to the URL and keys as claimed. It waits now, untried."""
    ar = fresh_ar
    request_id = ar.receive_request()
    sent = ar.reply(request_id, ACK)
    assert sent.status_code == 201, sent.text
    row = _delivery_id(ar, sent.json()["msg_id"])
    worker = Worker(ar.node)
    try:
        with unit_of_work(ar.node.sessions) as session:
            claims = outbox.claim_due(
                session, now=utc_now(), lease=LEASE, limit=10, owner=worker.id
            )
            jobs = worker_module.load_jobs(session, claims)
        assert [job.claim.outbox_id for job in jobs] == [row]
        with unit_of_work(ar.node.sessions) as session:
            session.execute(
                update(Peer).where(Peer.authority_id == "ES/MJ").values(suspended_at=utc_now())
            )
        assert worker._deliver_group(jobs) == [None]  # not posted, nothing to settle
    finally:
        worker._pool.shutdown()
        worker.http.close()
    # Handed back as if never claimed, waiting for the resumption with its peer's other
    # rows; no attempt on record (an attempt without an answer counts as one the peer may
    # hold: a cancel would then keep the request's move, and the deadline wait for ever).
    with unit_of_work(ar.node.sessions) as session:
        item = session.get(OutboxItem, row)
        assert item is not None
        assert (item.state, item.attempts, item.lease_owner) == (outbox.QUEUED, 0, None)
        assert item.next_attempt_at > utc_now() + timedelta(days=3650)
        assert not outbox.peer_may_hold(session, row)
        assert (
            session.scalar(select(DeliveryAttempt.id).where(DeliveryAttempt.outbox_id == row))
            is None
        )

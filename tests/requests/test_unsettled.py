"""A worker that stops after posts it could not settle: those, and only those, are on record
as of unknown outcome (the peer may hold them); the rest go back to the queue unrecorded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import outbox
from app.delivery import worker as worker_module
from app.delivery.settle import Outcome, settle_batch
from app.delivery.worker import Worker
from app.models import OutboxItem
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
            session: Session, results: Sequence[tuple[outbox.Claim, Outcome]], *, worker: str
        ) -> list[bool]:
            if any(claim.outbox_id == failing_row for claim, _ in results):
                raise RuntimeError("the database went away")
            return settle_batch(session, results, worker=worker)

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

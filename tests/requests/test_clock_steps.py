"""A delivery worker whose host's wall clock steps (from a review of reliability, confirmed
with `faketime` on real nodes): a forward jump of a day for a few seconds gave up every
pending urgent and emergency delivery "at its deadline" and left the others planned a day
ahead; a step back of two hours held every retry back two hours. The worker's clock is
moved here as the wall clock moves, the boot clock it checks it against going on."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import heartbeat, outbox
from app.delivery import settle as settle_module
from app.delivery import worker as worker_module
from app.delivery.clocksteps import boot_clock
from app.delivery.failing_peers import FailingPeers
from app.delivery.settle import Outcome
from app.delivery.worker import Worker
from app.models import Message, OutboxItem, WorkerHeartbeat
from tests.requests.conftest import EXAMPLE, Harness

# The delivery's peer, ES/MJ, is pinned at http://es.invalid: every attempt is a
# ConnectError, as with a peer down.


def _submit(ar: Harness, urgency: str) -> str:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["document"]["urgency"]["level"] = urgency
    submitted = ar.post("/api/v1/requests", body)
    assert submitted.status_code == 201, submitted.text
    request_id: str = submitted.json()["id"]
    return request_id


def _row(ar: Harness, request_id: str) -> tuple[str, int, datetime, str | None]:
    with unit_of_work(ar.node.sessions) as session:
        item = session.scalars(
            select(OutboxItem)
            .join(Message, Message.id == OutboxItem.message_id)
            .where(Message.request_id == request_id)
        ).one()
        return item.state, item.attempts, item.next_attempt_at, item.last_error


@pytest.fixture
def worker(fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    # Its upkeep every 0.2 s rather than every 10 s.
    monkeypatch.setattr(fresh_ar.node.settings, "worker_heartbeat_seconds", 0.2)
    worker = Worker(fresh_ar.node)
    try:
        yield worker
    finally:
        worker._finish_in_flight()
        worker._pool.shutdown()
        worker.http.close()


def _set_clock(monkeypatch: pytest.MonkeyPatch, offset: timedelta) -> None:
    """The wall clock the worker reads (its claims, its settlements) moved by `offset`."""
    moved: Callable[[], datetime] = lambda: utc_now() + offset  # noqa: E731
    for module in (worker_module, settle_module):
        monkeypatch.setattr(module, "utc_now", moved)


def _rounds_until(
    worker: Worker, ar: Harness, request_id: str, attempts: int, timeout: float = 20.0
) -> tuple[str, int, datetime, str | None]:
    deadline = time.monotonic() + timeout
    while True:
        worker.run_once()
        row = _row(ar, request_id)
        if row[1] >= attempts and row[0] != outbox.IN_FLIGHT:
            return row
        if time.monotonic() > deadline:
            return row
        time.sleep(0.1)


@pytest.mark.parametrize("urgency", ["emergency", "urgent"])
def test_a_forward_jump_of_a_day_gives_up_no_delivery(
    fresh_ar: Harness, worker: Worker, monkeypatch: pytest.MonkeyPatch, urgency: str
) -> None:
    ar = fresh_ar
    request_id = _submit(ar, urgency)
    state, attempts, _, error = _rounds_until(worker, ar, request_id, 1)
    assert (state, attempts) == (outbox.RETRY, 1), error

    _set_clock(monkeypatch, timedelta(hours=25))  # past the deadline of both
    state, attempts, planned, error = _rounds_until(worker, ar, request_id, 2)
    assert attempts == 2
    assert state == outbox.RETRY, error  # not "gave up at the deadline": seconds went by
    assert planned > utc_now() + timedelta(hours=24)  # planned by the clock ahead

    monkeypatch.undo()  # the clock put right: the next attempt comes now, not in a day
    state, attempts, planned, error = _rounds_until(worker, ar, request_id, 3)
    assert (state, attempts) == (outbox.RETRY, 3), error
    assert planned < utc_now() + timedelta(hours=1)


def test_a_clock_stepped_back_two_hours_holds_no_retry_back(
    fresh_ar: Harness, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    ar = fresh_ar
    request_id = _submit(ar, "routine")
    state, attempts, _, error = _rounds_until(worker, ar, request_id, 1)
    assert (state, attempts) == (outbox.RETRY, 1), error

    _set_clock(monkeypatch, -timedelta(hours=2))
    state, attempts, _, error = _rounds_until(worker, ar, request_id, 2, timeout=10)
    assert (state, attempts) == (outbox.RETRY, 2), error


def test_the_first_claim_after_a_held_step_takes_over_no_live_workers_delivery(
    fresh_ar: Harness, worker: Worker
) -> None:
    """While a step of its clock is held (15 min), a worker does not look at heartbeats; its
    first claim after the hold read the last look, 15 minutes old, as "no worker beating",
    and took over a delivery another worker, beating all along, was posting (its lease run
    out by this worker's clock only; from review). Not before a look at the heartbeats."""
    ar = fresh_ar
    request_id = _submit(ar, "routine")
    with unit_of_work(ar.node.sessions) as session:
        heartbeat.beat(session, "other", every_seconds=0.2)
        rows = {
            row.worker_id: (row.seen_at, row.expires_at)
            for row in session.execute(
                select(
                    WorkerHeartbeat.worker_id, WorkerHeartbeat.seen_at, WorkerHeartbeat.expires_at
                )
            )
        }
    worker._heartbeats.still(rows, set(), boot_clock() - 905)  # the look before the hold
    with unit_of_work(ar.node.sessions) as session:
        heartbeat.beat(session, "other", every_seconds=0.2)  # beating all along
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.request_id == request_id)
            .values(
                state=outbox.IN_FLIGHT,
                lease_owner="other",
                attempts=1,
                lease_until=utc_now() - timedelta(seconds=1),
                updated_at=utc_now(),
            )
        )
    assert worker._claim_and_post(4) == []
    with unit_of_work(ar.node.sessions) as session:
        item = session.scalars(select(OutboxItem).where(OutboxItem.request_id == request_id)).one()
        assert (item.state, item.lease_owner, item.attempts) == (outbox.IN_FLIGHT, "other", 1)


def test_a_peers_failing_deliveries_are_said_once_in_the_log(
    fresh_ar: Harness, worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    """Retried deliveries were recorded but never logged until they gave up for good, days
    later (from review: a peer down, and nothing in the log). Once when they start failing,
    not at every attempt."""
    request_id = _submit(fresh_ar, "emergency")
    with caplog.at_level(logging.INFO, logger="app.delivery.failing_peers"):
        state, attempts, _, error = _rounds_until(worker, fresh_ar, request_id, 3, timeout=60)
    assert attempts >= 3, (state, error)
    said = [r.getMessage() for r in caplog.records if r.name == "app.delivery.failing_peers"]
    assert len(said) == 1, said
    assert said[0].startswith("deliveries to ES/MJ are failing (transport: ConnectError)")


def test_a_peers_deliveries_succeeding_again_are_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    peers = FailingPeers()
    failed = Outcome(outbox.RETRY, "transport: ConnectError")
    delivered = Outcome(outbox.DELIVERED)
    with caplog.at_level(logging.INFO, logger="app.delivery.failing_peers"):
        peers.observe([("ES/MJ", failed), ("ES/MJ", failed), ("FR/MJ", delivered)])
        peers.observe([("ES/MJ", delivered), ("ES/MJ", delivered)])
        # A busy peer's 429, one envelope refused, this node's own trouble: not the peer.
        busy = Outcome(outbox.RETRY, "HTTP 429", http_status=429)
        refused = Outcome(outbox.FAILED, "HTTP 409 replayed", http_status=409)
        ours = Outcome(outbox.FAILED, "stored_envelope_corrupt: part 1: the blob is missing")
        peers.observe([("ES/MJ", busy), ("ES/MJ", refused), ("ES/MJ", ours)])
    said = [r.getMessage() for r in caplog.records if r.name == "app.delivery.failing_peers"]
    assert len(said) == 2, said
    assert said[0].startswith("deliveries to ES/MJ are failing (transport: ConnectError)")
    assert said[1] == "deliveries to ES/MJ succeed again"

"""Leases cut short by another worker's upkeep (app/delivery/upkeep.py), with a real node in
process on SQLite and PostgreSQL (from a cold review of the takeover of dead workers' leases):
a live worker's heartbeat is judged by whether it changes, never by the times it holds, and a
post whose worker's heartbeat had a gap since the claim checks the row is still its own.

The delivery's peer, ES/MJ, is pinned at http://es.invalid: a post is a ConnectError."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import heartbeat, outbox
from app.delivery.clocksteps import boot_clock
from app.delivery.worker import Worker, load_jobs
from app.models import OutboxItem, WorkerHeartbeat
from tests.requests.conftest import Harness
from tests.requests.test_clock_steps import _set_clock, _submit

LEASE = timedelta(seconds=300)
EVERY = 0.2  # the heartbeat period of every worker here: three missed beats in 0.6 s


@pytest.fixture
def watcher(fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    """The worker doing the upkeep, in process, not running: its upkeep is called."""
    monkeypatch.setattr(fresh_ar.node.settings, "worker_heartbeat_seconds", EVERY)
    worker = Worker(fresh_ar.node)
    try:
        yield worker
    finally:
        worker._pool.shutdown()
        worker.http.close()


def _claimed_a_minute_ago(ar: Harness, owner: str) -> outbox.Claim:
    _submit(ar, "emergency")
    with unit_of_work(ar.node.sessions) as session:
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner=owner)
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == claim.outbox_id)
            .values(updated_at=utc_now() - timedelta(minutes=1))
        )
    return claim


def _beat(ar: Harness, owner: str, *, dated: timedelta = timedelta(0)) -> None:
    """`owner` beats; its row dated `dated` off (the clock that wrote it, against the one
    that reads it)."""
    with unit_of_work(ar.node.sessions) as session:
        heartbeat.beat(session, owner, every_seconds=EVERY)
        row = session.get(WorkerHeartbeat, owner)
        assert row is not None
        row.seen_at += dated
        row.expires_at += dated


def _upkeep(worker: Worker) -> int:
    with unit_of_work(worker.node.sessions) as session:
        return worker.outbox_upkeep(session)


def _lease(ar: Harness, claim: outbox.Claim) -> tuple[str | None, datetime | None]:
    with unit_of_work(ar.node.sessions) as session:
        row = session.execute(
            select(OutboxItem.lease_owner, OutboxItem.lease_until).where(
                OutboxItem.id == claim.outbox_id
            )
        ).one()
        return row.lease_owner, row.lease_until


def test_a_live_worker_whose_heartbeat_looks_expired_keeps_its_lease(
    fresh_ar: Harness, watcher: Worker
) -> None:
    """A forward step of the clock that reads the heartbeats (the database's on PostgreSQL)
    made every live worker look dead: their posts were taken over and sent twice."""
    ar = fresh_ar
    claim = _claimed_a_minute_ago(ar, "A")
    _, lease_until = _lease(ar, claim)
    # Five periods in which A beats every period, its rows dated two minutes back.
    for _ in range(5):
        _beat(ar, "A", dated=-timedelta(minutes=2))
        assert _upkeep(watcher) == 0
        time.sleep(EVERY)
    assert _lease(ar, claim) == ("A", lease_until)


def test_a_worker_whose_heartbeat_stands_still_is_taken_over(
    fresh_ar: Harness, watcher: Worker
) -> None:
    """Its heartbeat not expired by any clock: it stood still for three of its periods."""
    ar = fresh_ar
    claim = _claimed_a_minute_ago(ar, "A")
    _beat(ar, "A", dated=timedelta(hours=1))
    assert _upkeep(watcher) == 0  # first seen: watched from now on
    time.sleep(EVERY * heartbeat.MISSED_BEATS + 0.1)
    assert _upkeep(watcher) == 1
    with unit_of_work(ar.node.sessions) as session:
        (taken,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner="B")
    assert (taken.outbox_id, taken.attempts) == (claim.outbox_id, 2)


def test_no_lease_is_cut_just_after_a_step_of_the_clock(
    fresh_ar: Harness, watcher: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    ar = fresh_ar
    claim = _claimed_a_minute_ago(ar, "A")
    _beat(ar, "A")
    assert _upkeep(watcher) == 0
    time.sleep(EVERY * heartbeat.MISSED_BEATS + 0.1)
    _set_clock(monkeypatch, timedelta(seconds=30))  # the watcher's clock steps
    assert _upkeep(watcher) == 0
    assert _lease(ar, claim)[0] == "A"


def test_a_post_whose_lease_was_taken_over_in_a_gap_of_its_heartbeat_is_not_sent(
    fresh_ar: Harness, watcher: Worker
) -> None:
    """A lease not run out used to be the poster's alone; since a lease can be cut short, a
    poster whose heartbeat had a gap checks the row is still its own (a renewal) first."""
    ar = fresh_ar
    _submit(ar, "emergency")
    poster = watcher  # it never beat: any other worker may take it for dead
    with unit_of_work(ar.node.sessions) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner=poster.id)
        (job,) = load_jobs(session, claims)
        session.execute(update(OutboxItem).values(lease_until=utc_now()))  # cut short
    with unit_of_work(ar.node.sessions) as session:
        assert len(outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner="B")) == 1
    assert poster._deliver(job) is None  # not posted: B has it

    # A poster beating all along since its claim posts at once, with no extra write.
    _submit(ar, "emergency")
    beating_since = boot_clock()
    with unit_of_work(ar.node.sessions) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner=poster.id)
        (job,) = load_jobs(session, claims)
    claimed = _lease(ar, job.claim)
    poster._beats = (beating_since, boot_clock())  # its last beat just now
    outcome = poster._deliver(job)
    assert outcome is not None
    assert outcome.error == "transport: ConnectError"
    assert _lease(ar, job.claim) == claimed


def _keep_beating(ar: Harness, owner: str, stop: threading.Event) -> threading.Thread:
    def beat() -> None:
        while not stop.is_set():
            _beat(ar, owner)
            stop.wait(EVERY / 2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["stepped", "ahead"])
def test_a_lease_run_out_by_a_clock_is_not_taken_from_a_worker_that_beats(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """From review: the claim took over any row whose lease had run out by the claimer's
    clock, so a forward step of a host's clock (`stepped`), or on PostgreSQL another host's
    clock ahead of the owner's (`ahead`), took a delivery its owner was posting: sent twice
    at once, the owner's receipt thrown away. Now no lease is taken over just after a step,
    nor ever from a worker whose heartbeat beats."""
    ar = fresh_ar
    monkeypatch.setattr(ar.node.settings, "worker_heartbeat_seconds", EVERY)
    claim = _claimed_a_minute_ago(ar, "A")
    stop = threading.Event()
    beating = _keep_beating(ar, "A", stop)
    if how == "stepped":
        other = Worker(ar.node)  # started before its host's clock stepped
        _set_clock(monkeypatch, timedelta(minutes=10))
    else:
        _set_clock(monkeypatch, timedelta(minutes=10))
        other = Worker(ar.node)  # on a host whose clock is ten minutes ahead
    try:
        for _ in range(heartbeat.MISSED_BEATS + 2):  # past the time a silent one is dead
            other.run_once()
            assert _lease(ar, claim)[0] == "A"
            time.sleep(EVERY)
        other._finish_in_flight()
        # Once A stops beating, its deliveries are taken over after three of its periods
        # (`ahead`: the clock is steady; `stepped` waits out the step's hold, see below).
        stop.set()
        beating.join()
        if how == "ahead":
            deadline = time.monotonic() + 10
            while _lease(ar, claim)[0] == "A":
                assert time.monotonic() < deadline, "never taken over from a silent worker"
                other.run_once()
                time.sleep(EVERY)
    finally:
        stop.set()
        other._finish_in_flight()
        other._pool.shutdown()
        other.http.close()

"""Delivery workers' heartbeats (app/delivery/heartbeat.py), as a review found them wanting:
each row carries its own expiry, set by its worker's own period on the database's clock; a
worker beats from a thread of its own, so a round held up by a slow peer does not make it look
dead; and the rows are no data for a backup to carry."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import heartbeat
from app.delivery.worker import Worker
from tests.requests.conftest import Harness


def _alive(ar: Harness) -> int:
    with unit_of_work(ar.node.sessions) as session:
        return heartbeat.alive(session)


def test_a_worker_is_judged_by_its_own_period_not_the_readers(fresh_ar: Harness) -> None:
    with unit_of_work(fresh_ar.node.sessions) as session:
        heartbeat.beat(session, "slow-beating", every_seconds=60)
        # Counted dead three periods after its last beat: long enough that a loaded host's
        # stall between the beat and the read below does not end it first.
        heartbeat.beat(session, "fast-beating", every_seconds=0.5)
    assert _alive(fresh_ar) == 2
    time.sleep(2.0)
    assert _alive(fresh_ar) == 1  # the slow one vouched for three minutes, not 30 s
    with unit_of_work(fresh_ar.node.sessions) as session:
        heartbeat.stopped(session, "slow-beating")
    assert _alive(fresh_ar) == 0


def test_a_worker_host_whose_clock_runs_ahead_is_not_counted_alive_after_it_died(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL (workers on several hosts) the database's clock sets the expiry."""
    if fresh_ar.node.engine.dialect.name != "postgresql":
        pytest.skip("a SQLite node's processes share one host and its clock")
    ahead = utc_now() + timedelta(hours=1)
    monkeypatch.setattr(heartbeat, "utc_now", lambda: ahead)
    with unit_of_work(fresh_ar.node.sessions) as session:
        heartbeat.beat(session, "ahead", every_seconds=0.2)
    time.sleep(0.8)
    assert _alive(fresh_ar) == 0


def test_a_round_held_up_does_not_stop_the_heartbeat(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round may wait minutes on a slow peer (witnessing its checkpoint: up to four peer
    timeouts a call): the worker beat between rounds, and looked dead meanwhile."""
    monkeypatch.setattr(fresh_ar.node.settings, "worker_heartbeat_seconds", 0.2)
    held, entered = threading.Event(), threading.Event()

    def held_round() -> int:
        entered.set()
        held.wait(30)
        return 0

    worker = Worker(fresh_ar.node)
    monkeypatch.setattr(worker, "run_once", held_round)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert entered.wait(10)
        time.sleep(1.0)  # five periods into the held round
        # A stopped heartbeat would read 0 from now on; a beating one reads 1 at least once
        # (a loaded host may stall one beat past the three periods that count it alive).
        deadline, alive = time.monotonic() + 10, _alive(fresh_ar)
        while alive != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = _alive(fresh_ar)
        assert alive == 1
    finally:
        worker.stop()
        held.set()
        thread.join(30)
    assert _alive(fresh_ar) == 0  # a stop removes its row at once

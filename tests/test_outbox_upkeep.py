"""A worker's upkeep of the outbox (app/delivery/upkeep.py), on SQLite and PostgreSQL: leases
of workers gone are cut short for the next claim, and rows planned by a clock that was ahead
are made due (both from a review of reliability)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from nacl.signing import SigningKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.mac import append_with
from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.delivery import heartbeat, outbox, upkeep
from app.models import DeliveryAttempt, OutboxItem, WorkerHeartbeat
from tests.audit.test_witness import _peer
from tests.conftest import Databases
from tests.test_outbox import _queue

LEASE = timedelta(seconds=300)
GRACE = timedelta(seconds=30)


@pytest.fixture
def sessions(databases: Databases) -> Iterator[sessionmaker[Session]]:
    url = databases.new("upkeep", migrated=True)
    engine = make_engine(url)
    yield append_with(make_session_factory(engine), SigningKey.generate())
    engine.dispose()


def _claim_one(factory: sessionmaker[Session], owner: str) -> outbox.Claim:
    with unit_of_work(factory) as session:
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner=owner)
    return claim


def test_leases_of_workers_without_a_live_heartbeat_are_taken_over(
    sessions: sessionmaker[Session],
) -> None:
    """A worker killed held its rows for the whole lease (300 s), emergencies included,
    although the node was back in seconds."""
    with unit_of_work(sessions) as session:
        _queue(session, 4, urgency="emergency")
    dead = _claim_one(sessions, "dead")  # beat once, then killed
    alive = _claim_one(sessions, "alive")  # beating, posting a long transfer
    _claim_one(sessions, "starting")  # claimed before its first beat
    mine = _claim_one(sessions, "me")  # the worker doing the upkeep
    with unit_of_work(sessions) as session:
        heartbeat.beat(session, "dead", every_seconds=10)
        heartbeat.beat(session, "alive", every_seconds=10)
        session.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.worker_id == "dead")
            .values(expires_at=heartbeat.database_now(session) - timedelta(seconds=1))
        )
        # Claimed a minute ago (the dead one's before its death), except the one starting.
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_([dead.outbox_id, alive.outbox_id, mine.outbox_id]))
            .values(updated_at=utc_now() - timedelta(minutes=1))
        )

    # The heartbeats as the worker "me" watches them, on its boot clock: first seen at 0,
    # again 31 s later (three periods and more), "alive" having beaten between.
    watch = upkeep.HeartbeatWatch(every_seconds=10)
    with unit_of_work(sessions) as session:
        assert _reclaim(session, watch, boot=0.0) == 0
    with unit_of_work(sessions) as session:
        heartbeat.beat(session, "alive", every_seconds=10)
    with unit_of_work(sessions) as session:
        assert _reclaim(session, watch, boot=31.0) == 1
    with unit_of_work(sessions) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="next")
        assert [(claim.outbox_id, claim.attempts) for claim in claims] == [(dead.outbox_id, 2)]
        # Taken over as any lease run out is: the first attempt's outcome is unknown.
        outcomes = session.execute(
            select(DeliveryAttempt.attempt, DeliveryAttempt.outcome, DeliveryAttempt.worker)
        ).all()
        assert [tuple(row) for row in outcomes] == [(1, outbox.LEASE_EXPIRED, "dead")]
    # Nothing else to cut: the others are alive, starting or the caller's own.
    with unit_of_work(sessions) as session:
        heartbeat.beat(session, "alive", every_seconds=10)
    with unit_of_work(sessions) as session:
        assert _reclaim(session, watch, boot=62.0) == 0


def test_heartbeats_looked_at_long_ago_take_over_nothing(sessions: sessionmaker[Session]) -> None:
    """While a step of the clock is held (15 min), the upkeep does not look at heartbeats: the
    first claim after the hold read every worker as silent and took over a live worker's
    delivery (from review). A look older than three periods says nothing."""
    with unit_of_work(sessions) as session:
        heartbeat.beat(session, "alive", every_seconds=10)
    watch = upkeep.HeartbeatWatch(every_seconds=10)
    assert not watch.current(0.0)  # never looked
    with unit_of_work(sessions) as session:
        _reclaim(session, watch, boot=0.0)
    assert watch.current(29.0)
    assert watch.beating(29.0) == {"alive"}
    assert not watch.current(905.0)  # the hold over, this round's upkeep not yet due
    assert watch.beating(905.0) == frozenset()  # why the claim must not take over
    with unit_of_work(sessions) as session:
        heartbeat.beat(session, "alive", every_seconds=10)
    with unit_of_work(sessions) as session:
        _reclaim(session, watch, boot=906.0)
    assert watch.current(906.0)
    assert watch.beating(906.0) == {"alive"}


def _reclaim(session: Session, watch: upkeep.HeartbeatWatch, *, boot: float) -> int:
    return upkeep.reclaim_orphaned(
        session, owner="me", now=utc_now(), grace=GRACE, watch=watch, boot=boot
    )


def test_rows_planned_by_a_clock_that_was_ahead_are_made_due(
    sessions: sessionmaker[Session],
) -> None:
    """A clock stepped back two hours held every retry back two hours. A worker whose clock
    is behind the others' by less than any wait does not take a peer's Retry-After for that
    (from review: 6 min behind, it pulled a Retry-After of an hour forward)."""
    with unit_of_work(sessions) as session:
        stepped, asked_to_wait, suspended = _queue(session, 3)
        other = _peer(NodeKeys.generate())
        other.authority_id = "FR/MJ"
        other.suspended_at = utc_now()
        other.suspended_reason = "test"
        session.add(other)
    now = utc_now()
    ahead = now + timedelta(hours=2)  # the clock before it stepped back 2 h
    planned = {  # when planned, for when
        stepped: (ahead, ahead + timedelta(seconds=30)),
        asked_to_wait: (now, now + timedelta(seconds=3600)),  # a peer's Retry-After: an hour
        suspended: (now, now + outbox.SUSPENDED_FOR),  # waiting for its peer's resumption
    }
    with unit_of_work(sessions) as session:
        for row, (at, when) in planned.items():
            session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == row)
                .values(state=outbox.RETRY, next_attempt_at=when, updated_at=at)
            )
        session.execute(
            update(OutboxItem).where(OutboxItem.id == suspended).values(peer_authority="FR/MJ")
        )
        assert outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w") == []

    with unit_of_work(sessions) as session:
        # The upkeep of a worker whose clock is 6 min behind: the hour asked for is kept.
        behind = utc_now() - timedelta(minutes=6)
        assert upkeep.due_after_clock_step(session, now=behind) == 1
    with unit_of_work(sessions) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w")
    assert [claim.outbox_id for claim in claims] == [stepped]

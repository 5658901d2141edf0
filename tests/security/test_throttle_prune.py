"""The refusal counters do not grow for good: a counter whose window and block are over is
pruned, what it suppressed is audited as it goes, and live blocks and other timers stay."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from nacl.signing import SigningKey
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.mac import MAC_KEY_INFO, mac_key
from app.auth.throttle import (
    PRUNE_BATCH,
    Limits,
    ThrottlePrune,
    blocked_for,
    counter_row,
    prune_idle,
    register_refusal,
)
from app.config import Settings
from app.db import make_engine
from app.models import AuditEntry, AuthThrottle
from tests.conftest import Databases, make_databases

LIMITS = Limits(limit=3, window=timedelta(minutes=5), block=timedelta(minutes=10))
T0 = datetime(2026, 11, 28, 12, tzinfo=UTC)


def refuse(session: Session, key: str, times: int, now: datetime) -> None:
    for _ in range(times):
        register_refusal(session, [key], LIMITS, actor="address:test", now=now)


def keys(session: Session) -> set[str]:
    return set(session.scalars(select(AuthThrottle.key)))


def test_idle_counters_go_and_live_ones_stay(databases: Databases) -> None:
    url = databases.new(migrated=True)
    engine = make_engine(url)
    try:
        # Its entries carry MACs, as a node's do (app/audit/mac.py), under a key of the test's.
        with Session(engine, info={MAC_KEY_INFO: mac_key(SigningKey.generate())}) as session:
            refuse(session, "address:192.0.2.1", 1, T0)  # one refusal, long ago
            refuse(session, "address:192.0.2.2", 3, T0)  # blocked, then kept sending
            assert blocked_for(session, ["address:192.0.2.2"], T0 + timedelta(minutes=1))
            refuse(session, "client:7", 3, T0 + timedelta(minutes=20))  # blocked now
            refuse(session, "p2p:2001:db8::/64", 1, T0 + timedelta(minutes=24))  # in window
            # Timers of other jobs share the table and are not refusal counters.
            counter_row(session, "witness-unproven:AR/MPF", T0)
            counter_row(session, "peer-refresh:AR/MPF", T0)
            session.commit()

            now = T0 + timedelta(minutes=25)
            assert prune_idle(session, LIMITS, now) == 2
            session.commit()
            assert keys(session) == {
                "client:7",
                "p2p:2001:db8::/64",
                "witness-unproven:AR/MPF",
                "peer-refresh:AR/MPF",
            }
            ended = session.scalars(
                select(AuditEntry).where(AuditEntry.action == "auth.throttle_ended")
            ).all()
            # The blocked address's refusals while blocked are reported, not lost with it.
            assert [(e.outcome, json.loads(e.entry)["details"]) for e in ended] == [
                ("pruned", {"key": "address:192.0.2.2", "suppressed_before": 1})
            ]

            # A pruned address starts afresh: its next refusal is counted from one.
            refuse(session, "address:192.0.2.2", 1, now)
            row = session.get(AuthThrottle, "address:192.0.2.2")
            assert row is not None
            assert row.failures == 1
            assert row.blocked_until is None
    finally:
        engine.dispose()


def test_many_counters_are_pruned_in_batches_and_the_sweep_runs_hourly(
    databases: Databases,
) -> None:
    url = databases.new(migrated=True)
    engine = make_engine(url)
    sessions = sessionmaker(engine)
    try:
        count = PRUNE_BATCH * 2 + 7
        with Session(engine) as session:
            session.add_all(
                AuthThrottle(
                    key=f"address:10.0.{n // 256}.{n % 256}",
                    window_start=T0,
                    failures=1,
                    suppressed=0,
                )
                for n in range(count)
            )
            session.commit()
        now = [0.0]
        settings = Settings(
            database_url=url,
            auth_failure_window_seconds=300,
            auth_block_seconds=300,
        )
        prune = ThrottlePrune(settings, sessions, every_seconds=3600, clock=lambda: now[0])
        assert prune.run_due() == count  # the first at once; all are long idle
        now[0] += 3599
        assert prune.run_due() is None
        now[0] += 1
        assert prune.run_due() == 0
        with Session(engine) as session:
            assert keys(session) == set()
    finally:
        engine.dispose()


def test_a_refusal_counted_while_its_row_is_pruned_is_counted_again(tmp_path: Path) -> None:
    """PostgreSQL: the pruning locks an idle row and deletes it; a refusal of that address
    meanwhile found the row there (its insert did nothing), waited for the lock, then found
    nothing: a 500 instead of a 401. It counts on a new row instead."""
    databases = make_databases("postgresql", tmp_path)
    url = databases.new(migrated=True)
    engine = make_engine(url)
    sessions = sessionmaker(engine)
    try:
        with sessions.begin() as session:
            session.add(
                AuthThrottle(key="address:192.0.2.9", window_start=T0, failures=1, suppressed=0)
            )
        pruning = sessions()
        pruning.begin()
        pruning.execute(
            select(AuthThrottle.key)
            .where(AuthThrottle.key == "address:192.0.2.9")
            .with_for_update()
        ).all()
        outcome: list[object] = []

        def refusal() -> None:
            with sessions.begin() as session:
                try:
                    row = counter_row(session, "address:192.0.2.9", T0 + timedelta(hours=1))
                    outcome.append(row.failures)
                except Exception as exc:  # the defect: "throttle row ... vanished"
                    outcome.append(exc)

        thread = threading.Thread(target=refusal)
        thread.start()
        time.sleep(0.5)  # the refusal waits on the pruning's lock
        pruning.execute(delete(AuthThrottle).where(AuthThrottle.key == "address:192.0.2.9"))
        pruning.commit()
        pruning.close()
        thread.join(10)
        assert outcome == [0]  # a fresh counter, locked, for the refusal to count on
    finally:
        engine.dispose()
        databases.drop_all()

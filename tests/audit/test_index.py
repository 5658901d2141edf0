"""The auditor's query over the log: the indexed part and the tail not yet indexed give, page
after page, exactly what filtering every entry would (SQLite and PostgreSQL); the worker's
upkeep indexes in batches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nacl.signing import SigningKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.audit import log as audit_log
from app.audit.checkpoints import maybe_checkpoint
from app.audit.index import INDEX_BATCH, MAX_TAIL, index_entries, indexed_size
from app.audit.log import record
from app.audit.mac import append_with
from app.audit.service import EntryFilter, query_entries
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.models import AuditEntry
from tests.conftest import Databases

ENTRIES = 700
INDEXED = 500  # the rest is the tail
START = datetime(2026, 11, 1, tzinfo=UTC)
ACTORS = ["node", "client:officer1", "client:officer2", "peer:AR/MPF"]
ACTIONS = ["request.submitted", "envelope.sealed", "delivery.attempt", "request.read"]
OUTCOMES = ["ok", "ok", "ok", "retry", "refused_need_to_know"]
PEERS = [None, "AR/MPF", "FR/DACG"]


@dataclass
class Log:
    sessions: sessionmaker[Session]
    times: list[datetime]


class Clock:
    """A stand-in for utc_now in app.audit.log: a minute per entry, never backwards."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
def log(databases: Databases, monkeypatch: pytest.MonkeyPatch) -> Iterator[Log]:
    url = databases.new("index", migrated=True)
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    clock = Clock()
    monkeypatch.setattr(audit_log, "utc_now", clock)
    rng = random.Random(3)
    times = []
    number = 0
    while number < ENTRIES:
        with unit_of_work(sessions) as session:  # a few entries per transaction, as actions do
            for _ in range(min(rng.randrange(1, 4), ENTRIES - number)):
                record(
                    session,
                    actor=rng.choice(ACTORS),
                    action=rng.choice(ACTIONS),
                    outcome=rng.choice(OUTCOMES),
                    request_id=rng.choice([None, f"{rng.randrange(40):032x}"]),
                    peer=rng.choice(PEERS),
                    details={"n": number},
                )
                times.append(clock.now)
                number += 1
    with unit_of_work(sessions) as session:
        index_entries(session, start=0, end=INDEXED)
    yield Log(sessions, times)
    engine.dispose()


def _matches(entry: AuditEntry, where: EntryFilter) -> bool:
    return (
        (where.since is None or entry.recorded_at >= where.since)
        and (where.until is None or entry.recorded_at < where.until)
        and all(
            getattr(where, name) in (None, getattr(entry, name))
            for name in ("actor", "action", "request_id", "peer", "outcome")
        )
    )


def _random_filter(rng: random.Random, log: Log) -> EntryFilter:
    values: dict[str, Any] = {}
    for name, choices in (
        ("actor", ACTORS),
        ("action", ACTIONS),
        ("outcome", OUTCOMES),
        ("peer", [value for value in PEERS if value]),
        ("request_id", [f"{number:032x}" for number in range(40)]),
    ):
        if rng.random() < 0.3:
            values[name] = rng.choice(choices)
    if rng.random() < 0.4:
        moment = rng.choice(log.times) + timedelta(seconds=rng.choice([-30, 0, 30]))
        values[rng.choice(["since", "until"])] = moment
    if rng.random() < 0.2:
        first, second = sorted(rng.sample(log.times, 2))
        values["since"], values["until"] = first, second
    return EntryFilter(**values)


def test_query_pages_equal_a_filter_over_every_entry(log: Log) -> None:
    rng = random.Random(11)
    with unit_of_work(log.sessions) as session:
        assert indexed_size(session) == INDEXED
        everything = list(session.scalars(select(AuditEntry).order_by(AuditEntry.idx.desc())))
        for _ in range(60):
            where = _random_filter(rng, log)
            expected = [entry.idx for entry in everything if _matches(entry, where)]
            # Pages of one only over short results: over hundreds they are the same check
            # as pages of seven, a query per entry.
            limit = rng.choice([1, 7, 50, 1000] if len(expected) <= 60 else [7, 50, 1000])
            found: list[int] = []
            before: int | None = None
            while True:
                rows, before = query_entries(session, where=where, before=before, limit=limit)
                assert len(rows) <= limit
                found += [row.idx for row in rows]
                if before is None:
                    break
            assert found == expected, where


def test_a_query_indexes_a_long_tail_first(log: Log) -> None:
    with unit_of_work(log.sessions) as session:
        for number in range(MAX_TAIL):
            record(session, actor="node", action="test.bulk", details={"n": number})
    with unit_of_work(log.sessions) as session:
        where = EntryFilter(action="test.bulk")
        rows, _ = query_entries(session, where=where, before=None, limit=3)
        assert [row.idx for row in rows] == [ENTRIES + MAX_TAIL - 1 - n for n in range(3)]
        assert indexed_size(session) == ENTRIES + MAX_TAIL


def test_the_worker_indexes_in_batches_and_at_checkpoints(databases: Databases) -> None:
    url = databases.new("upkeep", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), keys.log)

    def append(count: int) -> None:
        with unit_of_work(sessions) as session:
            for number in range(count):
                record(session, actor="node", action="test.event", details={"n": number})

    def upkeep() -> int:
        with unit_of_work(sessions) as session:
            maybe_checkpoint(
                session, authority_id="ES/MJ", log_key=keys.log, every=10**9, seconds=10**9
            )
        with unit_of_work(sessions) as session:
            return indexed_size(session)

    try:
        append(10)
        assert upkeep() == 10  # the first checkpoint is due at once: everything is indexed
        append(INDEX_BATCH - 1)
        assert upkeep() == 10  # not a batch yet
        append(1)
        assert upkeep() == 10 + INDEX_BATCH
    finally:
        engine.dispose()

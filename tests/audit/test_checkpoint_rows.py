"""A checkpoint row's columns are not what was signed: its note is.

An insider with SQL access and no log key can edit a row's `size`, `root_hash` or
`created_at`. Each test does so and checks that the node still signs what it must, hands out
only a checkpoint that covers what it says, and that `audit verify --db` names the row. On
SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.checkpoints import (
    DATE_MARGIN,
    LATEST_PAGE,
    CheckpointClock,
    latest_signed,
    log_verifier,
    maybe_checkpoint,
    opened_checkpoint,
    sign_checkpoint,
)
from app.audit.log import read_head, record
from app.audit.mac import append_with
from app.audit.note import Checkpoint, sign_note
from app.audit.service import verify_database
from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.models import AuditCheckpoint
from tests.conftest import Databases

AUTHORITY = "ES/MJ"


@dataclass
class Log:
    keys: NodeKeys
    sessions: sessionmaker[Session]

    def add(self, session: Session, count: int) -> None:
        for number in range(count):
            record(session, actor="client:officer", action="request.read", details={"n": number})

    def sign(self, session: Session) -> None:
        sign_checkpoint(session, authority_id=AUTHORITY, log_key=self.keys.log)

    def upkeep(self, session: Session, *, every: int, seconds: float) -> int | None:
        signed = maybe_checkpoint(
            session, authority_id=AUTHORITY, log_key=self.keys.log, every=every, seconds=seconds
        )
        return None if signed is None else signed.size

    def clocked_upkeep(
        self, clock: CheckpointClock, *, seconds: float
    ) -> Callable[[Session], int | None]:
        """The worker's upkeep with its own clock (never due by count here)."""

        def upkeep(session: Session) -> int | None:
            signed = maybe_checkpoint(
                session,
                authority_id=AUTHORITY,
                log_key=self.keys.log,
                every=1000,
                seconds=seconds,
                clock=clock,
            )
            return None if signed is None else signed.size

        return upkeep

    def problems(self, session: Session) -> list[str]:
        report = verify_database(session, authority_id=AUTHORITY, log_public=self.keys.log_public)
        return [problem.message for problem in report.problems]


@pytest.fixture
def log(databases: Databases) -> Iterator[Log]:
    url = databases.new("audit", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    made = Log(keys, append_with(make_session_factory(engine), keys.log))
    with unit_of_work(made.sessions) as session:
        for _ in range(3):
            made.add(session, 4)
            made.sign(session)
    yield made
    engine.dispose()


def _newest_row(session: Session) -> int:
    newest: int = session.scalar(select(func.max(AuditCheckpoint.id)))
    return newest


def test_a_size_raised_in_a_row_does_not_stop_checkpoints(log: Log) -> None:
    with unit_of_work(log.sessions) as session:
        newest = _newest_row(session)
        session.execute(
            update(AuditCheckpoint).where(AuditCheckpoint.id == newest).values(size=2**62)
        )
        log.add(session, 1)
        # Due after one new entry: the entry is signed, not left rewritable.
        assert log.upkeep(session, every=1, seconds=3600) == read_head(session).size == 13
        assert any("says 4611686018427387904 entries" in p for p in log.problems(session))


def test_a_stale_row_given_the_heads_size_is_not_handed_out_as_covering_it(log: Log) -> None:
    with unit_of_work(log.sessions) as session:
        log.add(session, 2)
        head = read_head(session)
        oldest = session.scalar(select(func.min(AuditCheckpoint.id)))
        session.execute(
            update(AuditCheckpoint)
            .where(AuditCheckpoint.id == oldest)
            .values(size=head.size, root_hash=head.root_hash)
        )
        signed = sign_checkpoint(session, authority_id=AUTHORITY, log_key=log.keys.log)
        opened = opened_checkpoint(signed.note, f"entraide.log/{AUTHORITY}", log.keys.log_public)
        assert opened is not None
        assert (
            (opened.size, opened.root_hash) == (head.size, head.root_hash) == (14, signed.root_hash)
        )
        assert any(f"checkpoint row {oldest} says 14 entries" in p for p in log.problems(session))


def test_a_row_dated_ahead_does_not_put_off_checkpoints_due_by_time(log: Log) -> None:
    with unit_of_work(log.sessions) as session:
        newest = _newest_row(session)
        ahead = utc_now() + timedelta(days=30)
        session.execute(
            update(AuditCheckpoint).where(AuditCheckpoint.id == newest).values(created_at=ahead)
        )
        log.add(session, 1)
        assert log.upkeep(session, every=1000, seconds=60) == 13
        assert any("in the future" in problem for problem in log.problems(session))


def test_a_row_dated_a_little_ahead_puts_checkpoints_off_for_one_period_at_most(
    log: Log,
) -> None:
    """From review: dated just inside the margin replicas' clocks need (and again after each
    checkpoint), a row put off every checkpoint due by time. The worker's own clock bounds
    that to one period from when it first saw the row newest."""
    upkeep = log.clocked_upkeep(CheckpointClock(), seconds=0.5)

    with unit_of_work(log.sessions) as session:
        newest = _newest_row(session)
        ahead = utc_now() + DATE_MARGIN - timedelta(seconds=30)
        session.execute(
            update(AuditCheckpoint).where(AuditCheckpoint.id == newest).values(created_at=ahead)
        )
        log.add(session, 1)
        assert upkeep(session) is None  # the row says it is new
        time.sleep(0.6)
        assert log.upkeep(session, every=1000, seconds=0.5) is None  # the row alone: put off
        assert upkeep(session) == 13  # the process's own clock: due


def test_hiding_the_newest_row_again_and_again_does_not_restart_the_workers_clock(
    log: Log,
) -> None:
    """From review: deleting the newest checkpoint row and putting it back, faster than once
    a period, made the newest seen alternate and restarted the count each time."""
    upkeep = log.clocked_upkeep(CheckpointClock(), seconds=0.5)

    with unit_of_work(log.sessions) as session:
        newest = _newest_row(session)
        ahead = utc_now() + DATE_MARGIN - timedelta(seconds=30)
        session.execute(update(AuditCheckpoint).values(created_at=ahead))  # every row
        row = session.execute(select(AuditCheckpoint).where(AuditCheckpoint.id == newest)).one()
        saved = {column.key: getattr(row[0], column.key) for column in AuditCheckpoint.__table__.c}
        log.add(session, 1)
    signed: int | None = None
    deadline = time.monotonic() + 3
    hidden = False
    while signed is None and time.monotonic() < deadline:
        with unit_of_work(log.sessions) as session:
            if hidden:
                session.execute(insert(AuditCheckpoint).values(**saved))
            else:
                session.execute(delete(AuditCheckpoint).where(AuditCheckpoint.id == newest))
            hidden = not hidden
            signed = upkeep(session)
        time.sleep(0.1)
    assert signed == 13


def test_forged_rows_are_passed_over_for_the_latest_genuine_one(log: Log) -> None:
    verifier = log_verifier(AUTHORITY, log.keys.log_public)
    with unit_of_work(log.sessions) as session:
        genuine = latest_signed(session, verifier)
        assert genuine is not None
        assert genuine.size == 12
        oldest = session.execute(
            select(AuditCheckpoint.size, AuditCheckpoint.root_hash, AuditCheckpoint.note)
            .order_by(AuditCheckpoint.id)
            .limit(1)
        ).one()
        forged = NodeKeys.generate()  # a note signed with another key, of a larger size
        log.add(session, 5)
        head, origin = read_head(session), f"entraide.log/{AUTHORITY}"
        body = Checkpoint(origin=origin, size=head.size, root_hash=head.root_hash).format()
        session.add(
            AuditCheckpoint(
                size=head.size,
                root_hash=head.root_hash,
                note=sign_note(body, origin, forged.log),
                created_at=utc_now(),
            )
        )
        # Rows at ids above any the node will take (PostgreSQL's sequence does not move for
        # them): garbage with a huge size, and copies of the oldest genuine note as it is.
        for number in range(3 * LATEST_PAGE):
            garbage = {"size": 2**40, "root_hash": bytes(32), "note": "not a note"}
            copy = {"size": oldest.size, "root_hash": oldest.root_hash, "note": oldest.note}
            for offset, row in ((0, garbage), (1, copy)):
                session.execute(
                    insert(AuditCheckpoint).values(
                        id=2_000_000_000 + 2 * number + offset, created_at=utc_now(), **row
                    )
                )
        latest = latest_signed(session, verifier)
        assert latest is not None
        assert (latest.size, latest.note) == (12, genuine.note)
        # And the node signs the new entries once, then hands that checkpoint out.
        assert log.upkeep(session, every=1, seconds=3600) == 17
        assert log.upkeep(session, every=1, seconds=3600) is None
        signed = latest_signed(session, verifier)
        assert signed is not None
        assert signed.size == 17


def test_a_genuine_note_of_a_longer_log_is_not_taken_for_the_latest(log: Log) -> None:
    """A note the log key signed before a restore, of more entries than the log now holds,
    put back in the table: it covers no log there is, and stopped every checkpoint."""
    origin = f"entraide.log/{AUTHORITY}"
    body = Checkpoint(origin=origin, size=30, root_hash=os.urandom(32)).format()
    note = sign_note(body, origin, log.keys.log)
    with unit_of_work(log.sessions) as session:
        row = {"size": 30, "root_hash": Checkpoint.parse(body).root_hash, "note": note}
        session.execute(insert(AuditCheckpoint).values(created_at=utc_now(), **row))
        signed = latest_signed(session, log_verifier(AUTHORITY, log.keys.log_public))
        assert signed is not None
        assert signed.size == 12
        log.add(session, 1)
        assert log.upkeep(session, every=1, seconds=3600) == 13

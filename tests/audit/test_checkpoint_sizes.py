"""A checkpoint row whose size is no number of entries: passed over, named as damage.

From review: on SQLite, which keeps any value in any column, a row's `size` made text that
is not UTF-8 (a damaged page, a hand edit) made `audit verify --db` crash with a traceback
quoting the stored bytes, and doctor say nothing; a size of `'abc'` (or bytes, or a
fraction) was quoted by `audit verify --db` as the row's size, and doctor said nothing
either. The row is no checkpoint of this log, as one whose note cannot be read: the latest
genuine checkpoint is signed over, served and put in receipts, and `audit verify --db` and
doctor name the row (id and column, never the value) and fail. PostgreSQL's bigint holds
integers only: the most a hand edit leaves there is a size no log has (below zero, or past
the head), passed over and named as any forged row is
(tests/audit/test_checkpoint_rows.py). The running node: tests/audit/test_checkpoint_notes.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.audit.checkpoints import latest_signed, log_verifier, maybe_checkpoint, sign_checkpoint
from app.audit.log import record
from app.audit.mac import append_with
from app.audit.service import verify_database
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.doctor import check_checkpoint_rows
from app.migrate import upgrade
from app.models import AuditCheckpoint
from tests.conftest import Databases

AUTHORITY = "ES/MJ"
# What each backend can hold in `size` that is no size of a checkpoint of this log.
DAMAGE = {
    # Text that is not UTF-8 (with a NUL inside), text, bytes, a fraction.
    "sqlite": ("CAST(X'FF00FE' AS TEXT)", "'abc'", "X'FF00FE'", "8.5"),
    # Integers only: below zero, and past any log.
    "postgresql": ("-1", "9223372036854775807"),
}
# How the stored values would read if quoted (none may be).
QUOTED = ("abc", "ff00fe", "\\xff", "\ufffd", "8.5")


@dataclass
class Log:
    url: str
    backend: str
    engine: Engine
    keys: NodeKeys
    sessions: sessionmaker[Session]

    def rows(self) -> list[int]:
        with unit_of_work(self.sessions) as session:
            return list(session.scalars(select(AuditCheckpoint.id).order_by(AuditCheckpoint.id)))

    def damage(self, rows: list[int]) -> None:
        """The sizes of `rows` overwritten as a damaged page or a hand edit leaves them:
        straight through the driver, which writes what SQLAlchemy would refuse."""
        statements = [
            f"UPDATE audit_checkpoints SET size = {value} WHERE id = {row}"  # noqa: S608
            for value, row in zip(DAMAGE[self.backend], rows, strict=True)
        ]
        if self.backend == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as connection:
                for statement in statements:
                    connection.execute(statement)
            return
        with self.engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))


@pytest.fixture
def log(databases: Databases) -> Iterator[Log]:
    url = databases.new("audit")
    upgrade(url)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    made = Log(
        url, databases.backend, engine, keys, append_with(make_session_factory(engine), keys.log)
    )
    with unit_of_work(made.sessions) as session:
        for _ in range(6):
            _add(session, 4)
            sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
    yield made
    engine.dispose()


def _add(session: Session, count: int) -> None:
    for number in range(count):
        record(session, actor="client:officer", action="request.read", details={"n": number})


def test_a_size_that_is_no_size_is_passed_over_and_named(log: Log) -> None:
    damaged = log.rows()[-len(DAMAGE[log.backend]) :]
    log.damage(damaged)
    genuine = 4 * (6 - len(damaged))  # the newest row left as it was signed
    with unit_of_work(log.sessions) as session:
        # What the auditor's API and every receipt hand out.
        latest = latest_signed(session, log_verifier(AUTHORITY, log.keys.log_public))
        assert latest is not None
        assert latest.size == genuine
        # The worker's upkeep signs over it: the entries after the genuine one are due.
        _add(session, 1)
        signed = maybe_checkpoint(
            session, authority_id=AUTHORITY, log_key=log.keys.log, every=1, seconds=3600
        )
        assert signed is not None
        assert signed.size == 25
        report = verify_database(session, authority_id=AUTHORITY, log_public=log.keys.log_public)
    problems = [problem.message for problem in report.problems]
    assert len(problems) == len(damaged), problems
    findings = [finding.message for finding in check_checkpoint_rows(log.engine)]
    if log.backend == "sqlite":
        for row, problem in zip(damaged, problems, strict=True):
            assert problem.startswith(
                f"checkpoint row {row}: its size (column size) cannot be read: the stored "
                "value was altered or damaged"
            ), problem
        assert len(findings) == 1, findings
        rows = ", ".join(map(str, damaged))
        assert findings[0].startswith(f"the size of audit checkpoint rows {rows} cannot be read")
        for said in (*problems, *findings):
            assert not any(value in said.lower() for value in QUOTED), said
    else:  # forged, not unreadable: named by what the row says, as any forged row
        for row, value, problem in zip(damaged, DAMAGE["postgresql"], problems, strict=True):
            assert problem.startswith(f"checkpoint row {row} says {value} entries"), problem
        assert findings == []

"""A checkpoint row whose note cannot be read: no note of ours, passed over; named as damage.

From review: on SQLite, a row's `note` made text that is not UTF-8 (a damaged page, a hand
edit) made `audit verify --db` and `audit checkpoint` crash with a traceback, doctor say "No
problem found", and every receipt the node signs answer 500 `stored_data_corrupt`: the
peers' deliveries to the node failed for one damaged row. What the log key signed is read
from the notes, and a note that cannot be read is none of them: it is passed over as a
forged row is (the latest genuine checkpoint is signed over, served and put in receipts),
while `audit verify --db` and doctor name the row (id and column, never the value) as
damaged storage and fail. PostgreSQL's text holds valid UTF-8 only: there the same paths
read a forged note SQLite's cast to bytes would not change (backslashes, accents) as text.
A `size` made such text crashed `audit verify --db` alike: the running node is checked here
with either column damaged (the rest: tests/audit/test_checkpoint_sizes.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.adopt import kept_a_record
from app.audit.checkpoints import latest_signed, log_verifier, maybe_checkpoint, sign_checkpoint
from app.audit.log import record
from app.audit.mac import append_with
from app.audit.note import open_note, parse_verifier_key
from app.audit.service import verify_database
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.models import AuditCheckpoint, WitnessedCheckpoint
from tests.conftest import Databases, migrated_sqlite
from tests.faults.harness import new_pair, wait_until

AUTHORITY = "ES/MJ"
# What the driver cannot give back as text: not UTF-8, with a NUL inside.
UNREADABLE = "CAST(X'FF00FE' AS TEXT)"
# PostgreSQL holds no such text; a note its text-to-bytea cast would parse, or refuse.
FORGED_TEXT = "entraide.log/ES/MJ\n\\x41\\\\ \\ é\n"


def _damage(url: str, row: int, column: str = "note") -> None:
    """As a damaged page or a hand edit leaves it: straight through sqlite3."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        connection.execute(
            f"UPDATE audit_checkpoints SET {column} = {UNREADABLE} WHERE id = ?",  # noqa: S608
            (row,),
        )


def _witnessed(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(select(WitnessedCheckpoint.note)))


def _named_damage(row: int, column: str = "note") -> str:
    return f"checkpoint row {row}: its {column} (column {column}) cannot be read"


@dataclass
class Log:
    url: str
    backend: str
    engine: Engine
    keys: NodeKeys
    sessions: sessionmaker[Session]

    def add(self, session: Session, count: int) -> None:
        for number in range(count):
            record(session, actor="client:officer", action="request.read", details={"n": number})

    def rows(self) -> list[int]:
        with unit_of_work(self.sessions) as session:
            return list(session.scalars(select(AuditCheckpoint.id).order_by(AuditCheckpoint.id)))

    def spoil(self, row: int) -> None:
        """The row's note made what this backend can hold and no note of ours is."""
        if self.backend == "sqlite":
            _damage(self.url, row)
            return
        with unit_of_work(self.sessions) as session:
            session.execute(
                update(AuditCheckpoint).where(AuditCheckpoint.id == row).values(note=FORGED_TEXT)
            )


@pytest.fixture
def log(databases: Databases) -> Iterator[Log]:
    url = databases.new("audit", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    made = Log(
        url, databases.backend, engine, keys, append_with(make_session_factory(engine), keys.log)
    )
    with unit_of_work(made.sessions) as session:
        for _ in range(3):
            made.add(session, 4)
            sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
    yield made
    engine.dispose()


def test_a_note_that_cannot_be_read_is_passed_over_for_the_latest_genuine_one(log: Log) -> None:
    verifier = log_verifier(AUTHORITY, log.keys.log_public)
    newest = log.rows()[-1]
    log.spoil(newest)
    with unit_of_work(log.sessions) as session:
        latest = latest_signed(session, verifier)
        assert latest is not None
        assert latest.size == 8  # the row before it
        assert kept_a_record(session, authority_id=AUTHORITY, log_public=log.keys.log_public)
        # The worker signs over it: the entries after the genuine checkpoint are due.
        log.add(session, 1)
        signed = maybe_checkpoint(
            session, authority_id=AUTHORITY, log_key=log.keys.log, every=1, seconds=3600
        )
        assert signed is not None
        assert signed.size == 13
        problems = [
            problem.message
            for problem in verify_database(
                session, authority_id=AUTHORITY, log_public=log.keys.log_public
            ).problems
        ]
    if log.backend == "sqlite":
        assert len(problems) == 1, problems
        assert problems[0].startswith(_named_damage(newest)), problems
        assert "\ufffd" not in problems[0]
    else:  # a forged note, which the main pass names as it always did
        assert not any("cannot be read" in problem for problem in problems), problems
        assert any(problem.startswith("checkpoint #3:") for problem in problems), problems


def test_every_note_unreadable_is_no_checkpoint_and_one_is_signed(log: Log) -> None:
    for row in log.rows():
        log.spoil(row)
    with unit_of_work(log.sessions) as session:
        assert latest_signed(session, log_verifier(AUTHORITY, log.keys.log_public)) is None
        signed = sign_checkpoint(session, authority_id=AUTHORITY, log_key=log.keys.log)
        assert signed.size == 12
        assert session.scalar(select(func.count()).select_from(AuditCheckpoint)) == 4


@pytest.mark.parametrize("column", ["note", "size"])
def test_a_damaged_row_is_named_and_deliveries_to_the_node_go_on(
    tmp_path: Path, column: str
) -> None:
    """SQLite only: PostgreSQL refuses text that is not UTF-8 when it is written. The
    receiving node's newest note (or size) damaged: its receipts carry the latest genuine
    checkpoint, its auditor is handed that one, and the commands name the row and exit 1."""
    pair = new_pair(
        tmp_path,
        migrated_sqlite(tmp_path / "es.db"),
        migrated_sqlite(tmp_path / "ar.db"),
        # No checkpoint of the receiver's own while the test runs: its receipts can only
        # carry one that was there before the damage.
        receiver_env={
            "ENTRAIDE_AUDIT_CHECKPOINT_EVERY": "100000",
            "ENTRAIDE_AUDIT_CHECKPOINT_SECONDS": "3600",
        },
    )
    receiver = pair.receiver
    try:
        pair.start()
        receiver.create_client("auditor", "auditor")
        receiver.cli("audit", "checkpoint")
        with pair.engine(receiver).connect() as connection:
            rows = connection.execute(
                select(AuditCheckpoint.id, AuditCheckpoint.note).order_by(AuditCheckpoint.id)
            ).all()
        assert len(rows) >= 2
        (_, genuine), (newest, _) = rows[-2], rows[-1]
        _damage(receiver.database_url, newest, column)

        # Receipts: the sender's deliveries go through, witnessing the genuine checkpoint.
        pair.submit(1)
        pair.wait_delivered(1, timeout=30)
        # The worker witnesses a receipt's checkpoint after it has settled the delivery.
        sender = pair.engine(pair.sender)
        wait_until("the sender to witness a checkpoint", lambda: _witnessed(sender))
        assert _witnessed(sender) == [genuine]
        with receiver.client("auditor") as http:
            answer = http.get("/api/v1/audit/checkpoint")
        assert answer.status_code == 200, answer.text
        assert answer.json()["note"] == genuine
        open_note(genuine, [parse_verifier_key(answer.json()["log_key"])])

        verify = receiver.cli("audit", "verify", "--db", check=False)
        assert verify.returncode == 1, verify.stdout
        assert "Traceback" not in verify.stderr
        assert f"FAILED: {_named_damage(newest, column)}" in verify.stderr, verify.stderr
        doctor = receiver.cli("doctor", check=False)
        assert doctor.returncode == 1
        assert "Traceback" not in doctor.stdout + doctor.stderr
        assert "\ufffd" not in verify.stderr + doctor.stdout  # the value is never quoted
        damaged = [line for line in doctor.stdout.splitlines() if "cannot be read" in line]
        assert len(damaged) == 1, doctor.stdout
        assert damaged[0].startswith("FAIL  audit"), damaged[0]
        assert f"the {column} of audit checkpoint row {newest} cannot be read" in damaged[0]

        exported = receiver.cli("audit", "export", "--out", str(tmp_path / "export"), check=False)
        assert exported.returncode == 0, exported.stderr
        # Left out, said; a note under a damaged size is what the key signed, and goes out.
        assert (f"checkpoint row {newest}" in exported.stderr) == (column == "note")
        assert receiver.cli("audit", "verify", str(tmp_path / "export")).returncode == 0
        signed = receiver.cli("audit", "checkpoint", check=False)
        assert signed.returncode == 0, signed.stderr
        assert signed.stdout.startswith("entraide.log/")
        with sqlite3.connect(tmp_path / "ar.db") as connection:  # left as it was till now
            assert connection.execute(
                f"SELECT hex({column}) FROM audit_checkpoints WHERE id = ?",  # noqa: S608
                (newest,),
            ).fetchone() == ("FF00FE",)
            # docs/operations.md §8: with no backup to put it back from, the row goes.
            connection.execute("DELETE FROM audit_checkpoints WHERE id = ?", (newest,))
        assert receiver.cli("audit", "verify", "--db").returncode == 0
    finally:
        pair.close()
    assert "Traceback" not in receiver.log_path.read_text()

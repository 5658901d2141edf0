"""The log never goes back on what its key signed, whatever the database says.

Someone who can write to the database but holds no key puts back an older copy of the log
(or rewrites it from an older checkpoint on, dropping the later checkpoints with the entries):
`audit verify --db` said OK, and the node signed the result. The record beside the keys
(app/audit/anchor.py) now stops both, and lets a log that only grew go on as before.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.audit.anchor import LogRolledBack, SignedLogAnchor
from app.audit.checkpoints import maybe_checkpoint, sign_checkpoint
from app.audit.log import record
from app.audit.mac import append_with
from app.audit.merkle import EMPTY_ROOT
from app.audit.service import verify_database
from app.crypto.keys import NodeKeys, save_keys
from app.db import make_engine, make_session_factory, read_snapshot, unit_of_work
from app.localnodes import LocalNode
from app.models import AuditCheckpoint
from tests.conftest import migrated_sqlite

AUTHORITY = "ES/MJ"


@dataclass
class Log:
    path: Path
    keys: NodeKeys
    anchor: SignedLogAnchor
    sessions: sessionmaker[Session]

    def append(self, count: int, tag: str = "genuine") -> None:
        with unit_of_work(self.sessions) as session:
            for number in range(count):
                record(session, actor="node", action="test.event", details={tag: number})

    def sign(self, anchor: SignedLogAnchor | None = None) -> int:
        with unit_of_work(self.sessions) as session:
            return sign_checkpoint(
                session, authority_id=AUTHORITY, log_key=self.keys.log, anchor=anchor
            ).size

    def copy_to(self, target: Path) -> None:
        with sqlite3.connect(self.path) as source, sqlite3.connect(target) as copy:
            source.backup(copy)

    def put_back(self, copy: Path) -> None:
        """What a database writer does: the older copy in place of the live log."""
        with sqlite3.connect(copy) as source, sqlite3.connect(self.path) as live:
            source.backup(live)

    def problems(self) -> list[str]:
        with read_snapshot(self.sessions) as session:
            report = verify_database(
                session, authority_id=AUTHORITY, log_public=self.keys.log_public, anchor=self.anchor
            )
        return [problem.message for problem in report.problems]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    path = tmp_path / "log.db"
    engine = make_engine(migrated_sqlite(path))
    (tmp_path / "keys").mkdir(mode=0o700)
    anchor = SignedLogAnchor(tmp_path / "keys" / "log-signed.json")
    anchor.start()  # as `init` does
    keys = NodeKeys.generate()
    try:
        yield Log(path, keys, anchor, append_with(make_session_factory(engine), keys.log))
    finally:
        engine.dispose()


def test_a_log_put_back_to_an_older_copy_is_not_signed_again(log: Log, tmp_path: Path) -> None:
    log.append(300)
    assert log.sign(log.anchor) == 300
    log.copy_to(tmp_path / "older.db")
    log.append(300)
    assert log.sign(log.anchor) == 600
    assert log.anchor.read() is not None
    assert log.anchor.read().size == 600  # type: ignore[union-attr]
    log.put_back(tmp_path / "older.db")
    log.append(5)  # the node goes on appending over the older log
    assert log.problems() == [
        "the log holds 305 entries, but this node signed a checkpoint of 600: entries were "
        "removed from the database"
    ]
    with pytest.raises(LogRolledBack, match="entries were removed"):
        log.sign(log.anchor)
    # The worker's upkeep signs nothing more over it, and does not stop the deliveries.
    with unit_of_work(log.sessions) as session:
        signed = maybe_checkpoint(
            session,
            authority_id=AUTHORITY,
            log_key=log.keys.log,
            every=1,
            seconds=0,
            anchor=log.anchor,
        )
    assert signed is None
    # Without the record, as before: an intact-looking log, and a new signature over it.
    assert log.sign(None) == 305


def test_a_log_rewritten_from_an_older_checkpoint_is_not_signed(log: Log, tmp_path: Path) -> None:
    log.append(100)
    log.sign(log.anchor)
    log.copy_to(tmp_path / "at-100.db")
    log.append(200)
    assert log.sign(log.anchor) == 300
    log.put_back(tmp_path / "at-100.db")
    log.append(200, tag="rewritten")  # as long as the signed one, other entries
    with pytest.raises(LogRolledBack, match="first 300 entries are not those this node signed"):
        log.sign(log.anchor)
    log.append(10, tag="rewritten")  # and longer: no consistency proof from what was signed
    assert log.problems() == ["the log's first 300 entries are not those this node signed"]
    with pytest.raises(LogRolledBack, match="first 300 entries are not those"):
        log.sign(log.anchor)


def test_a_log_that_only_grows_is_signed_and_recorded_once_committed(log: Log) -> None:
    log.append(3)
    assert log.sign(log.anchor) == 3
    log.append(300)
    assert log.sign(log.anchor) == 303
    assert log.problems() == []
    log.append(2)
    # A checkpoint whose transaction rolls back was never signed for anyone: not recorded.
    with log.sessions() as session:
        sign_checkpoint(session, authority_id=AUTHORITY, log_key=log.keys.log, anchor=log.anchor)
        session.rollback()
    recorded = log.anchor.read()
    assert recorded is not None
    assert recorded.size == 303
    assert log.sign(log.anchor) == 305
    assert log.anchor.path.stat().st_mode & 0o777 == 0o600


def test_the_record_goes_where_it_is_told_when_the_keys_are_read_only(tmp_path: Path) -> None:
    """docker-compose.yml mounts the keys read-only: ENTRAIDE_SIGNED_LOG_FILE puts the record
    in a writable place, and `doctor` says when there is none."""
    url = migrated_sqlite(tmp_path / "es.db")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", url)
    node.init()
    # Where nothing can be written (root ignores modes: a path through a file stands in for
    # a read-only mount): checkpoints are still signed, and doctor names the fix.
    (tmp_path / "not-a-folder").write_text("")
    node.extra_env["ENTRAIDE_SIGNED_LOG_FILE"] = str(tmp_path / "not-a-folder" / "log.json")
    node.cli("audit", "checkpoint")
    warned = node.cli("doctor", check=False).stdout
    assert "cannot be written" in warned, warned
    assert "set ENTRAIDE_SIGNED_LOG_FILE" in warned

    in_keys = (node.keys_dir / "log-signed.json").read_bytes()  # init's checkpoint
    record = tmp_path / "state" / "entraide" / "log-signed.json"
    node.extra_env["ENTRAIDE_SIGNED_LOG_FILE"] = str(record)
    node.create_client("first", "officer")  # something new to sign
    node.cli("audit", "checkpoint")
    assert record.stat().st_mode & 0o777 == 0o600  # its folders are created for it
    assert (node.keys_dir / "log-signed.json").read_bytes() == in_keys  # left alone
    signed = SignedLogAnchor(record).read()
    assert signed is not None
    doctor = node.cli("doctor", check=False).stdout
    assert f"signed log record {record} (checkpoint of {signed.size} entries)" in doctor

    # The record protects the log from there: a database put back is caught.
    shutil.copy(tmp_path / "es.db", tmp_path / "older.db")
    node.create_client("another", "officer")
    node.cli("audit", "checkpoint")
    shutil.copy(tmp_path / "older.db", tmp_path / "es.db")
    verified = node.cli("audit", "verify", "--db", check=False)
    assert verified.returncode != 0
    assert "entries were removed from the database" in verified.stdout + verified.stderr
    # And doctor, which said "No problem found" over a rolled-back log, says so too.
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert "audit log rolled back or rewritten" in doctor.stdout


def test_moving_the_record_keeps_what_was_signed(tmp_path: Path) -> None:
    """ENTRAIDE_SIGNED_LOG_FILE set on a node that kept its record in the keys folder: the
    record there still counts until the new one is written, so a database put back between
    the two is caught (it was taken for a node that had signed nothing)."""
    url = migrated_sqlite(tmp_path / "es.db")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", url)
    node.init()
    shutil.copy(tmp_path / "es.db", tmp_path / "older.db")
    node.create_client("first", "officer")
    node.cli("audit", "checkpoint")  # recorded in the keys folder
    shutil.copy(tmp_path / "older.db", tmp_path / "es.db")
    node.extra_env["ENTRAIDE_SIGNED_LOG_FILE"] = str(tmp_path / "state" / "log-signed.json")
    verified = node.cli("audit", "verify", "--db", check=False)
    assert verified.returncode != 0
    assert "entries were removed from the database" in verified.stdout + verified.stderr


def test_a_node_from_before_the_record_adopts_its_log(tmp_path: Path) -> None:
    """Upgraded from before `log-signed.json`, or the record lost: checkpoints and no record.
    Nothing is signed until the operator adopts the log, which must verify first."""
    url = migrated_sqlite(tmp_path / "es.db")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", url)
    node.init()
    (node.keys_dir / "log-signed.json").unlink()  # as before the record existed
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode != 0
    assert "there is no record at" in doctor.stdout, doctor.stdout
    assert "`entraide audit checkpoint --adopt`" in doctor.stdout
    refused = node.cli("audit", "checkpoint", check=False)
    assert refused.returncode == 1
    assert "there is no record at" in refused.stderr
    assert node.cli("audit", "verify", "--db", check=False).returncode != 0
    node.cli("audit", "checkpoint", "--adopt")
    assert SignedLogAnchor(node.keys_dir / "log-signed.json").read() is not None
    doctor = node.cli("doctor", check=False).stdout
    assert "signed log record" in doctor
    assert "there is no record" not in doctor
    adopted = node.cli("audit", "verify", "--db")
    assert adopted.returncode == 0
    again = node.cli("audit", "checkpoint", "--adopt", check=False)
    assert again.returncode == 1
    assert "nothing to adopt" in again.stderr


def test_deleting_the_record_does_not_let_a_rolled_back_log_be_signed(
    log: Log, tmp_path: Path
) -> None:
    log.append(3)
    log.sign(log.anchor)
    log.copy_to(tmp_path / "older.db")
    log.append(4)
    assert log.sign(log.anchor) == 7
    log.put_back(tmp_path / "older.db")
    log.anchor.path.unlink()  # what a writer of the record's folder can do without any key
    log.append(1)
    with pytest.raises(LogRolledBack, match="there is no record at"):
        log.sign(log.anchor)
    assert any("there is no record at" in problem for problem in log.problems())


def test_deleting_the_record_and_every_checkpoint_does_not_switch_the_check_off(
    log: Log,
) -> None:
    """From review: with the record and every checkpoint row deleted, a log cut back and
    re-linked looked like a new one, and the node signed it. `init` signs its first
    checkpoint with its first entries, so entries and no checkpoint is an alarm."""
    log.append(3)
    log.sign(log.anchor)
    log.append(2)
    with unit_of_work(log.sessions) as session:
        session.query(AuditCheckpoint).delete()
    log.anchor.path.unlink()
    with pytest.raises(LogRolledBack, match="holds 5 entries and no signed checkpoint"):
        log.sign(log.anchor)
    assert any("no signed checkpoint" in problem for problem in log.problems())


def test_deleting_the_record_with_the_whole_log_does_not_switch_the_check_off(log: Log) -> None:
    """From review: with the record, every checkpoint and every entry deleted, the log
    looked new and the node signed it (and wrote a new record). `init` writes the record
    before the first entry: a missing one is always an alarm where it can be written."""
    log.anchor.path.unlink()
    assert any("`entraide init` wrote one" in problem for problem in log.problems())
    with pytest.raises(LogRolledBack, match="there is no record at"):
        log.sign(log.anchor)


def test_a_record_that_cannot_be_written_leaves_the_node_without_one(tmp_path: Path) -> None:
    """`init` goes on where the record cannot be written (it stopped half way, keys saved
    and no entry, from review); such a node signs on, as `doctor` warns."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    anchor = SignedLogAnchor(blocked / "log-signed.json")
    assert anchor.start() is False
    assert not anchor.writable()


def test_a_node_not_yet_initialised_is_no_alarm(tmp_path: Path) -> None:
    """`entraide migrate` (or `doctor`) before `init`: an empty log, no keys, no record."""
    url = migrated_sqlite(tmp_path / "fresh.db")
    keys_dir = tmp_path / "keys"
    anchor = SignedLogAnchor(keys_dir / "log-signed.json", keys_dir=keys_dir)
    engine = make_engine(url)
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            assert anchor.problem(session, 0, EMPTY_ROOT) is None
            save_keys(keys_dir, NodeKeys.generate())
            assert anchor.problem(session, 0, EMPTY_ROOT) is not None  # keys, no record
    finally:
        engine.dispose()


def test_a_rollback_is_alarmed_once_and_again_when_it_goes_further_back(
    log: Log, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's upkeep tries every round: the alarm is logged once for a rollback, not
    at each round nor at each entry appended over it, and again when the log is put back
    further (from review: keyed on the record alone, the second was never logged)."""
    log.append(10)
    log.sign(log.anchor)
    log.copy_to(tmp_path / "at-10.db")
    log.append(10)
    log.sign(log.anchor)
    log.copy_to(tmp_path / "at-20.db")
    log.append(10)
    assert log.sign(log.anchor) == 30

    def upkeep() -> None:
        with unit_of_work(log.sessions) as session:
            maybe_checkpoint(
                session,
                authority_id=AUTHORITY,
                log_key=log.keys.log,
                every=1,
                seconds=0,
                anchor=log.anchor,
            )

    def alarms() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]

    with caplog.at_level(logging.CRITICAL, logger="app.audit.anchor"):
        log.put_back(tmp_path / "at-20.db")
        log.append(1)
        upkeep()
        upkeep()
        log.append(2)  # the node goes on appending: the same problem
        upkeep()
        assert len(alarms()) == 1
        assert "the log holds 21 entries, but this node signed a checkpoint of 30" in alarms()[0]
        log.put_back(tmp_path / "at-10.db")  # further back
        log.append(1)
        upkeep()
        upkeep()
        assert len(alarms()) == 2
        assert "the log holds 11 entries, but this node signed a checkpoint of 30" in alarms()[1]

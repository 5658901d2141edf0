"""Upgrading a node from before the record of what its log key signed, as §7 says.

From review: every node upgraded from a release before `log-signed.json` (app/audit/anchor.py)
by the documented steps (backup, `entraide migrate`, start, `entraide doctor`) reported a
rolled-back audit log: doctor failed, `audit verify --db` and `audit checkpoint` exited 1, no
checkpoint was signed, and `serve` logged the alarm at every worker round, until the operator
found `entraide audit checkpoint --adopt`. `entraide migrate` now adopts such a log when it
verifies; a record deleted beside a database of the record's schema or later stays an alarm.

The database is built at the schema of the release before the record (79b5e8c), and filled
as that release filled it: entries without MACs, checkpoints signed without extensions, no
record beside the keys. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from sqlalchemy import Engine, LargeBinary, select, text

from app.audit.adopt import RECORD_INTRODUCED_AT
from app.audit.anchor import SignedLogAnchor
from app.audit.checkpoints import log_origin
from app.audit.log import lock_head, mark_checkpointed, record
from app.audit.mac import append_with
from app.audit.note import Checkpoint, sign_note
from app.crypto.encoding import utc_now
from app.crypto.keys import NodeIdentity, NodeKeys, save_identity, save_keys
from app.db import make_engine, make_session_factory, unit_of_work
from app.localnodes import LocalNode
from app.migrate import alembic_config, upgrade
from app.models import AuditCheckpoint, AuditEntry
from tests.conftest import Databases

AUTHORITY = "ES/MJ"
BEFORE_THE_RECORD = "49a8eff55d00"  # the schema of 79b5e8c, the release the review upgraded
ALARM = "audit log rolled back or rewritten"


def _node(databases: Databases, tmp_path: Path) -> LocalNode:
    node = LocalNode(AUTHORITY, "Ministerio de Justicia", tmp_path / "es", databases.new("es"))
    # Checkpoints at every new entry: the worker's upkeep tries at each round.
    node.extra_env.update(
        {"ENTRAIDE_AUDIT_CHECKPOINT_EVERY": "1", "ENTRAIDE_AUDIT_CHECKPOINT_SECONDS": "1"}
    )
    return node


def _as_before_the_record(node: LocalNode) -> None:
    """What `init`, a few commands and the worker of the release before the record left."""
    keys = NodeKeys.generate()
    save_keys(node.keys_dir, keys)
    save_identity(node.keys_dir, NodeIdentity(AUTHORITY, node.name, node.url))
    upgrade(node.database_url, BEFORE_THE_RECORD)
    engine = make_engine(node.database_url)
    try:
        # Today's appends write each entry's MAC, a column this schema predates: there only
        # while they write (the entries then have none, as that release's had none).
        blob = LargeBinary().compile(dialect=engine.dialect)
        with engine.begin() as connection:
            connection.execute(text(f"ALTER TABLE audit_entries ADD COLUMN mac {blob}"))
        sessions = append_with(make_session_factory(engine), keys.log)
        for batch, actions in enumerate(
            (
                ("key.created", "key.created", "key.created"),
                ("client.created",),
                ("peer.added", "request.submitted", "envelope.sealed"),
                ("envelope.delivered",),
                ("request.read", "request.read"),  # after the last checkpoint
            )
        ):
            with unit_of_work(sessions) as session:
                for action in actions:
                    record(session, actor="operator:root", action=action, details={"n": batch})
                if batch < 4:
                    _sign_as_before_the_record(session, keys)
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE audit_entries DROP COLUMN mac"))
    finally:
        engine.dispose()
    assert not (node.keys_dir / "log-signed.json").exists()


def _sign_as_before_the_record(session: object, keys: NodeKeys) -> None:
    """That release's `sign_checkpoint`: the head, signed, no extension, nothing recorded."""
    from sqlalchemy.orm import Session

    assert isinstance(session, Session)
    head = lock_head(session)
    origin = log_origin(AUTHORITY)
    body = Checkpoint(origin=origin, size=head.size, root_hash=head.root_hash).format()
    session.add(
        AuditCheckpoint(
            size=head.size,
            root_hash=head.root_hash,
            note=sign_note(body, origin, keys.log),
            created_at=utc_now(),
        )
    )
    mark_checkpointed(session)
    session.flush()


def _actions(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(select(AuditEntry.action).order_by(AuditEntry.idx)))


def _checkpoints(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return len(connection.scalars(select(AuditCheckpoint.id)).all())
    finally:
        engine.dispose()


def _wait_for_checkpoints(node: LocalNode, more_than: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := _checkpoints(node.database_url)) <= more_than:
        assert time.monotonic() < deadline, node.log_path.read_text()
        time.sleep(0.2)
    return count


def test_migrate_adopts_the_log_of_a_node_from_before_the_record(
    databases: Databases, tmp_path: Path
) -> None:
    node = _node(databases, tmp_path)
    _as_before_the_record(node)

    migrated = node.cli("migrate").stdout
    assert f"database migrated: {BEFORE_THE_RECORD} -> " in migrated
    assert "audit log adopted" in migrated, migrated
    record_file = node.keys_dir / "log-signed.json"
    assert str(record_file) in migrated
    recorded = SignedLogAnchor(record_file).read()
    assert recorded is not None
    assert recorded.size == 11  # the 10 entries it found, and its own
    engine = make_engine(node.database_url)
    try:
        assert _actions(engine)[-1] == "audit.log_adopted"  # on record, as restore's is
    finally:
        engine.dispose()

    # §7's next steps pass: doctor, and the log's own checks.
    doctor = node.cli("doctor", check=False).stdout
    assert "FAIL  audit" not in doctor, doctor
    assert f"signed log record {record_file}" in doctor, doctor
    assert node.cli("audit", "verify", "--db").returncode == 0
    node.cli("audit", "checkpoint")
    assert "database schema is current" in node.cli("migrate").stdout  # adopted once
    signed = _checkpoints(node.database_url)

    # The node's worker signs what comes next, and raises no alarm.
    node.start()
    try:
        node.create_client("officer", "officer")
        _wait_for_checkpoints(node, signed)
    finally:
        node.stop()
    assert ALARM not in node.log_path.read_text()


def test_a_record_deleted_beside_a_current_database_stays_an_alarm(
    databases: Databases, tmp_path: Path
) -> None:
    """The tamper case the alarm is for: `migrate` adopts nothing over it, and the running
    node says it once, not at every round of its worker."""
    node = _node(databases, tmp_path)
    node.init()
    record_file = node.keys_dir / "log-signed.json"
    record_file.unlink()
    assert "database schema is current" in node.cli("migrate").stdout
    assert not record_file.exists()
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert "there is no record at" in doctor.stdout
    signed = _checkpoints(node.database_url)

    node.start()
    try:
        node.create_client("officer", "officer")  # entries to sign, at every round
        time.sleep(3)  # some 15 rounds of the worker (ENTRAIDE_WORKER_POLL_SECONDS=0.2)
        node.create_client("auditor", "auditor")  # the same problem, a longer log
        time.sleep(1)
    finally:
        node.stop()
    logged = node.log_path.read_text()
    assert logged.count(ALARM) == 1, logged
    assert "there is no record at" in logged
    assert "no checkpoint signed" not in logged
    assert _checkpoints(node.database_url) == signed


def test_a_record_deleted_beside_a_database_of_the_records_schema_stays_an_alarm(
    databases: Databases, tmp_path: Path
) -> None:
    """A database at the schema the record came with may have been run by a release that
    kept one: migrating it from there adopts nothing."""
    node = _node(databases, tmp_path)
    node.init()
    (node.keys_dir / "log-signed.json").unlink()
    command.downgrade(alembic_config(node.database_url), RECORD_INTRODUCED_AT)
    migrated = node.cli("migrate").stdout
    assert f"database migrated: {RECORD_INTRODUCED_AT} -> " in migrated
    assert "adopted" not in migrated
    assert not (node.keys_dir / "log-signed.json").exists()
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert "there is no record at" in doctor.stdout

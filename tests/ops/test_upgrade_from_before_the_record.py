"""Upgrading a node from before the record of what its log key signed, as §7 says.

From review: every node upgraded from a release before `log-signed.json` (app/audit/anchor.py)
by the documented steps (backup, `entraide migrate`, start, `entraide doctor`) reported a
rolled-back audit log: doctor failed, `audit verify --db` and `audit checkpoint` exited 1, no
checkpoint was signed, and `serve` logged the alarm at every worker round, until the operator
found `entraide audit checkpoint --adopt`. `entraide migrate` now adopts such a log when it
verifies; a record deleted beside a database of the record's schema or later stays an alarm.

From a later review: the schema a database was migrated from is its writer's to set (`alembic
downgrade`), so that alone let a writer who deleted the record have `migrate` adopt a log they
rolled back. What the log key signed decides now: a checkpoint signed by a release that kept
the record (any extension line), or no signed checkpoint at all, and `migrate` adopts nothing.
And `migrate` says it is done only once the record is there: missing or unreadable, it says
what to do and exits 1, however often it runs.

The database is built at the schema of the release before the record (79b5e8c), and filled
as that release filled it: entries without MACs, checkpoints signed without extensions, no
record beside the keys. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from alembic import command
from sqlalchemy import Engine, LargeBinary, delete, select, text, update

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
from tests.conftest import Databases, _admin_execute

AUTHORITY = "ES/MJ"
BEFORE_THE_RECORD = "49a8eff55d00"  # the schema of 79b5e8c, the release the review upgraded
ALARM = "audit log rolled back or rewritten"
BEFORE_RECORDS_SCHEMA = f"{RECORD_INTRODUCED_AT}-1"  # c3a9e1d24f70, the writer's pick
ADOPT = "`entraide audit checkpoint --adopt`"


def _node(databases: Databases, tmp_path: Path, *, migrated: bool = False) -> LocalNode:
    """On an empty database (an older schema is built on it, or `init` migrates it and the
    test then downgrades it), or with `migrated` on one at the latest migration."""
    url = databases.new("es", migrated=migrated)
    node = LocalNode(AUTHORITY, "Ministerio de Justicia", tmp_path / "es", url)
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
    # Done is said last, once the record is there.
    assert migrated.index("audit log adopted") < migrated.index("start this version's processes")
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
    again = node.cli("migrate")  # adopted once
    assert "database schema is current" in again.stdout
    assert not again.stderr
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
    node = _node(databases, tmp_path, migrated=True)
    node.init()
    record_file = node.keys_dir / "log-signed.json"
    record_file.unlink()
    migrated = node.cli("migrate", check=False)
    assert migrated.returncode == 1, migrated.stdout
    assert "database schema is current" in migrated.stderr
    assert f"there is no record at {record_file}" in migrated.stderr
    assert ADOPT in migrated.stderr
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
    result = node.cli("migrate", check=False)
    assert result.returncode == 1, result.stdout
    migrated = result.stdout + result.stderr
    assert f"database migrated: {RECORD_INTRODUCED_AT} -> " in migrated
    assert "audit log adopted" not in migrated
    assert ADOPT in migrated
    assert not (node.keys_dir / "log-signed.json").exists()
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert "there is no record at" in doctor.stdout


def _put_back_later(databases: Databases, url: str) -> Callable[[], None]:
    """A copy of the database as it is now, and what puts it back in its place (a writer's
    rollback: the whole database as it was, on either backend)."""
    if databases.backend == "sqlite":
        path = url.removeprefix("sqlite:///")
        saved = f"{path}.saved"

        def copy(source: str, target: str) -> None:
            with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
                src.backup(dst)

        copy(path, saved)
        return lambda: copy(saved, path)
    name = url.rsplit("/", 1)[1]
    saved = f"entraide_test_{uuid.uuid4().hex}"
    _admin_execute(f'CREATE DATABASE "{saved}" TEMPLATE "{name}"')
    databases.created.append(saved)

    def put_back() -> None:
        _admin_execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{saved}"')

    return put_back


def _stays_unadopted(node: LocalNode, *, entries: int) -> None:
    record_file = node.keys_dir / "log-signed.json"
    assert not record_file.exists()
    engine = make_engine(node.database_url)
    try:
        assert "audit.log_adopted" not in _actions(engine)
        assert len(_actions(engine)) == entries
    finally:
        engine.dispose()
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert f"there is no record at {record_file}" in doctor.stdout
    assert node.cli("audit", "verify", "--db", check=False).returncode == 1


def test_a_rolled_back_log_with_its_schema_put_back_is_not_adopted(
    databases: Databases, tmp_path: Path
) -> None:
    """From review: a database writer deletes the record, puts back an older copy of the
    database and runs `alembic downgrade` below the record's schema; `serve` then says "run
    `entraide migrate`", and migrate adopted the rolled-back log: doctor and verify said OK,
    the entries deleted gone without a trace. The older copy's checkpoints were signed by a
    release that kept the record: nothing is adopted, and migrate says what to do."""
    node = _node(databases, tmp_path)
    node.init()
    node.create_client("a1", "admin")
    node.cli("audit", "checkpoint")
    put_back = _put_back_later(databases, node.database_url)
    for name in ("a2", "a3", "a4", "a5"):
        node.create_client(name, "admin")
    node.cli("audit", "checkpoint")

    (node.keys_dir / "log-signed.json").unlink()
    put_back()
    command.downgrade(alembic_config(node.database_url), BEFORE_RECORDS_SCHEMA)
    refused = node.cli("serve", "--port", str(node.port), check=False)
    assert "run `entraide migrate`" in refused.stderr, refused.stderr

    migrated = node.cli("migrate", check=False)
    assert migrated.returncode == 1, migrated.stdout
    assert "start this version's processes" not in migrated.stdout
    assert "audit log adopted" not in migrated.stdout
    said = migrated.stderr
    assert "database migrated: " in said
    assert "not adopted by itself" in said, said
    assert "signed by a release that kept the record" in said
    assert "'entry-macs'" in said
    assert ADOPT in said
    _stays_unadopted(node, entries=4)


def test_a_log_whose_checkpoints_were_all_deleted_is_not_adopted_by_migrate(
    databases: Databases, tmp_path: Path
) -> None:
    """The same writer, who also deletes every checkpoint (those of a release that kept the
    record would say so): a log nothing signed is not taken for an old node's either, as every
    release since checkpoints signs one at `init`."""
    node = _node(databases, tmp_path)
    node.init()
    node.create_client("a1", "admin")
    (node.keys_dir / "log-signed.json").unlink()
    engine = make_engine(node.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(delete(AuditCheckpoint))
    finally:
        engine.dispose()
    command.downgrade(alembic_config(node.database_url), BEFORE_RECORDS_SCHEMA)

    migrated = node.cli("migrate", check=False)
    assert migrated.returncode == 1, migrated.stdout
    assert "no checkpoint in the database verifies under this node's log key" in migrated.stderr
    assert ADOPT in migrated.stderr
    _stays_unadopted(node, entries=4)


def test_migrate_says_done_only_once_the_log_is_adopted(
    databases: Databases, tmp_path: Path
) -> None:
    """From review: when adoption failed (the log does not verify), migrate had already said
    "start this version's processes now", and run again it said "database schema is current"
    and exited 0 while doctor failed."""
    node = _node(databases, tmp_path)
    _as_before_the_record(node)
    engine = make_engine(node.database_url)
    try:
        with engine.begin() as connection:  # an entry a checkpoint covers, edited
            entry = connection.scalar(select(AuditEntry.entry).where(AuditEntry.idx == 3))
            edited = bytes(entry).replace(b"client.created", b"client.deleted")
            connection.execute(update(AuditEntry).where(AuditEntry.idx == 3).values(entry=edited))
    finally:
        engine.dispose()

    first = node.cli("migrate", check=False)
    assert first.returncode == 1, first.stdout
    assert "start this version's processes" not in first.stdout
    assert f"database migrated: {BEFORE_THE_RECORD} -> " in first.stderr
    assert "the audit log was not adopted: the audit log does not verify" in first.stderr
    assert "do not start the node before you know why" in first.stderr

    again = node.cli("migrate", check=False)
    assert again.returncode == 1, again.stdout
    assert "database schema is current" in again.stderr
    assert "there is no record at" in again.stderr
    assert ADOPT in again.stderr
    assert node.cli("doctor", check=False).returncode == 1


def test_migrate_fails_on_an_unreadable_record(databases: Databases, tmp_path: Path) -> None:
    """From review: with the record emptied, migrate said nothing of it and exited 0."""
    node = _node(databases, tmp_path, migrated=True)
    node.init()
    record_file = node.keys_dir / "log-signed.json"
    record_file.write_text("")
    migrated = node.cli("migrate", check=False)
    assert migrated.returncode == 1, migrated.stdout
    assert "database schema is current" in migrated.stderr
    assert f"{record_file} cannot be read" in migrated.stderr
    assert "restore it from its backup" in migrated.stderr
    assert record_file.read_text() == ""


def _schema(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return sorted(connection.scalars(text("SELECT version_num FROM alembic_version")))
    finally:
        engine.dispose()


def test_migrate_fails_while_the_log_does_not_extend_the_record(
    databases: Databases, tmp_path: Path
) -> None:
    """From review: with the record there but the database's log rolled back (an older copy
    of the database put back), `migrate` migrated and exited 0 while doctor failed, and an
    upgrade script that checks only migrate's exit status went on to start the node. It
    still migrates (nothing is lost), then says the alarm in doctor's words and exits 1, at
    every run while it holds: rolled back, and then grown past the record without extending
    it."""
    node = _node(databases, tmp_path)
    node.init()
    node.create_client("a1", "admin")
    node.cli("audit", "checkpoint")
    put_back = _put_back_later(databases, node.database_url)
    for name in ("a2", "a3"):
        node.create_client(name, "admin")
    node.cli("audit", "checkpoint")
    record_file = node.keys_dir / "log-signed.json"
    recorded = record_file.read_bytes()
    signed = SignedLogAnchor(record_file).read()
    assert signed is not None

    put_back()
    command.downgrade(alembic_config(node.database_url), "-1")  # an upgrade for it to run
    before = _schema(node.database_url)
    engine = make_engine(node.database_url)
    try:
        held = len(_actions(engine))
    finally:
        engine.dispose()
    assert held < signed.size

    first = node.cli("migrate", check=False)
    assert first.returncode == 1, first.stdout
    assert "start this version's processes" not in first.stdout
    said = first.stderr
    assert f"database migrated: {before[0]} -> " in said, said
    assert (
        f"{ALARM}: the log holds {held} entries, but this node signed a checkpoint of "
        f"{signed.size}: entries were removed from the database" in said
    ), said
    assert "docs/operations.md §8" in said
    assert "Traceback" not in said
    assert _schema(node.database_url) != before  # migrated all the same
    assert record_file.read_bytes() == recorded  # nothing adopted over it
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert f"{ALARM}: the log holds {held} entries" in doctor.stdout

    for name in ("b1", "b2", "b3"):  # longer than what was signed, not extending it
        node.create_client(name, "admin")
    again = node.cli("migrate", check=False)
    assert again.returncode == 1, again.stdout
    assert "database schema is current" in again.stderr
    assert (
        f"{ALARM}: the log's first {signed.size} entries are not those this node signed"
        in again.stderr
    ), again.stderr
    assert record_file.read_bytes() == recorded


def test_a_head_row_deleted_or_unreadable_fails_migrate_and_doctor(
    databases: Databases, tmp_path: Path
) -> None:
    """From review: a deleted audit head row, or one holding a value the driver cannot read,
    passed as "no schema yet": `migrate` exited 0 and doctor found no problem, while every
    audited action failed saying "run the migrations", which did nothing."""
    node = _node(databases, tmp_path, migrated=True)
    node.init()
    node.create_client("a1", "admin")
    node.cli("audit", "checkpoint")
    sqlite = node.database_url.startswith("sqlite")
    damages = ["DELETE FROM audit_head"]
    if sqlite:  # text SQLite cannot decode, in place of the head's time
        damages.insert(0, "UPDATE audit_head SET updated_at = CAST(X'FF00FE' AS TEXT)")
    for damage in damages:
        engine = make_engine(node.database_url)
        try:
            with engine.begin() as connection:
                connection.execute(text(damage))
        finally:
            engine.dispose()
        migrated = node.cli("migrate", check=False)
        assert migrated.returncode == 1, (damage, migrated.stdout)
        assert "the audit log's head row" in migrated.stderr, migrated.stderr
        assert "Traceback" not in migrated.stderr
        doctor = node.cli("doctor", check=False)
        assert doctor.returncode == 1, doctor.stdout
        assert "the audit log's head row" in doctor.stdout
        refused = node.cli("clients", "create", "a2", "--role", "admin", check=False)
        assert refused.returncode != 0
        assert "run the migrations" not in refused.stderr + refused.stdout

"""A checkpoint row whose date cannot be read: damaged storage, named, never a traceback.

From review: only the worker's upkeep was protected from a `created_at` the database driver
cannot read (SQLite keeps any text in it: one that is no date, or bytes that are not UTF-8;
PostgreSQL keeps `infinity`, which Python's datetime cannot hold). `audit verify --db` and
`audit checkpoint` crashed with a traceback, doctor said "No problem found" (or named only a
ValueError), and so did every call that reads the latest checkpoint: the auditor's `GET
/api/v1/audit/checkpoint` and each receipt the node signs. The date is no part of what the
log key signed: the checkpoint still counts, its date unknown (due by time at once), and
`audit verify --db` and doctor name the row as damaged storage and exit 1. On SQLite and
PostgreSQL, through the real commands and a running node.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import select, text

from app.audit.note import open_note, parse_verifier_key
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditCheckpoint
from tests.conftest import Databases
from tests.faults.harness import wait_until

AUTHORITY = "ES/MJ"
# What each backend keeps in a date column that its driver cannot read back as a datetime.
DAMAGE = {
    "sqlite": ("'garbage'", "CAST(X'FFFE41' AS TEXT)"),  # not a date; not UTF-8
    "postgresql": ("'infinity'", "'-infinity'"),
}


def _rows(url: str) -> list[int]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(select(AuditCheckpoint.id).order_by(AuditCheckpoint.id)))
    finally:
        engine.dispose()


def _damage(url: str, backend: str, rows: list[int]) -> None:
    """The dates of `rows` (newest first) overwritten, as a hand edit or a damaged page
    leaves them: straight through the driver, which writes what SQLAlchemy would refuse."""
    statements = [
        f"UPDATE audit_checkpoints SET created_at = {value} WHERE id = {row}"  # noqa: S608
        for value, row in zip(DAMAGE[backend], rows, strict=True)
    ]
    if backend == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            for statement in statements:
                connection.execute(statement)
        return
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def test_a_checkpoint_date_that_cannot_be_read_is_named_not_a_traceback(
    databases: Databases, tmp_path: Path
) -> None:
    es_db = databases.new("es", migrated=True)
    node = LocalNode(AUTHORITY, "Ministerio de Justicia", tmp_path / "es", es_db)
    node.extra_env["ENTRAIDE_AUDIT_CHECKPOINT_EVERY"] = "1"
    node.init(clients={"auditor": ("auditor",)})
    node.cli("audit", "checkpoint")
    node.create_client("admin", "admin")
    node.cli("audit", "checkpoint")
    rows = _rows(node.database_url)
    assert len(rows) >= 3
    newest, older, sound = rows[-1], rows[-2], rows[0]
    _damage(node.database_url, databases.backend, [newest, older])

    verify = node.cli("audit", "verify", "--db", check=False)
    assert verify.returncode == 1, verify.stdout
    assert "Traceback" not in verify.stderr
    for row in (newest, older):
        assert (
            f"checkpoint row {row}: its date (created_at) cannot be read: the stored value "
            "was altered or damaged"
        ) in verify.stderr, verify.stderr
    assert f"checkpoint row {sound}:" not in verify.stderr

    doctor = node.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert "Traceback" not in doctor.stderr
    assert "could not be checked" not in doctor.stdout  # named, not a failed check
    damaged = [line for line in doctor.stdout.splitlines() if "cannot be read" in line]
    assert len(damaged) == 1, doctor.stdout
    assert damaged[0].startswith("FAIL  audit")
    assert f"checkpoint rows {older}, {newest}" in damaged[0], damaged[0]

    # The checkpoint's note is what was signed: it still counts, and is handed out.
    signed = node.cli("audit", "checkpoint", check=False)
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("entraide.log/")
    node.start()
    try:
        with node.client("auditor") as http:
            answer = http.get("/api/v1/audit/checkpoint")
            assert answer.status_code == 200, answer.text
            latest = answer.json()
            assert latest["created_at"] is None
            key = parse_verifier_key(latest["log_key"])
            open_note(latest["note"], [key])
        # Due by time at once (its date unknown): the worker signs what comes next.
        node.create_client("officer", "officer")
        wait_until("a new checkpoint", lambda: _rows(node.database_url)[-1] > newest)
        with node.client("auditor") as http:
            later = http.get("/api/v1/audit/checkpoint").json()
        assert later["size"] > latest["size"]
        assert later["created_at"] is not None
    finally:
        node.stop()
    assert "Traceback" not in node.log_path.read_text()

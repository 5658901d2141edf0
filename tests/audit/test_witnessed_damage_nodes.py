"""Two running nodes, the sender's record of a checkpoint it witnessed damaged.

From review, reproduced with these nodes: on SQLite a witnessed row's `size` made text
failed every delivery round that brought the receiver's new checkpoint (`delivery round
failed (TypeError)`, once a round, for ever), the auditor's `GET /api/v1/audit/witnessed`
showed that text as the size, and doctor said "No problem found"; on PostgreSQL a size past
any log became the anchor, every round logged `no consistency proof: HTTP 422` (24 hours of
it would raise an alarm against the honest peer), and the listing showed it too. Now
deliveries go on, the operator is told once (a log line and `witness.held`), the listing
names the row and column, doctor fails naming them, and witnessing resumes once the value
is put back. The rest, value by value: tests/audit/test_witnessed_damage.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
from sqlalchemy import Engine, func, select, text

from app.models import AuditEntry, WitnessAlarm, WitnessedCheckpoint
from tests.conftest import Databases
from tests.faults.harness import Pair, new_pair, wait_until

# A size each backend keeps that is no size of a log: text, and past any log.
DAMAGE = {"sqlite": "'twelve'", "postgresql": "9223372036854775807"}


def _count(engine: Engine, model: type[WitnessedCheckpoint] | type[WitnessAlarm]) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(model)) or 0)


def _entries(engine: Engine, action: str) -> int:
    with engine.connect() as connection:
        statement = select(func.count()).where(AuditEntry.action == action)
        return int(connection.scalar(statement) or 0)


def _set_size(pair: Pair, backend: str, value: object) -> None:
    """Straight through the driver, which writes what SQLAlchemy would refuse."""
    statement = f"UPDATE witnessed_checkpoints SET size = {value}"  # noqa: S608
    if backend == "sqlite":
        with sqlite3.connect(pair.sender.database_url.removeprefix("sqlite:///")) as connection:
            connection.execute(statement)
        return
    with pair.engine(pair.sender).begin() as connection:
        connection.execute(text(statement))


def _new_checkpoint_delivered(pair: Pair, delivered: int) -> int:
    """The receiver signs a checkpoint, and one more delivery brings it back in a receipt."""
    pair.receiver.cli("audit", "checkpoint")
    pair.submit(1)
    pair.wait_delivered(delivered + 1, timeout=30)
    return delivered + 1


def test_deliveries_go_on_and_the_operator_is_told_once(
    databases: Databases, tmp_path: Path
) -> None:
    quiet = {
        "ENTRAIDE_AUDIT_CHECKPOINT_EVERY": "100000",
        "ENTRAIDE_AUDIT_CHECKPOINT_SECONDS": "3600",
    }
    pair = new_pair(tmp_path, databases.new("es"), databases.new("ar"), receiver_env=quiet)
    sender, value = pair.sender, DAMAGE[databases.backend]
    try:
        pair.start()
        sender.create_client("auditor", "auditor")
        delivered = _new_checkpoint_delivered(pair, 0)
        engine = pair.engine(sender)
        wait_until(
            "the sender to witness a checkpoint", lambda: _count(engine, WitnessedCheckpoint)
        )
        with engine.connect() as connection:
            row, size = connection.execute(
                select(WitnessedCheckpoint.id, WitnessedCheckpoint.size)
            ).one()
        _set_size(pair, databases.backend, value)

        delivered = _new_checkpoint_delivered(pair, delivered)
        wait_until("witnessing to be held", lambda: _entries(engine, "witness.held"))
        delivered = _new_checkpoint_delivered(pair, delivered)
        delivered = _new_checkpoint_delivered(pair, delivered)
        assert _entries(engine, "witness.held") == 1
        assert _count(engine, WitnessedCheckpoint) == 1  # nothing checked against another
        assert _count(engine, WitnessAlarm) == 0

        with sender.client("auditor") as http:
            listed = http.get("/api/v1/audit/witnessed")
        assert listed.status_code == 200, listed.text
        (item,) = listed.json()
        assert item["row"] == row
        assert item["damaged"] == ["size"]
        assert item["size"] is None
        cosignature = httpx.get(f"{sender.url}/p2p/v1/audit/cosignature?authority=AR/MPF")
        assert cosignature.json()["error"] == "stored_data_corrupt", cosignature.text
        assert "witnessed_checkpoints.size" in cosignature.json()["detail"]
        doctor = sender.cli("doctor", check=False)
        assert doctor.returncode == 1
        damaged = [line for line in doctor.stdout.splitlines() if "witnessed checkpoint" in line]
        assert len(damaged) == 1, doctor.stdout
        assert damaged[0].startswith(
            f"FAIL  audit            the size of witnessed checkpoint row {row} "
        )
        assert (
            "FAIL  peer AR/MPF      its witnessing is held: none of its checkpoints"
            in doctor.stdout
        )
        for said in (listed.text, cosignature.text, doctor.stdout):
            assert value.strip("'") not in said

        # docs/operations.md §8: the value put back, witnessing resumes.
        _set_size(pair, databases.backend, size)
        delivered = _new_checkpoint_delivered(pair, delivered)
        wait_until("witnessing to resume", lambda: _count(engine, WitnessedCheckpoint) == 2)
        assert _entries(engine, "witness.resumed") == 1
        doctor = sender.cli("doctor", check=False)
        assert "witnessed checkpoint" not in doctor.stdout
        assert "witnessing is held" not in doctor.stdout
    finally:
        pair.close()
    logged = sender.log_path.read_text()
    assert "Traceback" not in logged
    assert "round failed" not in logged
    assert logged.count("witnessing of AR/MPF held") == 1
    assert f"witnessed checkpoint row {row} (size) cannot be read" in logged
    assert logged.count("witnessing of AR/MPF resumes") == 1
    assert value.strip("'") not in logged

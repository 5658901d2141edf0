"""A full database is told as such (app/main.py, app/db.py `database_full`).

From review: with the database's disk full, every write answered `503 database_unavailable`,
"retry later", the log said only "OperationalError", and /readyz answered 200 ready. Now the
write answers `507 insufficient_storage`, the log names the driver's code (never its
message), /readyz fails `storage` for a minute, and nothing is half stored.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, func, select

from app.db import database_full, driver_error_name, unit_of_work
from app.evidence.node_store import blob_store
from app.models import CaseFile, OutboxItem
from tests.conftest import Databases, migrated_sqlite
from tests.requests.conftest import EXAMPLE, serve_node


def _request() -> dict[str, Any]:
    body: dict[str, Any] = {**EXAMPLE, "document": dict(EXAMPLE["document"])}
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    return body


def test_a_full_sqlite_database_answers_507_and_fails_readiness(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serve_node(migrated_sqlite(tmp_path / "ar.db"), tmp_path / "ar") as ar:
        assert ar.post("/api/v1/requests", _request()).status_code == 201
        with unit_of_work(ar.node.sessions) as session:
            stored = session.scalar(select(func.count()).select_from(CaseFile))
        # The database may grow no further: what SQLite says of a full disk (SQLITE_FULL).
        engine = ar.node.engine

        @event.listens_for(engine, "connect")
        def _no_room(dbapi_connection: Any, _record: Any) -> None:
            pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

        engine.dispose()
        with caplog.at_level(logging.ERROR, logger="app.main"):
            refused = [ar.post("/api/v1/requests", _request()) for _ in range(20)]
        full = [answer for answer in refused if answer.status_code == 507]
        assert full, [answer.status_code for answer in refused]
        assert {answer.status_code for answer in refused} <= {201, 507}
        assert full[0].json() == {
            "error": "insufficient_storage",
            "detail": "this node's database is full: nothing of this call was stored; retry "
            "once its operator has made room",
        }
        assert "database full (SQLITE_FULL): nothing was stored" in caplog.text
        ready = ar.http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["storage"].startswith("failing: the database was full at")
        metrics = ar.get("/metrics", client="monitor").text
        assert 'entraide_storage_full{storage="database"} 1.0' in metrics
        event.remove(engine, "connect", _no_room)
        engine.dispose()
        accepted = sum(answer.status_code == 201 for answer in refused)
        with unit_of_work(ar.node.sessions) as session:
            assert session.scalar(select(func.count()).select_from(CaseFile)) == (stored + accepted)
            # Each request stored has its delivery: nothing half stored.
            assert session.scalar(select(func.count()).select_from(OutboxItem)) == (
                stored + accepted
            )
        assert ar.post("/api/v1/requests", _request()).status_code == 201


def test_postgresqls_disk_full_is_told_apart_by_its_sqlstate() -> None:
    assert database_full(psycopg.errors.DiskFull())
    assert driver_error_name(psycopg.errors.DiskFull()) == "SQLSTATE 53100"
    assert not database_full(psycopg.errors.AdminShutdown())
    assert not database_full(psycopg.OperationalError("connection refused"))


def test_a_database_that_takes_no_write_fails_readiness(
    databases: Databases, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only database file (its owner or mode changed, a file-size limit; on
    PostgreSQL a standby): every write answered 503 while /readyz said ready, and nothing
    said why (from review). /readyz fails `storage`, and the log says what it is."""
    backend = databases.backend
    with serve_node(databases.new("ar", migrated=True), tmp_path / "ar") as ar:
        assert ar.post("/api/v1/requests", _request()).status_code == 201
        engine = ar.node.engine

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            if backend == "sqlite":
                dbapi_connection.execute("PRAGMA query_only = 1")
            else:
                with dbapi_connection.cursor() as cursor:
                    cursor.execute("SET default_transaction_read_only = on")
                dbapi_connection.commit()  # as app/db.py sets its time zone: kept

        engine.dispose()
        try:
            with caplog.at_level(logging.ERROR, logger="app.main"):
                refused = ar.post("/api/v1/requests", _request())
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "database_unavailable"
            assert "database unavailable: the database is read-only (" in caplog.text
            ready = ar.http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["storage"].startswith(
                "failing: the database is read-only ("
            )
        finally:
            event.remove(engine, "connect", _read_only)
            engine.dispose()


def test_an_evidence_folder_gone_fails_readiness(tmp_path: Path) -> None:
    """Removed while the node runs (a volume unmounted): every upload failed 503 and every
    evidence transfer for good while /readyz said ready (from review). Not ready, unlike
    evidence storage found full (degraded): one replica's folder is gone until it restarts,
    and another replica can take its evidence (from review)."""
    with serve_node(migrated_sqlite(tmp_path / "ar.db"), tmp_path / "ar") as ar:
        assert ar.http.get("/readyz").json()["status"] == "ready"
        root = blob_store(ar.node.settings).root
        shutil.rmtree(root)
        ready = ar.http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["failing"] == ["evidence_folder"]
        assert ready.json()["checks"]["evidence_folder"] == (
            f"failing: the evidence folder {root} lacks blobs and uploads (a volume not "
            "mounted, a folder removed?): evidence can be neither received nor sent; put it "
            "back, then restart the node"
        )

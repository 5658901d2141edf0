"""What the delivery worker meets in its own database: a row it cannot read, a full disk.

From review: one waiting outbox row holding TEXT that is not UTF-8 stopped every delivery (the
claim reads each row it weighs), the log said only "delivery round failed
(OperationalError)", /readyz said ready and `doctor` found nothing. And a full database met
by the worker alone (no API write) left /readyz `storage: ok` and never named SQLITE_FULL.
A peer's row that cannot be read stopped every delivery too, to every peer (the round reads
the rows of the peers it claimed for), and `doctor` did not look at the peers table.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, make_url, select, text

from app import doctor
from app.crypto.encoding import utc_now
from app.crypto.identity import build_identity_document, parse_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys
from app.db import unit_of_work
from app.delivery.worker import Worker
from app.models import OutboxItem
from app.peers.service import pin_peer
from tests.requests.conftest import Harness, example_document
from tests.requests.test_lost_moves import ACK, _delivery_id

DAMAGED = "CAST(X'C328FF' AS TEXT)"


def _sqlite_file(ar: Harness) -> str:
    url = ar.node.settings.database_url
    if not url.startswith("sqlite"):
        pytest.skip("PostgreSQL's text holds only valid UTF-8, and its disk is not ours to fill")
    database = make_url(url).database
    assert database is not None
    return database


def _outbound(ar: Harness) -> int:
    request_id = ar.receive_request()
    sent = ar.reply(request_id, ACK)
    assert sent.status_code == 201, sent.text
    return _delivery_id(ar, sent.json()["msg_id"])


@contextmanager
def _running(worker: Worker) -> Iterator[None]:
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stop()
        thread.join(timeout=30)
        worker.http.close()


def _wait(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


def _state(ar: Harness, row: int) -> tuple[str, int]:
    with closing(sqlite3.connect(_sqlite_file(ar))) as db:
        state, attempts = db.execute(
            "SELECT state, attempts FROM outbox WHERE id = ?", (row,)
        ).fetchone()
    return str(state), int(attempts)


def test_a_damaged_outbox_row_is_set_aside_and_the_others_go_on(
    fresh_ar: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    ar = fresh_ar
    path = _sqlite_file(ar)
    damaged, other = _outbound(ar), _outbound(ar)
    with closing(sqlite3.connect(path)) as db:
        original = db.execute("SELECT peer_authority FROM outbox WHERE id = ?", (damaged,))
        (authority,) = original.fetchone()
        db.execute(f"UPDATE outbox SET peer_authority = {DAMAGED} WHERE id = ?", (damaged,))  # noqa: S608
        db.commit()
    assert [finding.level for finding in doctor.check_damaged_deliveries(ar.node.engine)] == [
        "FAIL"
    ]
    with caplog.at_level(logging.ERROR, logger="app.delivery.worker"), _running(Worker(ar.node)):
        # The other row is tried (ES's address does not resolve: a retry, one attempt).
        assert _wait(lambda: _state(ar, other)[1] >= 1), _state(ar, other)
    assert _state(ar, damaged) == ("failed", 0)
    assert (
        f"delivery of outbox row {damaged} set aside as failed: a value stored in column "
        "'outbox.peer_authority' cannot be read (stored value damaged)"
    ) in caplog.text
    assert "\ufffd" not in caplog.text  # never the value
    assert "\\x" not in caplog.text
    entries = ar.audit("delivery.failed")
    assert entries[-1][1] == "stored_data_corrupt"
    # The operator's views of it say what is wrong, not a bare 500.
    for method, path_ in [
        ("GET", "/api/v1/admin/deliveries"),
        ("POST", f"/api/v1/admin/deliveries/{damaged}/retry"),
        ("POST", f"/api/v1/admin/deliveries/{damaged}/cancel"),
    ]:
        answer = ar.http.request(method, path_, headers=ar.as_("admin"))
        assert answer.status_code == 500, (path_, answer.text)
        assert answer.json()["error"] == "stored_data_corrupt", answer.text
    # Repaired, it is told as failed, why, and retried like any other.
    with closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE outbox SET peer_authority = ? WHERE id = ?", (authority, damaged))
        db.commit()
    assert doctor.check_damaged_deliveries(ar.node.engine) == []
    with unit_of_work(ar.node.sessions) as session:
        item = session.scalar(select(OutboxItem).where(OutboxItem.id == damaged))
        assert item is not None
        assert item.last_error is not None
        assert item.last_error.startswith("stored_data_corrupt: a value stored in column")
    retried = ar.http.post(
        f"/api/v1/admin/deliveries/{damaged}/retry", headers=ar.as_("admin"), json={}
    )
    assert retried.status_code == 200, retried.text


def test_a_full_database_met_by_the_worker_alone_fails_readiness(
    fresh_ar: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    ar = fresh_ar
    _sqlite_file(ar)
    rows = [_outbound(ar) for _ in range(30)]
    engine = ar.node.engine

    @event.listens_for(engine, "connect")
    def _no_room(dbapi_connection: Any, _record: Any) -> None:
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    engine.dispose()
    try:
        assert ar.http.get("/readyz").json()["checks"]["storage"] == "ok"
        with caplog.at_level(logging.ERROR, logger="app.delivery.worker"):
            with _running(Worker(ar.node)):
                assert _wait(lambda: "SQLITE_FULL" in caplog.text), caplog.text
                ready = ar.http.get("/readyz")
        assert "delivery round failed: database full (SQLITE_FULL)" in caplog.text
        assert ready.status_code == 503, ready.text
        storage = ready.json()["checks"]["storage"]
        assert storage.startswith("failing: the database was full at"), storage
        assert "(within the last minute)" in storage
        assert "until room is made" not in storage  # room may have been made since
    finally:
        event.remove(engine, "connect", _no_room)
        engine.dispose()
    assert rows


def _pin(ar: Harness, authority: str) -> None:
    document = build_identity_document(
        NodeIdentity(authority, "Ministère de la Justice", "http://fr.invalid"),
        NodeKeys.generate(),
        issued_at=utc_now(),
    )
    with unit_of_work(ar.node.sessions) as session:
        pin_peer(
            session,
            identity=parse_identity_document(document),
            url="http://fr.invalid",
            own_authority="AR/MPF",
            own_keys=ar.node.keys,
            clock_skew=timedelta(seconds=ar.node.settings.clock_skew_seconds),
        )


def _request_to(ar: Harness, authority: str) -> int:
    document = example_document(requesting_authority="AR/MPF", requested_authority=authority)
    sent = ar.post("/api/v1/requests", {"to": authority, "document": document})
    assert sent.status_code == 201, sent.text
    return _delivery_id(ar, sent.json()["msg_id"])


def _tried(ar: Harness, row: int) -> tuple[str, int]:
    with unit_of_work(ar.node.sessions) as session:
        state, attempts = session.execute(
            select(OutboxItem.state, OutboxItem.attempts).where(OutboxItem.id == row)
        ).one()
    return str(state), int(attempts)


# How each backend's peer row is damaged: SQLite stores what it is given (text that is not
# UTF-8, a time that is no time); PostgreSQL keeps a time its driver cannot give back.
DAMAGES = {
    ("sqlite", "text"): ("name", "CAST(X'C328FF' AS TEXT)"),
    ("sqlite", "time"): ("added_at", "'not a time'"),
    ("postgresql", "time"): ("added_at", "'infinity'"),
}


def _damage_peer(ar: Harness, damage: str) -> tuple[str, Callable[[], None]]:
    """Damage FR/MJ's row; returns the column and how to put the value back."""
    backend = ar.node.engine.dialect.name
    if (backend, damage) not in DAMAGES:
        pytest.skip("PostgreSQL's text holds only valid UTF-8")
    column, value = DAMAGES[backend, damage]
    where = "WHERE authority_id = 'FR/MJ'"
    with ar.node.engine.begin() as connection:
        (original,) = connection.execute(text(f"SELECT {column} FROM peers {where}")).one()  # noqa: S608
        connection.execute(text(f"UPDATE peers SET {column} = {value} {where}"))  # noqa: S608

    def repair() -> None:
        with ar.node.engine.begin() as connection:
            connection.execute(
                text(f"UPDATE peers SET {column} = :original {where}"),  # noqa: S608
                {"original": original},
            )

    return column, repair


@pytest.mark.parametrize("damage", ["text", "time"])
def test_a_peer_row_that_cannot_be_read_holds_only_its_own_deliveries(
    fresh_ar: Harness, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    ar = fresh_ar
    _pin(ar, "FR/MJ")
    to_fr, to_es = _request_to(ar, "FR/MJ"), _outbound(ar)
    column, repair = _damage_peer(ar, damage)
    # Held rows are read again once a heartbeat period: a short one, for the repair below.
    ar.node.settings = ar.node.settings.model_copy(update={"worker_heartbeat_seconds": 1.0})
    with caplog.at_level(logging.INFO), _running(Worker(ar.node)):
        # ES/MJ's deliveries go on (its address does not resolve: a retry, one attempt), a
        # later one too, while FR/MJ's waits untried.
        assert _wait(lambda: _tried(ar, to_es)[1] >= 1), _tried(ar, to_es)
        later = _outbound(ar)
        assert _wait(lambda: _tried(ar, later)[1] >= 1), _tried(ar, later)
        assert _tried(ar, to_fr) == ("queued", 0)
        # Repaired, its deliveries go too (within a heartbeat period).
        repair()
        assert _wait(lambda: _tried(ar, to_fr)[1] >= 1, seconds=30), _tried(ar, to_fr)
    assert (
        f"deliveries to FR/MJ held: a value stored in column 'peers.{column}' of its row "
        "cannot be read (stored value damaged)"
    ) in caplog.text
    assert "deliveries to FR/MJ resume: its row reads again" in caplog.text
    for shown in ("\ufffd", "\\x", "not a time", "infinity"):  # never the value
        assert shown not in caplog.text
    assert ar.audit("peer.unreadable") == [("node", "stored_data_corrupt", None)]


@pytest.mark.parametrize("damage", ["text", "time"])
def test_doctor_names_a_peer_row_that_cannot_be_read(fresh_ar: Harness, damage: str) -> None:
    ar = fresh_ar
    _pin(ar, "FR/MJ")
    column, repair = _damage_peer(ar, damage)
    findings = doctor.check_damaged_peers(ar.node.engine)
    assert [(finding.level, finding.area) for finding in findings] == [("FAIL", "peer FR/MJ")]
    assert f"column peers.{column} of its row" in findings[0].message
    # The other peers are still checked (both unreachable here), the damaged one not again.
    with httpx.Client(timeout=5) as http:
        checked = doctor.check_peers(ar.node.settings, ar.node.engine, http)
        assert {finding.area for finding in checked} == {"peer ES/MJ"}
    repair()
    assert doctor.check_damaged_peers(ar.node.engine) == []


# A time each backend keeps but cannot give back: SQLite stores any text; PostgreSQL keeps
# 'infinity', which its driver cannot load into a Python datetime.
NO_TIME = {"sqlite": "'not a time'", "postgresql": "'infinity'"}


@pytest.mark.parametrize("table", ["outbox", "messages"])
def test_a_delivery_whose_time_cannot_be_read_is_set_aside_on_either_backend(
    fresh_ar: Harness, caplog: pytest.LogCaptureFixture, table: str
) -> None:
    """From review: the set-aside knew only SQLite's text that is not UTF-8; an outbox (or
    message) row holding a time the driver cannot give back (PostgreSQL 'infinity', SQLite a
    time that is no time) still failed every delivery round, every other delivery with it."""
    ar = fresh_ar
    damaged, other = _outbound(ar), _outbound(ar)
    where = (
        "WHERE id = :damaged"
        if table == "outbox"
        else "WHERE id = (SELECT message_id FROM outbox WHERE id = :damaged)"
    )
    value = NO_TIME[ar.node.engine.dialect.name]
    with ar.node.engine.begin() as connection:
        (original,) = connection.execute(
            text(f"SELECT created_at FROM {table} {where}"),  # noqa: S608
            {"damaged": damaged},
        ).one()
        connection.execute(
            text(f"UPDATE {table} SET created_at = {value} {where}"),  # noqa: S608
            {"damaged": damaged},
        )
    with caplog.at_level(logging.ERROR, logger="app.delivery.worker"), _running(Worker(ar.node)):
        # The other row is tried (ES's address does not resolve: a retry, one attempt).
        assert _wait(lambda: _tried(ar, other)[1] >= 1), caplog.text
    with ar.node.engine.connect() as connection:
        state, attempts = connection.execute(
            text("SELECT state, attempts FROM outbox WHERE id = :id"), {"id": damaged}
        ).one()
    assert (state, attempts) == ("failed", 0)
    assert (
        f"delivery of outbox row {damaged} set aside as failed: a value stored in column "
        f"'{table}.created_at' cannot be read (stored value damaged)"
    ) in caplog.text
    for shown in ("not a time", "infinity"):  # never the value
        assert shown not in caplog.text
    assert ar.audit("delivery.failed")[-1][1] == "stored_data_corrupt"
    # Repaired, it is retried like any other.
    with ar.node.engine.begin() as connection:
        connection.execute(
            text(f"UPDATE {table} SET created_at = :original {where}"),  # noqa: S608
            {"original": original, "damaged": damaged},
        )
    retried = ar.http.post(
        f"/api/v1/admin/deliveries/{damaged}/retry", headers=ar.as_("admin"), json={}
    )
    assert retried.status_code == 200, retried.text

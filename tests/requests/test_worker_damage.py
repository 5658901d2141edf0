"""What the delivery worker meets in its own database: a row it cannot read, a full disk.

From review: one waiting outbox row holding TEXT that is not UTF-8 stopped every delivery (the
claim reads each row it weighs), the log said only "delivery round failed
(OperationalError)", /readyz said ready and `doctor` found nothing. And a full database met
by the worker alone (no API write) left /readyz `storage: ok` and never named SQLITE_FULL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import pytest
from sqlalchemy import event, make_url, select

from app.db import unit_of_work
from app.delivery.worker import Worker
from app.doctor import check_damaged_deliveries
from app.models import OutboxItem
from tests.requests.conftest import Harness
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
    assert [finding.level for finding in check_damaged_deliveries(ar.node.engine)] == ["FAIL"]
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
    assert check_damaged_deliveries(ar.node.engine) == []
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

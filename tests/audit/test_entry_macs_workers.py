"""Entries appended by `entraide worker` processes carry their MACs (app/audit/mac.py), and a
log upkeep that fails (a MAC rewritten as text, the query index's table gone) does not stop
the worker's deliveries. Two real nodes each, the worker a process of its own. (The checks
themselves, against a database writer without the keys: test_entry_macs.py.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

from app.audit.checkpoints import latest_signed
from app.crypto.keys import load_keys
from app.db import make_engine, make_session_factory
from app.models import AuditEntry
from tests.audit.test_entry_macs import _last_idx, _set_text_mac, _verifier
from tests.conftest import Databases, migrated_sqlite
from tests.faults.harness import new_pair, wait_until


@pytest.mark.e2e
def test_entries_of_an_entraide_worker_process_carry_their_macs(
    databases: Databases, tmp_path: Path
) -> None:
    """The delivery worker, as its own `entraide worker` process, appends the attempts and
    receipts of what it delivers: each with its MAC under the node's key, and the same
    worker signs them (its own check passes)."""
    from app.audit.mac import mac_key, mac_matches

    pair = new_pair(
        tmp_path,
        databases.new("es", migrated=True),
        databases.new("ar", migrated=True),
        sender_env={"ENTRAIDE_RUN_WORKER": "false", "ENTRAIDE_AUDIT_CHECKPOINT_EVERY": "1"},
    )
    try:
        pair.start()
        pair.submit(2)
        worker = pair.start_worker("macs", ENTRAIDE_AUDIT_CHECKPOINT_EVERY="1")
        pair.wait_delivered(2, timeout=60)
        engine = make_engine(pair.sender.database_url)
        key = mac_key(load_keys(pair.sender.keys_dir).log)
        try:

            def attempts() -> list[int]:
                with engine.connect() as connection:
                    return list(
                        connection.scalars(
                            select(AuditEntry.idx).where(AuditEntry.action == "delivery.attempt")
                        )
                    )

            def signed_over(idx: int) -> bool:
                with make_session_factory(engine)() as session:
                    latest = latest_signed(session, _verifier(load_keys(pair.sender.keys_dir)))
                return latest is not None and latest.size > idx and latest.macs_after

            wait_until("the worker recorded its attempts", lambda: len(attempts()) == 2)
            wait_until("the worker signed over them", lambda: signed_over(max(attempts())))
            with engine.connect() as connection:
                rows = connection.execute(
                    select(AuditEntry.idx, AuditEntry.entry, AuditEntry.mac).order_by(
                        AuditEntry.idx
                    )
                ).all()
        finally:
            engine.dispose()
        assert [idx for idx, entry, mac in rows if not mac_matches(key, entry, mac)] == []
        worker.stop()
        pair.submit(1)  # entries no checkpoint covers yet (no worker), for `verify --db`
        verified = pair.sender.cli("audit", "verify", "--db")
        assert verified.stdout.startswith("OK: ")
        assert "are not signed yet (each carries its MAC)" in verified.stdout
    finally:
        pair.close()


@pytest.mark.e2e
@pytest.mark.parametrize("tamper", ["mac as text", "query index gone"])
def test_a_failing_log_upkeep_does_not_stop_deliveries(tmp_path: Path, tamper: str) -> None:
    """From review: the worker's log upkeep runs in the round's transaction, before the claim;
    a MAC rewritten as TEXT made it raise TypeError every round, and nothing was delivered
    while /readyz said ready. That rewrite is refused with the alarm; and whatever else makes
    the upkeep fail (here the query index's table dropped) is logged once, the transaction
    left usable for the claim: deliveries go on. (A checkpoint row's date or note made
    unreadable no longer fails it: tests/audit/test_checkpoint_dates.py,
    tests/audit/test_checkpoint_notes.py.)"""
    database = tmp_path / "es.db"
    pair = new_pair(
        tmp_path,
        migrated_sqlite(database),
        migrated_sqlite(tmp_path / "ar.db"),
        sender_env={"ENTRAIDE_RUN_WORKER": "false", "ENTRAIDE_AUDIT_CHECKPOINT_EVERY": "1"},
    )
    try:
        pair.start()
        pair.submit(1)
        engine = make_engine(pair.sender.database_url)
        try:
            forged = _last_idx(engine)
        finally:
            engine.dispose()
        if tamper == "mac as text":
            _set_text_mac(database, forged)
            expected = ('"critical"', f"entry {forged} does not carry its MAC")
        else:
            with sqlite3.connect(database) as connection:
                connection.execute("DROP TABLE audit_index")
            expected = ('"error"', "the audit log's upkeep failed (OperationalError)")
        worker = pair.start_worker("tampered", ENTRAIDE_AUDIT_CHECKPOINT_EVERY="1")
        pair.wait_delivered(1, timeout=60)
        pair.submit(1)  # and the next one too, the problem still standing
        pair.wait_delivered(2, timeout=60)
        worker.stop()
        logged = worker.log_path.read_text()
        assert "delivery round failed" not in logged
        level, message = expected
        alarms = [line for line in logged.splitlines() if level in line and message in line]
        assert len(alarms) == 1  # once, not at every round
    finally:
        pair.close()

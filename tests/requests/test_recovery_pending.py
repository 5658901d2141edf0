"""Which peers `entraide doctor` says a restored node has not yet recovered from
(app/recovery/pending.py), read from entries written to a real node's audit log."""

from __future__ import annotations

from typing import Any

from app.audit.log import record
from app.crypto.encoding import format_time, utc_now
from app.db import unit_of_work
from app.recovery.pending import Pending, last_restore, not_recovered
from tests.requests.conftest import Harness

BACKUP = "2026-11-30T02:00:00Z"


def _write(harness: Harness, action: str, outcome: str = "ok", **details: Any) -> None:
    with unit_of_work(harness.node.sessions) as session:
        peer = details.pop("peer", None)
        record(
            session,
            actor="operator:test",
            action=action,
            outcome=outcome,
            peer=peer,
            details=details,
        )


def _pending(harness: Harness) -> list[Pending]:
    with unit_of_work(harness.node.sessions) as session:
        return not_recovered(session)


def test_a_restored_node_is_told_of_each_peer_until_its_listing_was_read_from_the_backup(
    fresh_ar: Harness,
) -> None:
    assert _pending(fresh_ar) == []  # never restored: nothing to say
    with unit_of_work(fresh_ar.node.sessions) as session:
        assert last_restore(session) is None
    _write(fresh_ar, "node.restored", backup_created_at=BACKUP)
    with unit_of_work(fresh_ar.node.sessions) as session:
        restore = last_restore(session)
    assert restore is not None
    assert format_time(restore.backup_created_at or utc_now()) == BACKUP
    assert _pending(fresh_ar) == [Pending("ES/MJ", None)]
    # Asked from after the backup: what came between is still missing.
    _write(fresh_ar, "peer.recovered", peer="ES/MJ", since="2026-11-30T03:00:00Z")
    assert _pending(fresh_ar) == [Pending("ES/MJ", "ok")]
    # Interrupted: not read to its end.
    _write(fresh_ar, "peer.recovered", "interrupted", peer="ES/MJ", since="2026-11-30T01:00:00Z")
    assert _pending(fresh_ar) == [Pending("ES/MJ", "interrupted")]
    # Read to its end from before the backup, even in part: done (what it could not take
    # back was named, and is on record).
    _write(fresh_ar, "peer.recovered", "partial", peer="ES/MJ", since="2026-11-30T01:00:00Z")
    assert _pending(fresh_ar) == []
    # A later restore asks again.
    _write(fresh_ar, "node.restored", backup_created_at=BACKUP)
    assert _pending(fresh_ar) == [Pending("ES/MJ", None)]
    # A suspended peer is not asked (nothing is taken from it).
    response = fresh_ar.post(
        "/api/v1/admin/peers/suspend",
        {"authority_id": "ES/MJ", "reason": "test"},
        client="admin",
    )
    assert response.status_code in (200, 204), response.text
    assert _pending(fresh_ar) == []

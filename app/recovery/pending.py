"""After a restore: when the backup was taken, and which peers the node has not yet taken back
its exchange since then from (`entraide peers recover`'s default, and `entraide doctor`).

Read from the audit log: the latest `node.restored`, then each pinned peer's `peer.recovered`
after it. Through the auditor's index (by action), and the tail it has not indexed yet (a
node restored moments ago has its entry there; one stopped for its recovery indexes nothing,
while each message taken back adds entries): the tail is read once, and only past the
restore, so that nothing scans a large log for an action that never happened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.index import indexed_size
from app.crypto.encoding import DecodeError, parse_time
from app.models import AuditEntry, AuditIndex, Peer

RESTORED = "node.restored"
RECOVERED = "peer.recovered"
# Outcomes of a `peer.recovered` whose listing was read to its end: `partial` named what it
# could not take back (to settle with the peer's operator; running it again changes nothing).
LISTED = ("ok", "partial")


@dataclass(frozen=True)
class Restore:
    idx: int
    backup_created_at: datetime | None  # None: the entry names no readable time


@dataclass(frozen=True)
class Pending:
    peer: str
    outcome: str | None  # None: never asked since the restore; else the latest run's outcome


def _details(session: Session, idx: int) -> dict[str, object]:
    raw = session.scalar(select(AuditEntry.entry).where(AuditEntry.idx == idx))
    data = raw.encode() if isinstance(raw, str) else bytes(raw or b"{}")  # SQLite: either
    try:
        details = json.loads(data).get("details")
    except (ValueError, AttributeError):  # a damaged entry: audit verify says so
        return {}
    return details if isinstance(details, dict) else {}


def _time(value: object) -> datetime | None:
    try:
        return parse_time(value)
    except DecodeError:
        return None


def last_restore(session: Session) -> Restore | None:
    """The latest `node.restored` entry, or None if the node was never restored."""
    indexed = indexed_size(session)
    found = [
        session.scalar(
            select(func.max(AuditEntry.idx)).where(
                AuditEntry.idx >= indexed, AuditEntry.action == RESTORED
            )
        ),
        session.scalar(select(func.max(AuditIndex.idx)).where(AuditIndex.action == RESTORED)),
    ]
    latest = max((idx for idx in found if idx is not None), default=None)
    if latest is None:
        return None
    return Restore(latest, _time(_details(session, latest).get("backup_created_at")))


def not_recovered(session: Session) -> list[Pending]:
    """The pinned peers (not suspended: nothing is taken from those) with no recovery since
    the latest restore whose listing was read to its end from at most the backup's time;
    none if the node was never restored."""
    restore = last_restore(session)
    if restore is None:
        return []
    indexed = indexed_size(session)
    runs: dict[str, list[int]] = {}
    tail = select(AuditEntry.idx, AuditEntry.peer).where(
        AuditEntry.idx > restore.idx, AuditEntry.idx >= indexed, AuditEntry.action == RECOVERED
    )
    index = select(AuditIndex.idx, AuditIndex.peer).where(
        AuditIndex.idx > restore.idx, AuditIndex.action == RECOVERED
    )
    for idx, peer in [*session.execute(index), *session.execute(tail)]:
        runs.setdefault(str(peer), []).append(int(idx))
    pending = []
    peers = session.scalars(
        select(Peer.authority_id).where(Peer.suspended_at.is_(None)).order_by(Peer.authority_id)
    )
    for peer in peers:
        last_outcome = None
        for idx in sorted(runs.get(peer, []), reverse=True):
            outcome = session.scalar(select(AuditEntry.outcome).where(AuditEntry.idx == idx))
            last_outcome = last_outcome or outcome
            since = _time(_details(session, idx).get("since"))
            covers = restore.backup_created_at is None or (
                since is not None and since <= restore.backup_created_at
            )
            if outcome in LISTED and covers:
                break
        else:
            pending.append(Pending(peer, last_outcome))
    return pending

"""Which peers a restored node has not yet taken back its exchange from (`entraide doctor`).

Read from the audit log: the latest `node.restored`, then each pinned peer's `peer.recovered`
after it. Through the auditor's index (by action), and the tail it has not indexed yet: a
node restored moments ago has its entry there, and a scan of a whole log for an action that
never happened would take seconds on a large one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.index import indexed_size
from app.models import AuditEntry, AuditIndex, Peer

RESTORED = "node.restored"
RECOVERED = "peer.recovered"


@dataclass(frozen=True)
class Pending:
    peer: str
    outcome: str | None  # None: never asked since the restore; else the latest run's outcome


def _latest(session: Session, action: str, indexed: int, peer: str | None = None) -> int | None:
    """The index of the latest entry of `action` (of `peer`), or None."""
    in_index = select(func.max(AuditIndex.idx)).where(AuditIndex.action == action)
    in_tail = select(func.max(AuditEntry.idx)).where(
        AuditEntry.idx >= indexed, AuditEntry.action == action
    )
    if peer is not None:
        in_index = in_index.where(AuditIndex.peer == peer)
        in_tail = in_tail.where(AuditEntry.peer == peer)
    found = [
        value for value in (session.scalar(in_tail), session.scalar(in_index)) if value is not None
    ]
    return max(found) if found else None


def not_recovered(session: Session) -> list[Pending]:
    """The pinned peers (not suspended) with no complete recovery since the latest restore;
    none if the node was never restored."""
    indexed = indexed_size(session)
    restored = _latest(session, RESTORED, indexed)
    if restored is None:
        return []
    pending = []
    peers = session.scalars(
        select(Peer.authority_id).where(Peer.suspended_at.is_(None)).order_by(Peer.authority_id)
    )
    for peer in peers:
        last = _latest(session, RECOVERED, indexed, peer)
        if last is None or last < restored:
            pending.append(Pending(peer, None))
            continue
        outcome = session.scalar(select(AuditEntry.outcome).where(AuditEntry.idx == last))
        if outcome != "ok":
            pending.append(Pending(peer, outcome))
    return pending

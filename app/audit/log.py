"""Appending audit entries, in the caller's transaction.

An entry is appended by the same unit of work as the action it records, so an action and its
entry commit together or not at all. Entries hold ids, hashes, codes and outcomes, never
request content, tokens or keys.

Each entry is one leaf of the node's RFC 9162 Merkle tree. Appending locks the single head
row (contiguous indexes), extends the stored compact range, and stores the hashes of the
perfect subtrees the new leaf completes (for proofs). Each entry also records the previous
leaf's hash: redundant with the tree, but it lets a verifier name exactly which entry was
altered instead of only which checkpoint stopped matching.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.merkle import CompactRange, leaf_hash
from app.crypto.encoding import canonical_json, format_time, utc_now
from app.db import unit_of_work
from app.models import AuditEntry, AuditHead, AuditNode

HEAD_ID = 1
MAX_DETAIL_CHARS = 500
ENTRY_VERSION = 1
_HELD_HEAD = "entraide_audit_head"  # session.info: (transaction, the head row it locked)


def _bounded(details: dict[str, Any]) -> dict[str, Any]:
    # Error texts can be long or hostile; entries stay small and single-purpose.
    return {
        key: (value[:MAX_DETAIL_CHARS] if isinstance(value, str) else value)
        for key, value in details.items()
    }


def lock_head(session: Session) -> AuditHead:
    """The head row, locked until the transaction ends.

    Locked once per transaction: an action's later entries (a request writes two, a delivery
    three) reuse the row this transaction already holds, and its in-memory state. Keyed by
    the innermost transaction, so a savepoint rolled back (and the lock it took with it, on
    PostgreSQL) means locking again.
    """
    held = session.info.get(_HELD_HEAD)
    current = session.get_nested_transaction() or session.get_transaction()
    if held is not None and current is not None and held[0] is current:
        head: AuditHead = held[1]
        return head
    locked = session.scalar(select(AuditHead).where(AuditHead.id == HEAD_ID).with_for_update())
    if locked is None:
        raise RuntimeError("the audit log head row is missing; run the migrations")
    session.info[_HELD_HEAD] = (
        session.get_nested_transaction() or session.get_transaction(),
        locked,
    )
    return locked


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    outcome: str = "ok",
    request_id: str | None = None,
    msg_id: str | None = None,
    peer: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    head = lock_head(session)
    now = utc_now()
    fields: dict[str, Any] = {
        "v": ENTRY_VERSION,
        "idx": head.size,
        "time": format_time(now),
        "actor": actor,
        "action": action,
        "outcome": outcome,
        "request_id": request_id,
        "msg_id": msg_id,
        "peer": peer,
        "details": _bounded(details or {}),
        "prev_leaf": head.last_leaf_hash.hex() if head.last_leaf_hash else None,
    }
    entry_bytes = canonical_json(fields)
    leaf = leaf_hash(entry_bytes)
    compact = CompactRange.from_bytes(head.compact_range)
    nodes: list[AuditNode] = []

    def keep(level: int, position: int, digest: bytes) -> None:
        nodes.append(AuditNode(level=level, position=position, hash=digest))

    compact.append(leaf, visit=keep)
    entry = AuditEntry(
        idx=head.size,
        recorded_at=now,
        actor=actor,
        action=action,
        outcome=outcome,
        request_id=request_id,
        msg_id=msg_id,
        peer=peer,
        entry=entry_bytes,
        leaf_hash=leaf,
    )
    session.add(entry)
    session.add_all(nodes)
    head.size = compact.size
    head.compact_range = compact.to_bytes()
    head.root_hash = compact.root()
    head.last_leaf_hash = leaf
    head.updated_at = now
    # No flush here: the rows go out with the action's own at commit (or at the next query,
    # by autoflush), in one batch per table instead of one round trip per entry.
    return entry


def record_alone(sessions: sessionmaker[Session], **fields: Any) -> None:
    """Record in a transaction of its own: for refusals, whose own transaction rolls back."""
    with unit_of_work(sessions) as session:
        record(session, **fields)

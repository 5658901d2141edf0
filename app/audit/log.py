"""Appending audit entries, in the caller's transaction.

An entry is appended by the same unit of work as the action it records, so an action and its
entry commit together or not at all. Entries hold ids, hashes, codes and outcomes, never
request content, tokens or keys.
"""

from __future__ import annotations

import json
from typing import Any

from nacl.signing import SigningKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.merkle import CompactRange, leaf_hash
from app.audit.note import Checkpoint, sign_note
from app.crypto.encoding import canonical_json, format_time, utc_now
from app.db import unit_of_work
from app.models import AuditEntry, AuditHead

HEAD_ID = 1
MAX_DETAIL_CHARS = 500


def _bounded(details: dict[str, Any]) -> dict[str, Any]:
    # Error texts can be long or hostile; entries stay small and single-purpose.
    return {
        key: (value[:MAX_DETAIL_CHARS] if isinstance(value, str) else value)
        for key, value in details.items()
    }


def _lock_head(session: Session) -> AuditHead:
    head = session.scalar(select(AuditHead).where(AuditHead.id == HEAD_ID).with_for_update())
    if head is None:
        raise RuntimeError("the audit log head row is missing; run the migrations")
    return head


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
    head = _lock_head(session)
    now = utc_now()
    fields: dict[str, Any] = {
        "v": 1,
        "idx": head.size,
        "time": format_time(now),
        "actor": actor,
        "action": action,
        "outcome": outcome,
        "request_id": request_id,
        "msg_id": msg_id,
        "peer": peer,
        "details": _bounded(details or {}),
    }
    entry_bytes = canonical_json(fields)
    leaf = leaf_hash(entry_bytes)
    compact = CompactRange.from_bytes(head.compact_range)
    compact.append(leaf)
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
    head.size = compact.size
    head.compact_range = compact.to_bytes()
    head.root_hash = compact.root()
    head.updated_at = now
    session.flush()
    return entry


def record_alone(sessions: sessionmaker[Session], **fields: Any) -> None:
    """Record in a transaction of its own: for refusals, whose own transaction rolls back."""
    with unit_of_work(sessions) as session:
        record(session, **fields)


def log_origin(authority_id: str) -> str:
    return f"entraide/{authority_id}/audit"


def signed_checkpoint(session: Session, *, authority_id: str, log_key: SigningKey) -> str:
    """A checkpoint of the log as this transaction sees it, signed with the log key."""
    head = session.get(AuditHead, HEAD_ID)
    if head is None:
        raise RuntimeError("the audit log head row is missing; run the migrations")
    checkpoint = Checkpoint(
        origin=log_origin(authority_id), size=head.size, root_hash=head.root_hash
    )
    return sign_note(checkpoint.format(), log_origin(authority_id), log_key)


def entry_details(entry: AuditEntry) -> dict[str, Any]:
    details: dict[str, Any] = json.loads(entry.entry)["details"]
    return details

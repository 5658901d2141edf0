"""`key.rotated` entries: one per rotation of the node's keys, whoever made it take effect.

`entraide keys rotate` records its rotation (actor: the operator). A rotation can also take
effect without that entry: one stopped half way (the CLI killed after the chain was written)
and finished by the running node's reload or by the next command that loads the keys, or one
whose CLI could not reach the database afterwards. The node then records it (actor `node`),
so the auditor sees every change of the keys the node signs with (from review).

One entry per rotation, keyed by its `seq` (its place in the chain): the check and the
append run in one transaction holding the log's head, under the keys folder's lock, which
`keys rotate` holds from its rotation to its own entry. So whichever comes second (the CLI,
`serve`, a worker) finds the first one's entry and writes none.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.audit.index import indexed_size
from app.audit.log import lock_head, record
from app.crypto.keys import NodeKeys
from app.crypto.rotation import Rotation
from app.models import AuditEntry, AuditIndex

ROTATED = "key.rotated"


def rotation_details(rotation: Rotation) -> dict[str, Any]:
    """Public key ids and dates only, as the CLI has always recorded them."""
    return {
        "old_signing_kid": rotation.old.signing_kid,
        "new_signing_kid": rotation.new.signing_kid,
        "old_encryption_kid": rotation.old.encryption_kid,
        "new_encryption_kid": rotation.new.encryption_kid,
        "seq": rotation.seq,
        "old_encryption_accepted_until": rotation.old_encryption_accepted_until.isoformat(),
    }


def recorded_rotations(session: Session) -> set[int]:
    """The `seq` of every rotation the log has an entry for: through the auditor's index for
    the indexed entries, and from the log itself for the few behind it (app/audit/index.py)."""
    indexed = indexed_size(session)
    listed = select(AuditIndex.idx).where(AuditIndex.action == ROTATED)
    entries = session.scalars(
        select(AuditEntry.entry).where(
            or_(
                AuditEntry.idx.in_(listed),
                and_(AuditEntry.idx >= indexed, AuditEntry.action == ROTATED),
            )
        )
    )
    seqs: set[int] = set()
    for entry in entries:
        details = orjson.loads(entry).get("details")
        seq = details.get("seq") if isinstance(details, dict) else None
        if isinstance(seq, int):
            seqs.add(seq)
    return seqs


def record_rotations(session: Session, keys: NodeKeys, *, after_seq: int, actor: str) -> list[int]:
    """Record each rotation of `keys`' chain past `after_seq` that has no entry yet; returns
    the seqs recorded. The caller holds the keys folder's lock (see above)."""
    lock_head(session)  # no other append between the check and ours
    have = recorded_rotations(session)
    written: list[int] = []
    for rotation in keys.rotations[after_seq:]:
        if rotation.seq in have:
            continue
        record(session, actor=actor, action=ROTATED, details=rotation_details(rotation))
        written.append(rotation.seq)
    return written

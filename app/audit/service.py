"""Reading the audit log: filtered queries, proofs, export and verification of the live log."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.audit.checkpoints import log_origin, log_verifier, log_verifier_key, sign_checkpoint
from app.audit.log import HEAD_ID
from app.audit.merkle import (
    RangeHasher,
    consistency_proof,
    inclusion_proof,
    range_hasher_from_nodes,
)
from app.audit.note import parse_verifier_key
from app.audit.verify import LogVerifier, Problem, Report
from app.errors import BadRequest, NotFound
from app.models import AuditCheckpoint, AuditEntry, AuditHead, AuditNode
from app.node import Node

EXPORT_ENTRIES = "entries.jsonl"
EXPORT_CHECKPOINTS = "checkpoints.jsonl"
EXPORT_KEY = "log.vkey"
EXPORT_INFO = "log.json"


@dataclass(frozen=True)
class EntryFilter:
    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    request_id: str | None = None
    peer: str | None = None
    outcome: str | None = None


def query_entries(
    session: Session, *, where: EntryFilter, before: int | None, limit: int
) -> tuple[list[AuditEntry], int | None]:
    """Newest first; `before` is the cursor (an index), so pages never overlap or shift.

    Each filter column has an index on (column, idx), read backwards from the cursor. A time
    range becomes a range of indexes first: entries are appended in time order (the verifier
    checks that times never go backwards), so the first entry at or after a moment bounds the
    indexes exactly as the moment bounds the times.
    """
    bounds: list[ColumnElement[bool]] = []
    if where.since is not None:
        first = _first_index_at(session, where.since)
        if first is None:
            return [], None
        bounds.append(AuditEntry.idx >= first)
    if where.until is not None:
        end = _first_index_at(session, where.until)
        if end is not None:
            bounds.append(AuditEntry.idx < end)
    if before is not None:
        bounds.append(AuditEntry.idx < before)
    equal = [
        (column, value)
        for column, value in (
            (AuditEntry.actor, where.actor),
            (AuditEntry.action, where.action),
            (AuditEntry.request_id, where.request_id),
            (AuditEntry.peer, where.peer),
            (AuditEntry.outcome, where.outcome),
        )
        if value is not None
    ]
    conditions = [column == value for column, value in equal]
    if len(equal) > 1 and session.get_bind().dialect.name == "sqlite":
        rarest = _rarest_filter(session, equal, bounds, depth=limit)
        # `column || ''` matches exactly what `column` does, but no index can serve it: this
        # leaves SQLite one index to read, the rarest filter's.
        conditions = [
            column == value if column is rarest else column.concat("") == value
            for column, value in equal
        ]
    statement = select(AuditEntry).where(*bounds, *conditions)
    rows = list(session.scalars(statement.order_by(AuditEntry.idx.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].idx if more and rows else None)


def _first_index_at(session: Session, moment: datetime) -> int | None:
    """The index of the first entry recorded at or after `moment`, if any."""
    return session.scalar(
        select(AuditEntry.idx)
        .where(AuditEntry.recorded_at >= moment)
        .order_by(AuditEntry.recorded_at, AuditEntry.idx)
        .limit(1)
    )


def _rarest_filter(
    session: Session,
    equal: list[tuple[InstrumentedAttribute[Any], str]],
    bounds: list[ColumnElement[bool]],
    *,
    depth: int,
) -> InstrumentedAttribute[Any]:
    """The filter whose index to read, on SQLite, when several filters apply.

    PostgreSQL's statistics tell it which filter is rare; SQLite has none (nothing runs
    ANALYZE), and walking a common value's index to find a rare one's matches reads most of
    the log. So ask each filter's index where its `depth`-th newest match lies: the filter
    whose matches reach back furthest (or run out) is the rarest here. Each probe reads at
    most `depth` entries of one index and never the table.
    """
    rarest, reach = equal[0][0], -1
    for column, value in equal:
        probe = (
            select(AuditEntry.idx)
            .where(*bounds, column == value)
            .order_by(AuditEntry.idx.desc())
            .offset(depth)
            .limit(1)
        )
        found = session.scalar(probe)
        if found is None:
            return column
        if reach < 0 or found < reach:
            rarest, reach = column, found
    return rarest


def entry_view(entry: AuditEntry) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(entry.entry)
    return {**fields, "leaf_hash": entry.leaf_hash.hex()}


def _head(session: Session) -> AuditHead:
    head = session.get(AuditHead, HEAD_ID)
    if head is None:
        raise RuntimeError("the audit log head row is missing; run the migrations")
    return head


def _node_reader(session: Session) -> RangeHasher:
    def read(level: int, position: int) -> bytes:
        node = session.get(AuditNode, (level, position))
        if node is None:
            raise NotFound(f"the log has no subtree {level}/{position}", code="proof_unavailable")
        return node.hash

    return range_hasher_from_nodes(read)


def prove_inclusion(session: Session, *, index: int, size: int | None) -> dict[str, Any]:
    head = _head(session)
    tree_size = head.size if size is None else size
    if not 0 <= index < tree_size <= head.size:
        raise BadRequest(
            f"need 0 <= index < size <= {head.size} (the log's size)", code="invalid_proof_range"
        )
    entry = session.get(AuditEntry, index)
    if entry is None:
        raise NotFound(f"entry {index} is missing", code="unknown_entry")
    proof = inclusion_proof(index, tree_size, _node_reader(session))
    return {
        "index": index,
        "tree_size": tree_size,
        "leaf_hash": entry.leaf_hash.hex(),
        "proof": [digest.hex() for digest in proof],
    }


def prove_consistency(session: Session, *, first: int, second: int | None) -> dict[str, Any]:
    head = _head(session)
    new_size = head.size if second is None else second
    if not 0 <= first <= new_size <= head.size:
        raise BadRequest(
            f"need 0 <= first <= second <= {head.size} (the log's size)",
            code="invalid_proof_range",
        )
    proof = consistency_proof(first, new_size, _node_reader(session))
    return {"first": first, "second": new_size, "proof": [digest.hex() for digest in proof]}


def _checkpoint_notes(session: Session) -> list[str]:
    return list(session.scalars(select(AuditCheckpoint.note).order_by(AuditCheckpoint.id)))


def verify_database(
    session: Session, *, authority_id: str, log_public: bytes, earlier: str | None = None
) -> Report:
    """`audit verify --db`: the live log against its own signed checkpoints."""
    verifier = LogVerifier(
        log_verifier(authority_id, log_public),
        log_origin(authority_id),
        _checkpoint_notes(session),
        earlier,
    )
    statement = select(AuditEntry.idx, AuditEntry.entry).order_by(AuditEntry.idx)
    for idx, data in session.execute(statement.execution_options(yield_per=5000)):
        verifier.feed(data, stored_idx=idx)
    report = verifier.finish()
    head = _head(session)
    if head.size != report.entries:
        report.problems.append(
            Problem(
                min(head.size, report.entries),
                f"the log head says {head.size} entries but {report.entries} are stored",
            )
        )
    elif head.root_hash != report.root:
        report.problems.append(
            Problem(report.entries - 1, "the log head's root differs from the entries' root")
        )
    return report


def export_log(session: Session, node: Node, out: Path) -> tuple[int, int]:
    """Write entries, checkpoints and the public log key: all an auditor needs, offline."""
    sign_checkpoint(session, authority_id=node.authority_id, log_key=node.keys.log)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with (out / EXPORT_ENTRIES).open("wb") as handle:
        statement = select(AuditEntry.entry).order_by(AuditEntry.idx)
        for (data,) in session.execute(statement.execution_options(yield_per=5000)):
            handle.write(data + b"\n")
            count += 1
    notes = _checkpoint_notes(session)
    with (out / EXPORT_CHECKPOINTS).open("w") as handle:
        for note in notes:
            handle.write(json.dumps({"note": note}) + "\n")
    (out / EXPORT_KEY).write_text(log_verifier_key(node.authority_id, node.keys.log) + "\n")
    info = {"authority_id": node.authority_id, "origin": log_origin(node.authority_id)}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return count, len(notes)


def verify_export(
    folder: Path, *, earlier: str | None = None, log_key: str | None = None
) -> Report:
    """`audit verify DIR`: needs nothing but the folder (and optionally a saved checkpoint).

    The export carries the log's verifier key for convenience; an auditor who has the key
    from elsewhere (the node's identity document, an earlier audit) passes it as `log_key`.
    """
    verifier_key = parse_verifier_key(log_key or (folder / EXPORT_KEY).read_text().strip())
    notes = [
        json.loads(line)["note"]
        for line in (folder / EXPORT_CHECKPOINTS).read_text().splitlines()
        if line.strip()
    ]
    checker = LogVerifier(verifier_key, verifier_key.name, notes, earlier)
    with (folder / EXPORT_ENTRIES).open("rb") as handle:
        for line in handle:
            checker.feed(line.rstrip(b"\n"))
    return checker.finish()

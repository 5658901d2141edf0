"""Reading the audit log: filtered queries, proofs, export and verification of the live log."""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from sqlalchemy import ColumnElement, LargeBinary, cast, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.audit.checkpoints import (
    Anchor,
    checkpoint_dates,
    checkpoint_notes,
    latest_signed,
    log_origin,
    log_verifier,
    log_verifier_key,
    macs_required,
    opened_checkpoint,
    readable_note,
    sign_checkpoint,
    stored_note,
    stored_size,
)
from app.audit.index import MAX_TAIL, index_entries, indexed_size
from app.audit.log import STORED_LEVEL, LogDamaged, read_head
from app.audit.mac import check_macs
from app.audit.merkle import (
    RangeHasher,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    range_hasher_from_nodes,
    root_from_leaf_hashes,
)
from app.audit.note import parse_verifier_key
from app.audit.verify import LogVerifier, Problem, Report
from app.crypto.encoding import format_time, utc_now
from app.errors import BadRequest, EntraideError, NotFound
from app.models import AuditCheckpoint, AuditEntry, AuditIndex, AuditNode
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
) -> tuple[list[StoredEntry], int | None]:
    """Newest first; `before` is the cursor (an index), so pages never overlap or shift.

    Entries not yet in the query index (the tail, app/audit/index.py) are the newest: they
    are read from the log itself, a short range of its primary key, then the index is read
    for the rest of the page. In the index, each filter column has an index on
    (column, idx), read backwards from the cursor. A time range becomes a range of indexes
    first: entries are appended in time order (the verifier checks that times never go
    backwards), so the first entry at or after a moment bounds the indexes exactly as the
    moment bounds the times.
    """
    indexed = indexed_size(session)
    size = read_head(session).size
    if size - indexed > MAX_TAIL:  # nothing has indexed the log for a while: do it now
        index_entries(session, start=indexed, end=size)
        indexed = size
    low, high = 0, before
    if where.since is not None:
        first = _first_index_at(session, where.since, indexed)
        if first is None:
            return [], None
        low = first
    if where.until is not None:
        end = _first_index_at(session, where.until, indexed)
        if end is not None:
            high = end if high is None else min(high, end)
    equal = [
        (name, value)
        for name, value in (
            ("actor", where.actor),
            ("action", where.action),
            ("request_id", where.request_id),
            ("peer", where.peer),
            ("outcome", where.outcome),
        )
        if value is not None
    ]
    # The tail: a range of the log's primary key, every row of it read and filtered.
    tail = select(AuditEntry.idx).where(
        AuditEntry.idx >= max(low, indexed),
        *([AuditEntry.idx < high] if high is not None else []),
        *(getattr(AuditEntry, name) == value for name, value in equal),
    )
    found = list(session.scalars(tail.order_by(AuditEntry.idx.desc()).limit(limit + 1)))
    if len(found) <= limit and low < indexed:
        top = indexed if high is None else min(high, indexed)
        found += _indexed_matches(session, equal, low, top, limit + 1 - len(found))
    more = len(found) > limit
    page = found[:limit]
    rows = [
        StoredEntry(idx, stored_bytes(entry))
        for idx, entry in session.execute(
            select(AuditEntry.idx, _entry_bytes())
            .where(AuditEntry.idx.in_(page))
            .order_by(AuditEntry.idx.desc())
        )
    ]
    return rows, (page[-1] if more and page else None)


class StoredEntry(NamedTuple):
    idx: int
    entry: bytes  # as stored, whether or not it still parses


def _entry_bytes() -> ColumnElement[bytes]:
    """The entry column read as bytes even where a row was rewritten as text that is not
    UTF-8 (SQLite keeps any type it is given, and its driver cannot decode such text): the
    whole page, or the proof, failed 500 then, where audit.md shows such an entry as it is
    (from review). A no-op on PostgreSQL's bytea."""
    return cast(AuditEntry.entry, LargeBinary)


def _indexed_matches(
    session: Session, equal: list[tuple[str, str]], low: int, high: int, count: int
) -> list[int]:
    """The `count` newest indexes in [low, high) whose entries match, from the query index."""
    bounds = [AuditIndex.idx >= low, AuditIndex.idx < high]
    filters = [(getattr(AuditIndex, name), value) for name, value in equal]
    conditions = [column == value for column, value in filters]
    if len(filters) > 1 and session.get_bind().dialect.name == "sqlite":
        rarest = _rarest_filter(session, filters, bounds, depth=count)
        # `column || ''` matches exactly what `column` does, but no index can serve it: this
        # leaves SQLite one index to read, the rarest filter's.
        conditions = [
            column == value if column is rarest else column.concat("") == value
            for column, value in filters
        ]
    statement = select(AuditIndex.idx).where(*bounds, *conditions)
    return list(session.scalars(statement.order_by(AuditIndex.idx.desc()).limit(count)))


def _first_index_at(session: Session, moment: datetime, indexed: int) -> int | None:
    """The index of the first entry recorded at or after `moment`, if any."""
    found = session.scalar(
        select(AuditIndex.idx)
        .where(AuditIndex.recorded_at >= moment, AuditIndex.idx < indexed)
        .order_by(AuditIndex.recorded_at, AuditIndex.idx)
        .limit(1)
    )
    if found is not None:
        return found
    return session.scalar(
        select(AuditEntry.idx)
        .where(AuditEntry.idx >= indexed, AuditEntry.recorded_at >= moment)
        .order_by(AuditEntry.idx)
        .limit(1)
    )


def _rarest_filter(
    session: Session,
    filters: list[tuple[InstrumentedAttribute[Any], str]],
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
    rarest, reach = filters[0][0], -1
    for column, value in filters:
        probe = (
            select(AuditIndex.idx)
            .where(*bounds, column == value)
            .order_by(AuditIndex.idx.desc())
            .offset(depth)
            .limit(1)
        )
        found = session.scalar(probe)
        if found is None:
            return column
        if reach < 0 or found < reach:
            rarest, reach = column, found
    return rarest


def entry_view(entry: StoredEntry) -> dict[str, Any]:
    # From the bytes shown, not the stored column: entry bytes altered in the database with
    # their column left alone then fail the auditor's inclusion proof instead of passing it.
    data = entry.entry
    digest = leaf_hash(data).hex()
    try:
        # NaN and infinities are no JSON an entry is written with (nor one an answer holds).
        fields = json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeError, RecursionError):
        fields = None
    if not isinstance(fields, dict):
        # Damaged or altered bytes: shown as they are, so the auditor can page past them and
        # see that they no longer match the log (`entraide audit verify` names the entry).
        return {
            "idx": entry.idx,
            "malformed": True,
            "entry_base64": base64.b64encode(data).decode(),
            "leaf_hash": digest,
        }
    return {**fields, "leaf_hash": digest}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} in an entry")


def stored_bytes(value: object) -> bytes:
    """An entry's bytes as the driver returns them: text where a row was rewritten as text
    (SQLite keeps whatever type it is given), which hashes as its UTF-8 bytes."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def _node_reader(session: Session) -> RangeHasher:
    """Subtree hashes for proofs: stored ones from `audit_nodes`, smaller ones (fewer than
    2**STORED_LEVEL leaves, which appends do not store) from their entries' leaf hashes."""
    block = 1 << (STORED_LEVEL - 1)  # the largest subtree not stored: one read covers it
    blocks: dict[int, list[bytes]] = {}

    def read(level: int, position: int) -> bytes:
        if level >= STORED_LEVEL:
            stored = session.scalar(
                select(cast(AuditNode.hash, LargeBinary)).where(
                    AuditNode.level == level, AuditNode.position == position
                )
            )
            if stored is None:
                raise NotFound(
                    f"the log has no subtree {level}/{position}", code="proof_unavailable"
                )
            return bytes(stored)
        start = position << level
        first = start - start % block
        if first not in blocks:
            rows = session.execute(
                select(AuditEntry.idx, cast(AuditEntry.leaf_hash, LargeBinary))
                .where(AuditEntry.idx >= first, AuditEntry.idx < first + block)
                .order_by(AuditEntry.idx)
            )
            # Up to the first missing entry, if any: a proof cannot go past it.
            blocks[first] = [
                leaf for expected, (idx, leaf) in enumerate(rows, first) if idx == expected
            ]
        leaves = blocks[first][start - first : start - first + (1 << level)]
        if len(leaves) != 1 << level:
            raise NotFound(f"the log has no subtree {level}/{position}", code="proof_unavailable")
        return root_from_leaf_hashes(leaves)

    return range_hasher_from_nodes(read)


def prove_inclusion(session: Session, *, index: int, size: int | None) -> dict[str, Any]:
    head = read_head(session)
    tree_size = head.size if size is None else size
    if not 0 <= index < tree_size <= head.size:
        raise BadRequest(
            f"need 0 <= index < size <= {head.size} (the log's size)", code="invalid_proof_range"
        )
    entry = session.scalar(select(_entry_bytes()).where(AuditEntry.idx == index))
    if entry is None:
        raise NotFound(f"entry {index} is missing", code="unknown_entry")
    proof = inclusion_proof(index, tree_size, _node_reader(session))
    return {
        "index": index,
        "tree_size": tree_size,
        "leaf_hash": leaf_hash(stored_bytes(entry)).hex(),  # as entry_view: from the bytes
        "proof": [digest.hex() for digest in proof],
        # The bytes the leaf hashes: what `entraide audit check-entry` proves offline.
        "entry_base64": base64.b64encode(stored_bytes(entry)).decode(),
    }


def prove_consistency(session: Session, *, first: int, second: int | None) -> dict[str, Any]:
    head = read_head(session)
    new_size = head.size if second is None else second
    if not 0 <= first <= new_size <= head.size:
        raise BadRequest(
            f"need 0 <= first <= second <= {head.size} (the log's size)",
            code="invalid_proof_range",
        )
    proof = consistency_proof(first, new_size, _node_reader(session))
    return {"first": first, "second": new_size, "proof": [digest.hex() for digest in proof]}


def _checkpoint_notes(session: Session) -> list[str]:
    """The notes that can be read, by row: one that cannot is no checkpoint of this log
    (`_checkpoint_row_problems` names its row as damaged storage)."""
    return [note for _, note in checkpoint_notes(session) if note is not None]


def verify_database(
    session: Session,
    *,
    authority_id: str,
    log_public: bytes,
    earlier: str | None = None,
    extends: Sequence[tuple[str, str]] = (),
    anchor: Anchor | None = None,
    mac_key: bytes | None = None,
) -> Report:
    """`audit verify --db`: the live log against its own signed checkpoints, and, with the
    log's MAC key (app/audit/mac.py), the entries no checkpoint covers yet against their MACs.

    In one snapshot: a running node appends while the check streams its entries, and under
    PostgreSQL's default (read committed) each statement would see a later log than the one
    before, so the head would not match the entries read. `app.db.read_snapshot` gives one
    on both backends without holding appends off (the CLI's session); a session that has
    already begun keeps its own isolation (a unit of work on SQLite holds the writer's lock).
    """
    if session.get_bind().dialect.name == "postgresql" and not session.in_transaction():
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    verifier = LogVerifier(
        log_verifier(authority_id, log_public),
        log_origin(authority_id),
        _checkpoint_notes(session),
        earlier,
        extends=extends,
    )
    subtrees = _Subtrees()
    for indexes, entries in _stored_entries(session):
        verifier.feed_many(entries, indexes)
        subtrees.feed(entries)
    report = verifier.finish()
    try:
        head = read_head(session)
    except LogDamaged as exc:
        report.problems.append(Problem(report.entries, exc.detail))
        head = None
    if head is None:
        pass  # named just above; the other checks below still run
    elif head.size != report.entries:
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
    if mac_key is not None:
        # Links are hashes anyone can recompute: past the latest checkpoint only the MACs
        # tell a rewritten entry (the rule the next checkpoint applies before signing).
        latest = latest_signed(session, log_verifier(authority_id, log_public))
        checked = check_macs(
            session,
            mac_key,
            start=0 if latest is None else latest.size,
            end=report.entries,
            legacy=not macs_required(latest, anchor),
            head_root=None if head is None else head.root_hash,
        )
        report.without_mac = checked.without_mac
        if checked.problem is not None:
            report.problems.append(Problem(*checked.problem))
    report.problems.extend(_column_problems(session))
    report.problems.extend(_checkpoint_row_problems(session, authority_id, log_public))
    if report.first is None:  # entries contiguous and signed: what the subtrees must hash
        report.problems.extend(_node_problems(session, subtrees.levels()))
    if report.first is None and anchor is not None:
        # The checkpoints in the database may not be all that were signed: one removed with
        # the entries after it leaves an intact-looking shorter (or rewritten) log.
        try:
            found = anchor.problem(session, report.entries, report.root)
        except EntraideError as exc:
            found = exc.detail
        if found is not None:
            report.problems.append(Problem(report.entries, found))
    return report


class _Subtrees:
    """The perfect subtrees of 2**STORED_LEVEL leaves and more that the entries make, as
    appends store them in `audit_nodes`, built while the entries stream (one root per
    2**STORED_LEVEL entries is kept, not the leaves)."""

    def __init__(self) -> None:
        self._leaves: list[bytes] = []
        self._bottom: list[bytes] = []

    def feed(self, entries: Sequence[bytes]) -> None:
        for entry in entries:
            self._leaves.append(leaf_hash(entry))
            if len(self._leaves) == 1 << STORED_LEVEL:
                self._bottom.append(root_from_leaf_hashes(self._leaves))
                self._leaves.clear()

    def levels(self) -> dict[tuple[int, int], bytes]:
        nodes: dict[tuple[int, int], bytes] = {}
        level, row = STORED_LEVEL, self._bottom
        while row:
            nodes.update(((level, position), digest) for position, digest in enumerate(row))
            row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)]
            level += 1
        return nodes


def _node_problems(session: Session, expected: dict[tuple[int, int], bytes]) -> Iterator[Problem]:
    """Stored subtree hashes that the entries do not make. Proofs read them, not the entries:
    one altered made every inclusion proof under it fail against the signed root, and every
    peer's consistency check across it raise a split-view alarm against this node."""
    stored = {
        (level, position): digest
        for level, position, digest in session.execute(
            select(AuditNode.level, AuditNode.position, cast(AuditNode.hash, LargeBinary))
        )
    }
    for (level, position), digest in sorted(expected.items()):
        found = stored.pop((level, position), None)
        if found is None or not hmac.compare_digest(found, digest):
            state = "is missing" if found is None else "differs from its entries"
            yield Problem(
                position << level,
                f"the stored subtree hash {level}/{position}, which proofs read, {state}",
            )
    for level, position in sorted(stored):
        yield Problem(
            position << level,
            f"the stored subtree hash {level}/{position} belongs to no entries of the log",
        )


# The columns queries and proofs read beside an entry's bytes, named as in the entry, in the
# order `_COLUMNS_QUERY` reads them.
_ENTRY_COLUMNS = ("actor", "action", "outcome", "request_id", "msg_id", "peer")
_INDEX_COLUMNS = ("actor", "action", "outcome", "request_id", "peer")
_COLUMNS_QUERY = (
    "SELECT e.idx, {entry}, {leaf_hash}, e.recorded_at,"
    " e.actor, e.action, e.outcome, e.request_id, e.msg_id, e.peer,"
    " i.idx, i.recorded_at, i.actor, i.action, i.outcome, i.request_id, i.peer"
    " FROM audit_entries e LEFT JOIN audit_index i ON i.idx = e.idx ORDER BY e.idx"
)


def _listed(names: list[str]) -> str:
    return f"{', '.join(names)} {'differs' if len(names) == 1 else 'differ'} from"


def _entry_time(value: object) -> str:
    """A stored `recorded_at` as the entry spells its time (to the second, UTC)."""
    if isinstance(value, datetime):  # PostgreSQL: timestamptz
        return format_time(value)
    text = str(value)  # SQLite: naive UTC text, "YYYY-MM-DD HH:MM:SS[.ffffff]"
    return f"{text[:10]}T{text[11:19]}Z"


def _checkpoint_row_problems(
    session: Session, authority_id: str, log_public: bytes
) -> Iterator[Problem]:
    """Checkpoint rows whose columns say something else than their signed note.

    The node reads how far its checkpoints reach from the notes (app/audit/checkpoints.py),
    but a size or root edited beside a genuine note is still a forged row, and a date ahead
    of the clock (no signature covers it) would have put off checkpoints due by time. Notes
    that do not verify are the main pass's to report; a note, a size or a date that cannot be
    read at all (damaged storage) is named here, by row and column, never by its value."""
    origin = log_origin(authority_id)
    dates = checkpoint_dates(session)
    rows = session.execute(
        select(
            AuditCheckpoint.id,
            stored_size(session),
            cast(AuditCheckpoint.root_hash, LargeBinary),
            stored_note(session),
        ).order_by(AuditCheckpoint.id)
    )
    ahead = utc_now() + timedelta(minutes=5)
    for row_id, size, root_hash, stored in rows:
        note = readable_note(stored)
        if note is None:
            # The node passes it over (no note of ours): the checkpoint it held, if any, is
            # lost to the database until the value is put back.
            yield Problem(
                0,
                f"checkpoint row {row_id}: its note (column note) cannot be read: the stored "
                "value was altered or damaged; it counts as no checkpoint of this log until "
                "it is put back from a backup",
            )
        opened = None if note is None else opened_checkpoint(note, origin, log_public)
        if size is None:  # passed over as well: its columns do not say what its note does
            yield Problem(
                0 if opened is None else opened.size,
                f"checkpoint row {row_id}: its size (column size) cannot be read: the stored "
                "value was altered or damaged; it counts as no checkpoint of this log until "
                "it is put back from a backup",
            )
        created_at = dates.get(row_id)
        if created_at is None and row_id in dates:
            yield Problem(
                0 if opened is None else opened.size,
                f"checkpoint row {row_id}: its date (created_at) cannot be read: the stored "
                "value was altered or damaged (no signature covers it: the checkpoint's note "
                "still counts); put the value back from a backup",
            )
        if opened is None:
            continue
        if size is not None and (size, bytes(root_hash)) != (opened.size, opened.root_hash):
            yield Problem(
                opened.size,
                f"checkpoint row {row_id} says {size} entries and root {bytes(root_hash).hex()}"
                f" but its signed note says {opened.size} entries and root "
                f"{opened.root_hash.hex()}",
            )
        if created_at is not None and created_at > ahead:
            yield Problem(
                opened.size,
                f"checkpoint row {row_id} is dated {created_at.isoformat()}, in the future",
            )


def _column_problems(session: Session) -> Iterator[Problem]:
    """Entries whose stored columns say something else than their bytes.

    The bytes are what the checkpoints sign; the columns and the query index are what the
    auditor's filters and proofs read. Someone with SQL access who edits a column (or an
    index row) but not the bytes leaves the signed log intact, and makes an entry vanish from
    `?request_id=…` or show under another actor: the main pass cannot see that, this one does.
    Straight from the driver, as `_stored_entries`: a row object per entry would cost more
    than the check.
    """
    # Index rows of no entry: one past the log's end makes queries take the entries before
    # it as indexed already, and hides them from every filter.
    strays = (
        select(AuditIndex.idx)
        .outerjoin(AuditEntry, AuditEntry.idx == AuditIndex.idx)
        .where(AuditEntry.idx.is_(None))
        .order_by(AuditIndex.idx)
        .limit(20)
    )
    for idx in session.scalars(strays):
        yield Problem(idx, f"the query index holds an entry {idx} that the log does not")
    indexed = indexed_size(session)
    width = len(_ENTRY_COLUMNS)
    for rows in _driver_rows(
        session,
        _COLUMNS_QUERY.format(
            entry=_as_bytes(session, "e.entry"), leaf_hash=_as_bytes(session, "e.leaf_hash")
        ),
        "entraide_audit_columns",
    ):
        for row in rows:
            idx, entry = row[0], stored_bytes(row[1])
            try:
                fields = orjson.loads(entry)
            except orjson.JSONDecodeError:
                continue  # the main pass names it
            if not isinstance(fields, dict):
                continue
            expected = tuple(map(fields.get, _ENTRY_COLUMNS))
            time = fields.get("time")
            columns, index_row = row[4 : 4 + width], row[4 + width :]
            # The usual case, everything as the bytes say, in a few comparisons.
            if (
                columns != expected
                or _entry_time(row[3]) != time
                or bytes(row[2]) != leaf_hash(entry)
            ):
                yield from _entry_problems(idx, entry, row, expected, time)
            if index_row[0] is None:
                if idx < indexed:
                    yield Problem(idx, f"entry {idx} is missing from the query index")
                continue
            wanted = tuple(map(fields.get, _INDEX_COLUMNS))
            if tuple(index_row[2:]) != wanted or _entry_time(index_row[1]) != time:
                differ = [
                    name
                    for name, value, want in zip(_INDEX_COLUMNS, index_row[2:], wanted, strict=True)
                    if value != want
                ]
                if _entry_time(index_row[1]) != time:
                    differ.append("recorded_at")
                yield Problem(idx, f"entry {idx}: the query index's {_listed(differ)} its bytes")


def _entry_problems(
    idx: int, entry: bytes, row: tuple[Any, ...], expected: tuple[Any, ...], time: object
) -> Iterator[Problem]:
    columns = row[4 : 4 + len(_ENTRY_COLUMNS)]
    differ = [
        name
        for name, value, want in zip(_ENTRY_COLUMNS, columns, expected, strict=True)
        if value != want
    ]
    if _entry_time(row[3]) != time:
        differ.append("recorded_at")
    if bytes(row[2]) != leaf_hash(entry):
        differ.append("leaf_hash")
    yield Problem(idx, f"entry {idx}: its stored {_listed(differ)} its bytes")


READ_CHUNK = 20_000  # rows per fetch from the database
READ_BYTES = 1 << 23  # bytes per read of an export


def _stored_entries(session: Session) -> Iterator[tuple[list[int], list[bytes]]]:
    """Every stored entry with its index column, in index order, a chunk at a time.

    Straight from the driver: a log has millions of rows, and building a result row object
    for each would cost more than checking it.
    """
    query = _ENTRIES_QUERY.format(entry=_as_bytes(session, "entry"))
    for rows in _driver_rows(session, query, "entraide_audit_verify"):
        indexes, entries = zip(*rows, strict=True)
        yield list(indexes), [stored_bytes(entry) for entry in entries]


_ENTRIES_QUERY = "SELECT idx, {entry} FROM audit_entries ORDER BY idx"


def _as_bytes(session: Session, column: str) -> str:
    """An entry column read as bytes even where a row was rewritten as text: SQLite keeps
    any type it is given, and its driver cannot decode text that is not UTF-8."""
    return f"CAST({column} AS BLOB)" if session.get_bind().dialect.name == "sqlite" else column


def _driver_rows(session: Session, query: str, name: str) -> Iterator[Sequence[Any]]:
    """The rows of `query` from the session's own connection, `READ_CHUNK` at a time. On
    PostgreSQL a server-side cursor (`name`) streams them (binary, so bytea needs no
    decoding) instead of loading the whole result at once."""
    connection = session.connection()
    dbapi = connection.connection.dbapi_connection
    if dbapi is None:
        raise RuntimeError("the session's connection is closed")
    if connection.dialect.name == "postgresql":
        cursor = dbapi.cursor(name=name, binary=True)
    else:
        cursor = dbapi.cursor()
    try:
        cursor.execute(query)
        while rows := cursor.fetchmany(READ_CHUNK):
            yield rows
    finally:
        cursor.close()


@dataclass(frozen=True)
class Exported:
    entries: int
    checkpoints: int
    unreadable: list[int]  # checkpoint rows left out: their note cannot be read


def export_log(session: Session, node: Node, out: Path) -> Exported:
    """Write entries, checkpoints and the public log key: all an auditor needs, offline.
    A checkpoint row whose note cannot be read (damaged storage) holds no note to export:
    left out, and said (the export ends with a checkpoint of all its entries anyway)."""
    sign_checkpoint(
        session, authority_id=node.authority_id, log_key=node.keys.log, anchor=node.log_anchor
    )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)  # case metadata (docs/audit.md)
    count = 0
    with (out / EXPORT_ENTRIES).open("wb") as handle:
        statement = select(AuditEntry.entry).order_by(AuditEntry.idx)
        for (data,) in session.execute(statement.execution_options(yield_per=5000)):
            handle.write(stored_bytes(data) + b"\n")
            count += 1
    stored = checkpoint_notes(session)
    notes = [note for _, note in stored if note is not None]
    with (out / EXPORT_CHECKPOINTS).open("w") as handle:
        for note in notes:
            handle.write(json.dumps({"note": note}) + "\n")
    (out / EXPORT_KEY).write_text(log_verifier_key(node.authority_id, node.keys.log) + "\n")
    info = {"authority_id": node.authority_id, "origin": log_origin(node.authority_id)}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return Exported(count, len(notes), [row for row, note in stored if note is None])


def _export_note(number: int, line: str) -> str:
    """A line of checkpoints.jsonl: an object whose `note` is a string (ValueError if not)."""
    try:
        record = json.loads(line)
    except RecursionError:
        record = None
    note = record.get("note") if isinstance(record, dict) else None
    if not isinstance(note, str):
        raise ValueError(f"line {number} of {EXPORT_CHECKPOINTS} holds no checkpoint note")
    return note


def verify_export(
    folder: Path,
    *,
    earlier: str | None = None,
    extends: Sequence[tuple[str, str]] = (),
    log_key: str | None = None,
) -> Report:
    """`audit verify DIR`: needs nothing but the folder (and optionally a saved checkpoint,
    and checkpoints cosigned by witnesses, as labelled notes in `extends`).

    The export carries the log's verifier key for convenience; an auditor who has the key
    from elsewhere (the node's identity document, an earlier audit) passes it as `log_key`.
    """
    verifier_key = parse_verifier_key(log_key or (folder / EXPORT_KEY).read_text().strip())
    notes = [
        _export_note(number, line)
        for number, line in enumerate(
            (folder / EXPORT_CHECKPOINTS).read_text().splitlines(), start=1
        )
        if line.strip()
    ]
    checker = LogVerifier(verifier_key, verifier_key.name, notes, earlier, extends=extends)
    with (folder / EXPORT_ENTRIES).open("rb") as handle:
        rest = b""
        while chunk := handle.read(READ_BYTES):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()  # an unfinished line, completed by the next chunk
            checker.feed_many(lines)
        if rest:
            checker.feed(rest)  # the last line had no newline
    report = checker.finish()
    if report.entries > report.signed:
        # An export is written under a checkpoint of every entry it holds (`export_log`):
        # entries past the last signed one mean that checkpoint was taken out, and with it
        # the only signature over what follows, which could then be rewritten unseen.
        report.problems.append(
            Problem(
                report.signed,
                f"entries {report.signed} to {report.entries - 1} are covered by no signed "
                "checkpoint (an export ends with a checkpoint of all its entries)",
            )
        )
    return report

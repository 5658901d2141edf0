"""Appending audit entries, in the caller's transaction.

An entry is appended by the same unit of work as the action it records, so an action and its
entry commit together or not at all. Entries hold ids, hashes, codes and outcomes, never
request content, tokens or keys.

Each entry is one leaf of the node's RFC 9162 Merkle tree. Appending locks the single head
row (contiguous indexes), extends the stored compact range, and stores the hashes of the
large perfect subtrees the new leaf completes (for proofs; see `STORED_LEVEL`). Each entry
also records the previous leaf's hash: redundant with the tree, but it lets a verifier name
exactly which entry was altered instead of only which checkpoint stopped matching. Beside its
bytes, each entry gets a MAC under a key derived from the log key (app/audit/mac.py): until a
checkpoint signs it, that is what keeps a database writer without the keys from rewriting it.

Appends sit on the request path, several per request, so they are written as plain SQL
through the DB-API cursor of the transaction's own connection (no ORM unit of work, no
statement compilation, no result objects), as soon as they are recorded: the rows are in the
transaction at once, exactly as if they had been flushed, and whatever reads the log later in
the same transaction sees them. (SQLAlchemy's statement events do not see these statements.)
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from weakref import WeakKeyDictionary

import orjson
from sqlalchemy import Dialect
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from app.audit.mac import MAC_KEY_INFO, entry_mac, macs_of
from app.audit.merkle import CompactRange, leaf_hash
from app.audit.verify import ENTRY_VERSION
from app.crypto.encoding import DecodeError, canonical_json, format_time, parse_time, utc_now
from app.db import undecodable_column, unit_of_work
from app.errors import EntraideError
from app.models import AuditEntry, AuditHead

log = logging.getLogger(__name__)

HEAD_ID = 1
# Lags shorter than this (replicas' clocks a few milliseconds apart) are mended silently.
CLOCK_BEHIND_WARNING = timedelta(seconds=1)
MAX_DETAIL_CHARS = 500
STORED_LEVEL = 8
"""`audit_nodes` holds the perfect subtrees of 2**8 leaves and more. A smaller one is hashed
again from its entries' leaf hashes (at most 128 of them) when a proof asks for it: an append
then writes a node row once every 256 entries, instead of two rows per entry."""

_HELD_HEAD = "entraide_audit_head"  # session.info: what the current transaction holds
_DEFERRED = "entraide_audit_deferred"  # session.info: entries kept back by `deferred_entries`


@dataclass(frozen=True, slots=True)
class Head:
    """The log's head row: its size, its right edge (compact range) and root, the last leaf.

    Never changed in place (an append makes a new one, on a copy of the compact range), so
    that transactions and threads can share one."""

    size: int
    compact: CompactRange
    root_hash: bytes
    last_leaf_hash: bytes | None
    last_time: datetime | None = None  # the last entry's time (as the entry itself says)


@dataclass(frozen=True, slots=True)
class _Statements:
    """The append's SQL in the driver's own parameter style, and how it stores a time."""

    read: str
    lock: str
    last_entry: str
    update_head: str  # params: the new head, then the one expected
    insert_entry: str
    combined: bool  # both in one statement (_combined_append): one round trip
    insert_node: str
    mark_checkpoint: str
    db_time: Callable[[datetime], Any]
    read_time: Callable[[Any], datetime | None]


_READ = (
    "SELECT size, compact_range, root_hash, last_leaf_hash, updated_at FROM audit_head WHERE id = ?"
)
# Only if the head is still the one the entry was built on: its size and root. A writer that
# moved it meanwhile (another process, or a transaction this one waited for) changed both.
_UPDATE_HEAD = (
    "UPDATE audit_head SET size = ?, compact_range = ?, root_hash = ?, last_leaf_hash = ?, "
    "updated_at = ? WHERE id = ? AND size = ? AND root_hash = ?"
)
_INTO_ENTRIES = (
    "INSERT INTO audit_entries "
    "(idx, recorded_at, actor, action, outcome, request_id, msg_id, peer, entry, leaf_hash, mac) "
)
_INSERT_ENTRY = _INTO_ENTRIES + "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT_ENTRY = "SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s FROM head"


@functools.cache
def _combined_append(count: int) -> str:
    """PostgreSQL: the head and `count` entries in one statement, the entries only if the
    head was updated (params: the new head, the one expected, then each entry's row)."""
    update = _UPDATE_HEAD.replace("?", "%s")
    entries = " UNION ALL ".join([_SELECT_ENTRY] * count)
    return f"WITH head AS ({update} RETURNING id) {_INTO_ENTRIES}{entries}"


_LAST_ENTRY = "SELECT entry FROM audit_entries WHERE idx = ?"
_INSERT_NODE = "INSERT INTO audit_nodes (level, position, hash) VALUES (?, ?, ?)"
_MARK_CHECKPOINT = "UPDATE audit_head SET last_checkpoint_size = ? WHERE id = ?"
_statements_by_dialect: dict[str, _Statements] = {}


def _statements(dialect: Dialect) -> _Statements:
    statements = _statements_by_dialect.get(dialect.name)
    if statements is not None:
        return statements

    def sql(text: str) -> str:
        return text if dialect.paramstyle == "qmark" else text.replace("?", "%s")

    sqlite = dialect.name == "sqlite"
    # Times go in exactly as the column's type would write them (naive UTC text on SQLite).
    column_type = AuditEntry.__table__.c.recorded_at.type
    processor = column_type.dialect_impl(dialect).bind_processor(dialect)
    reader = AuditHead.__table__.c.updated_at.type.dialect_impl(dialect).result_processor(
        dialect, None
    )
    statements = _Statements(
        read=sql(_READ),
        # SQLite has no row locks: BEGIN IMMEDIATE (app/db.py) already serialises writers.
        lock=sql(_READ if sqlite else _READ + " FOR UPDATE"),
        # As bytes even where a row was rewritten as text (SQLite keeps any type it is
        # given, and its driver cannot decode text that is not UTF-8).
        last_entry=sql(
            _LAST_ENTRY.replace("entry", "CAST(entry AS BLOB)", 1) if sqlite else _LAST_ENTRY
        ),
        update_head=sql(_UPDATE_HEAD),
        insert_entry=sql(_INSERT_ENTRY),
        combined=not sqlite,
        insert_node=sql(_INSERT_NODE),
        mark_checkpoint=sql(_MARK_CHECKPOINT),
        db_time=processor if processor is not None else (lambda moment: moment),
        read_time=reader if reader is not None else (lambda value: value),
    )
    _statements_by_dialect[dialect.name] = statements
    return statements


_last_written: WeakKeyDictionary[object, Head] = WeakKeyDictionary()
"""Per database (engine), the head as this process last wrote it. A transaction's first
append builds on it without reading the head row first: the head row is locked by the
append's own conditional update, and only if another writer moved the head meanwhile is it
read (under lock) and the entry built again. One statement per append, none per transaction,
for a node that is the log's only writer, as it normally is."""


@dataclass(slots=True)
class _Held:
    transaction: SessionTransaction
    cursor: DBAPICursor
    sql: _Statements
    head: Head
    locked: bool  # the head row is locked and `head` is what it holds
    mac_key: bytes | None  # app/audit/mac.py; None: this session only reads or signs


def _cursor(session: Session) -> tuple[DBAPICursor, _Statements]:
    """A DB-API cursor on the session's connection, inside its transaction."""
    connection = session.connection()
    dbapi = connection.connection.dbapi_connection
    if dbapi is None:
        raise RuntimeError("the session's connection is closed")
    return dbapi.cursor(), _statements(connection.dialect)


def _read(cursor: DBAPICursor, sql: _Statements, statement: str) -> Head:
    try:
        cursor.execute(statement, (HEAD_ID,))
        row = cursor.fetchone()
    except Exception as exc:
        if not _value_unreadable(exc):
            raise
        # Named, not the driver's message: it quotes the stored value (from review: every
        # audited command ended in a traceback that showed it).
        raise LogDamaged(
            "the audit log's head row cannot be read (a stored value damaged): the database "
            "was altered or damaged"
        ) from None
    if row is None:
        # The migration that made the table wrote the row; none now is a deleted one (from
        # review: "run the migrations" sent the operator round, migrations doing nothing).
        raise LogDamaged("the audit log's head row is missing: the database was altered")
    size, compact_range, root_hash, last_leaf_hash, updated_at = row
    # The head's shortcuts are what every append builds on: taken on trust, an edited one
    # would have the node extend, and sign, a tree no entries make. Checked against each
    # other and against the last entry; any disagreement stops the log (fail closed).
    try:
        compact = CompactRange.from_bytes(bytes(compact_range))
        root, last_leaf = bytes(root_hash), _optional_bytes(last_leaf_hash)
    except (ValueError, TypeError) as exc:
        raise LogDamaged("the audit log's head row does not parse") from exc
    if compact.size != size or compact.root() != root:
        raise LogDamaged("the audit log's head row holds a tree that is not its root")
    last_entry = _last_entry(cursor, sql, size)
    if last_entry is not None and (last_leaf is None or leaf_hash(last_entry) != last_leaf):
        raise LogDamaged("the audit log's head row does not name its last entry")
    return Head(
        size=size,
        compact=compact,
        root_hash=root,
        last_leaf_hash=last_leaf,
        last_time=_last_entry_time(last_entry, sql, size, updated_at),
    )


class LogDamaged(EntraideError):
    """The audit log's stored head disagrees with itself or its entries: it was altered or
    damaged. Nothing is appended to it (and so nothing audited is done) until it is
    repaired; `entraide audit verify --db` names what is wrong. Never input."""

    status_code = 500
    code = "audit_log_damaged"


def _optional_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _last_entry(cursor: DBAPICursor, sql: _Statements, size: int) -> bytes | None:
    if size == 0:
        return None
    cursor.execute(sql.last_entry, (size - 1,))
    row = cursor.fetchone()
    if row is None:
        raise LogDamaged(f"the audit log's last entry ({size - 1}) is missing")
    value = row[0]
    return value.encode() if isinstance(value, str) else bytes(value)


def _last_entry_time(
    last_entry: bytes | None, sql: _Statements, size: int, updated: Any
) -> datetime | None:
    """The time the last entry itself carries (hashed into the log), not the head row's copy:
    one UPDATE of that copy to a far future would otherwise stamp every later entry with it,
    since entry times never go back (`_entry_time`)."""
    head_time = sql.read_time(updated) if updated is not None else None
    if last_entry is None:
        return head_time
    try:
        entry_time = parse_time(orjson.loads(last_entry).get("time"))
    except (orjson.JSONDecodeError, AttributeError, DecodeError):
        entry_time = None
    if entry_time is None:  # `entraide audit verify` reports the entry itself
        log.error("the audit log's last entry (%s) has no readable time", size - 1)
        return head_time
    if head_time is not None and head_time - entry_time > timedelta(seconds=1):
        log.error(
            "the audit log's head row is dated %s, its last entry %s: the head row was "
            "altered; new entries follow the entry's time",
            format_time(head_time),
            format_time(entry_time),
        )
    return entry_time


def _hold(session: Session) -> _Held:
    """This transaction's view of the head, kept current by its appends.

    Keyed by the innermost transaction, so a savepoint rolled back (and whatever it wrote)
    means starting again from the head row as it is.
    """
    current = session.get_nested_transaction() or session.get_transaction()
    held: _Held | None = session.info.get(_HELD_HEAD)
    if held is not None and held.transaction is current:
        return held
    key: bytes | None = session.info.get(MAC_KEY_INFO)
    cursor, sql = _cursor(session)
    # session.connection() has begun a transaction if there was none.
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        raise RuntimeError("no transaction to append the audit entry in")
    last = _last_written.get(session.get_bind())
    if last is None:
        held = _Held(transaction, cursor, sql, _read(cursor, sql, sql.lock), True, key)
    else:
        held = _Held(transaction, cursor, sql, last, False, key)
    session.info[_HELD_HEAD] = held
    return held


def _lock(held: _Held) -> Head:
    if not held.locked:
        held.head = _read(held.cursor, held.sql, held.sql.lock)
        held.locked = True
    return held.head


def lock_head(session: Session) -> Head:
    """The head, locked for the rest of the transaction; appends in it keep it current."""
    return _lock(_hold(session))


def _value_unreadable(exc: Exception) -> bool:
    """A value of the row the driver cannot give back: SQLite's text that is not UTF-8, or
    one psycopg cannot load as it fetches (no SQLSTATE: the server refused nothing)."""
    if undecodable_column(exc) is not None:
        return True
    psycopg = sys.modules.get("psycopg")
    return (
        psycopg is not None
        and isinstance(exc, psycopg.DataError)
        and getattr(exc, "sqlstate", None) is None
    )


def read_head(session: Session) -> Head:
    """The head as committed (or as this transaction left it), without locking it."""
    cursor, sql = _cursor(session)
    try:
        return _read(cursor, sql, sql.read)
    finally:
        cursor.close()


def mark_checkpointed(session: Session) -> None:
    """Record that a checkpoint now covers the whole log (the head stays locked)."""
    held = _hold(session)
    held.cursor.execute(held.sql.mark_checkpoint, (_lock(held).size, HEAD_ID))


_PLAIN = frozenset({str, int, bool, type(None)})


def entry_bytes(fields: dict[str, Any]) -> bytes:
    """`canonical_json(fields)`, faster where that is safe.

    For strings, integers (up to 64 bits), booleans and null in objects with string keys,
    orjson with sorted keys writes exactly the bytes `canonical_json` does; it spells floats
    differently, so anything else in the details goes the standard way.
    """
    if all(type(value) in _PLAIN for value in fields["details"].values()):
        try:
            return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, a key that is not a string
            pass
    return canonical_json(fields)


def _bounded(details: dict[str, Any]) -> dict[str, Any]:
    # Error texts can be long or hostile; entries stay small and single-purpose.
    return {
        key: (value[:MAX_DETAIL_CHARS] if isinstance(value, str) else value)
        for key, value in details.items()
    }


@dataclass(frozen=True, slots=True)
class Event:
    """One entry to append (`record_many`): the fields `record` takes."""

    actor: str
    action: str
    outcome: str = "ok"
    request_id: str | None = None
    msg_id: str | None = None
    peer: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


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
) -> int | None:
    """Append one entry in the session's transaction; returns its index (None if deferred)."""
    event = Event(actor, action, outcome, request_id, msg_id, peer, details or {})
    written = record_many(session, [event])
    return written[0] if written else None


@contextmanager
def deferred_entries(session: Session) -> Iterator[list[Event]]:
    """Keep the entries recorded in the session inside this block, instead of appending them.

    For a transaction that does several actions (a batch of envelopes, app/p2p/batch.py):
    appending locks the log's head until the commit, so appending as it goes would make the
    head the first lock such a transaction takes and hold it while it takes others, an
    order other transactions (which append last) can deadlock against. The caller drops the
    entries of an action it rolls back, and appends the rest with `record_many` at the end.
    """
    if _DEFERRED in session.info:
        raise RuntimeError("audit entries are already deferred in this session")
    kept: list[Event] = []
    session.info[_DEFERRED] = kept
    try:
        yield kept
    finally:
        del session.info[_DEFERRED]


def record_many(session: Session, events: Sequence[Event]) -> list[int]:
    """Append entries in the session's transaction, in order; returns their indexes.

    As `record` for each, but written together: one statement on PostgreSQL (one round trip
    for all of them), two on SQLite. For an action that records several events at once.
    Inside `deferred_entries` they are kept back instead, and no index is returned.
    """
    kept: list[Event] | None = session.info.get(_DEFERRED)
    if kept is not None:
        kept.extend(events)
        return []
    held = _hold(session)
    while True:
        written = _append(held, events)
        if written is not None:
            _last_written[session.get_bind()] = held.head
            return written
        if held.locked:
            raise RuntimeError("the audit log head moved while this transaction held it")
        _lock(held)  # another writer moved the head: build the entries again on the real one


_warned_at = -1e9  # time.monotonic() of the last warning: at most one a minute


def _entry_time(head: Head) -> datetime:
    """Now, or the last entry's time if the clock says earlier: entry times never go back.

    A verifier (app/audit/verify.py) reports a time that goes backwards as a fault of the
    log, so a wall clock stepped back (NTP, a restored VM) or a replica whose clock lags
    another's must not write one; the entry takes the latest time instead, and it is said.
    """
    global _warned_at
    now = utc_now()
    last = head.last_time
    if last is not None and now < last:
        if last - now > CLOCK_BEHIND_WARNING and time.monotonic() - _warned_at > 60:
            _warned_at = time.monotonic()
            log.warning(
                "this node's clock is %.3f s behind the audit log's last entry; "
                "new entries take that entry's time until the clock catches up",
                (last - now).total_seconds(),
            )
        return last
    return now


def _append(held: _Held, events: Sequence[Event]) -> list[int] | None:
    """Write entries on top of `held.head`; None if the head row is no longer that."""
    head, sql, cursor, key = held.head, held.sql, held.cursor, held.mac_key
    if key is None:  # an entry without its MAC would stop the next checkpoint: never written
        raise RuntimeError("this session holds no audit MAC key (app.audit.mac.append_with)")
    compact, last_leaf = head.compact.copy(), head.last_leaf_hash
    nodes: list[tuple[int, int, bytes]] = []

    def keep(level: int, position: int, digest: bytes) -> None:
        if level >= STORED_LEVEL:
            nodes.append((level, position, digest))

    rows: list[tuple[Any, ...]] = []
    now = _entry_time(head)
    moment, stamp = sql.db_time(now), format_time(now)
    for event in events:
        entry = entry_bytes(
            {
                "v": ENTRY_VERSION,
                "idx": compact.size,
                "time": stamp,
                "actor": event.actor,
                "action": event.action,
                "outcome": event.outcome,
                "request_id": event.request_id,
                "msg_id": event.msg_id,
                "peer": event.peer,
                "details": _bounded(event.details),
                "prev_leaf": last_leaf.hex() if last_leaf else None,
            }
        )
        last_leaf = leaf_hash(entry)
        rows.append(
            (
                compact.size,
                moment,
                event.actor,
                event.action,
                event.outcome,
                event.request_id,
                event.msg_id,
                event.peer,
                entry,
                last_leaf,
                entry_mac(key, entry),
            )
        )
        compact.append(last_leaf, visit=keep)
    if not rows:
        return []
    root = compact.root()
    # The entry the head now ends on vouches for its root (app/audit/mac.py `head_mac`).
    *last_row, _ = rows[-1]
    rows[-1] = (*last_row, macs_of(key, last_row[8], root))
    new_head = (compact.size, compact.to_bytes(), root, last_leaf, moment, HEAD_ID)
    expected = (head.size, head.root_hash)
    if sql.combined:
        statement = _combined_append(len(rows))
        cursor.execute(statement, (*new_head, *expected, *(value for row in rows for value in row)))
        if cursor.rowcount != len(rows):
            return None
    else:
        cursor.execute(sql.update_head, (*new_head, *expected))
        if cursor.rowcount != 1:
            return None
        cursor.executemany(sql.insert_entry, rows)
    if nodes:
        cursor.executemany(sql.insert_node, nodes)
    held.head = Head(compact.size, compact, root, last_leaf, now)
    held.locked = True  # the update holds the head row until the transaction ends
    return [row[0] for row in rows]


def record_alone(sessions: sessionmaker[Session], **fields: Any) -> None:
    """Record in a transaction of its own: for refusals, whose own transaction rolls back."""
    with unit_of_work(sessions) as session:
        record(session, **fields)

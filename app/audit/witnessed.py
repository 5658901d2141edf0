"""The checkpoints this node witnessed, read as stored: a damaged row is never taken for what
a peer showed.

A witnessed row is the anchor of the check of its peer's next checkpoints
(app/audit/witness.py): what they must be proven to extend. SQLite keeps any value in any
column, and PostgreSQL a size below zero or past any log. From review: a size made text
sorted above every number and became the peer's largest checkpoint (witnessing of the peer
then failed at every round, silently for the operator); a root made text raised split-view
alarms against an honest peer; and a size lowered below the others passed the row over, so a
history the peer forked since was checked against an older checkpoint and cosigned. So each
column is read as the driver can always give it back, and a row whose size or root cannot be
read, is no size or root of a log, or is not what its note says (nor a note one can read) is
damage: the caller holds its peer's witnessing until the row is put back or set aside.

A check reads, in one statement on the table's indexes, the peer's largest row, any whose
size is no size of a log, and its newest (its largest, but when an older checkpoint was shown
after a newer one): as fast as the one read it replaces,
however many checkpoints the peer has shown (a scan of them all cost 20 ms on SQLite and
130 ms on PostgreSQL at 100,000). Doctor reads those, and the newest DOCTOR_ROWS rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    LargeBinary,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from app.audit.checkpoints import column_dates, readable_note, stored_text
from app.audit.merkle import HASH_SIZE
from app.audit.note import Checkpoint, NoteError
from app.models import WitnessedCheckpoint

W = WitnessedCheckpoint
# No log is larger: the most a consistency proof can be asked for (app/audit/router.py).
MAX_SIZE = 2**62
DATES = ("received_at", "set_aside_at")
DOCTOR_ROWS = 10_000  # a week of a peer checkpointing every minute


@dataclass(frozen=True)
class Stored:
    """A witnessed checkpoint as its row holds it, its size and root those of its note."""

    id: int
    size: int
    root_hash: bytes
    note: str


@dataclass(frozen=True)
class Damaged:
    id: int
    columns: tuple[str, ...]  # of witnessed_checkpoints, never the values


class WitnessedDamaged(Exception):
    """Rows a check of `authority`'s checkpoints reads are damaged: it is held."""

    def __init__(self, authority: str, rows: Sequence[Damaged]) -> None:
        self.authority = authority
        self.rows = sorted(rows, key=lambda row: row.id)
        self.columns = sorted({column for row in self.rows for column in row.columns})
        super().__init__(f"witnessed checkpoint {describe(self.rows)} damaged")


def describe(rows: Sequence[Damaged]) -> str:
    """`row 4 (size)` or `rows 4 (size), 9 (note, root_hash)`."""
    named = ", ".join(f"{row.id} ({', '.join(row.columns)})" for row in rows)
    return f"{'row' if len(rows) == 1 else 'rows'} {named}"


# Built once, as checkpoints.py's: SQLite hands back whatever a column holds (text that is not
# UTF-8 fails the whole query): read as NULL where it holds no integer, no bytes.
_SQLITE_SIZE = case((func.typeof(W.size) == "integer", W.size))
_SQLITE_ROOT = case((func.typeof(W.root_hash) == "blob", W.root_hash))


# A set-aside date that no date reads as is not NULL: `set_aside_at IS NULL` took the row for
# set aside, passed it over, and checked the peer's next checkpoints against an older one (a
# history forked since was cosigned; from review). SQLite keeps any value (a number, bytes,
# text of no time: `datetime()` gives NULL for it); PostgreSQL keeps `infinity`, which the
# driver cannot give back.
_NO_SET_ASIDE_DATE = {
    "sqlite": (func.typeof(W.set_aside_at) != "text") | func.datetime(W.set_aside_at).is_(None),
    "postgresql": ~func.isfinite(W.set_aside_at),
}
SET_ASIDE_DAMAGED = 2  # the part of the anchor statement that reads them


def _columns(dialect: str) -> tuple[ColumnElement[Any], ...]:
    size: ColumnElement[Any] = W.size.expression
    root: ColumnElement[Any] = W.root_hash.expression  # bigint and bytea hold nothing else
    note: ColumnElement[Any] = W.note.expression  # as checkpoints.stored_note, for readable_note
    if dialect == "sqlite":
        size, root, note = _SQLITE_SIZE, _SQLITE_ROOT, cast(W.note, LargeBinary)
    return W.id.expression, size, root, note


def _row(row_id: int, size: object, root: object, stored: object) -> Stored | Damaged:
    note = readable_note(stored)
    shown = _checkpoint(note)
    if (
        note is not None
        and shown is not None
        and isinstance(size, int)
        and isinstance(root, bytes)
        and (shown.size, shown.root_hash) == (size, root)
        and size <= MAX_SIZE
    ):
        return Stored(row_id, size, root, note)
    size_ok = isinstance(size, int) and 0 <= size <= MAX_SIZE
    root_ok = isinstance(root, bytes) and len(root) == HASH_SIZE
    return Damaged(
        row_id,
        tuple(
            column
            for column, ok in (
                ("size", size_ok and (shown is None or shown.size == size)),
                ("root_hash", root_ok and (shown is None or shown.root_hash == root)),
                ("note", shown is not None),
            )
            if not ok
        ),
    )


def _checkpoint(note: str | None) -> Checkpoint | None:
    """The checkpoint a stored note holds: its text, up to the blank line before the
    signatures (checked when the peer showed it)."""
    end = -1 if note is None else note.find("\n\n")
    if note is None or end < 0:
        return None
    try:
        return Checkpoint.parse(note[: end + 1])
    except NoteError:
        return None


def read(
    session: Session, where: ColumnElement[bool], *order: Any, limit: int | None = None
) -> list[Stored | Damaged]:
    statement = (
        select(*_columns(session.get_bind().dialect.name))
        .where(where)
        .order_by(*order)
        .limit(limit)
    )
    return [_row(*row) for row in session.execute(statement).tuples()]


def largest_known(session: Session, authority: str) -> Stored | None:
    """The peer's largest witnessed checkpoint not set aside: what its next ones are checked
    against. WitnessedDamaged if it, or any whose size is no size of a log, or the newest
    is damaged: taken as it is, or passed over, it could let a forked history
    through. One statement (a witness's check reads it twice)."""
    statement = _anchor_statement(session.get_bind().dialect.name)
    found = [
        (part, Damaged(row[0], ("set_aside_at",)) if part == SET_ASIDE_DAMAGED else _row(*row))
        for part, *row in session.execute(statement, {"peer": authority})
    ]
    damaged = {row.id: row for _, row in found if isinstance(row, Damaged)}
    if damaged:
        raise WitnessedDamaged(authority, list(damaged.values()))
    return next((row for part, row in found if part == 0 and isinstance(row, Stored)), None)


@lru_cache(maxsize=4)
def _anchor_statement(dialect: str) -> CompoundSelect[Any]:
    """The largest live row (part 0); any whose size is no size of a log (SQLite sorts text
    and bytes above every number: past MAX_SIZE); and the newest, where a size lowered to a
    fraction or below the others would pass the anchor over: a peer's checkpoints mostly
    arrive in order, so its largest row is mostly its newest. Not when an older checkpoint
    was shown after a newer one (a receipt settled late): it is stored, as what a restore of
    the peer may be proven to extend (`_after_restore`), and the largest, no longer the
    newest, is read by its size alone. Each on the (peer, size, root) index or the (peer,
    id) one."""
    live = (W.peer_authority == bindparam("peer")) & W.set_aside_at.is_(None)
    columns = _columns(dialect)
    parts = [
        select(literal(0), *columns).where(live).order_by(W.size.desc(), W.id.desc()).limit(1),
        select(literal(1), *columns).where(live, W.size < 0),
        select(literal(1), *columns).where(live, W.size > MAX_SIZE),
    ]
    parts.append(select(literal(1), *columns).where(live).order_by(W.id.desc()).limit(1))
    if dialect in _NO_SET_ASIDE_DATE:
        set_aside = (W.peer_authority == bindparam("peer")) & W.set_aside_at.is_not(None)
        parts.append(
            select(literal(SET_ASIDE_DAMAGED), *columns).where(
                set_aside, _NO_SET_ASIDE_DATE[dialect]
            )
        )
    return union_all(*(select(part.subquery()) for part in parts))


def read_checked(session: Session, authority: str, where: ColumnElement[bool]) -> list[Stored]:
    """The peer's rows matching `where`, for a check: WitnessedDamaged if any is damaged."""
    rows = read(session, (W.peer_authority == authority) & where, W.id)
    damaged = [row for row in rows if isinstance(row, Damaged)]
    if damaged:
        raise WitnessedDamaged(authority, damaged)
    return [row for row in rows if isinstance(row, Stored)]


def cosigned(session: Session, authority: str) -> str | None:
    """The peer's largest witnessed checkpoint's note with our cosignature line appended."""
    known = largest_known(session, authority)
    if known is None:
        return None
    stored = session.scalar(select(stored_text(session, W.cosignature)).where(W.id == known.id))
    cosignature = readable_note(stored)
    if stored is not None and cosignature is None:
        raise WitnessedDamaged(authority, [Damaged(known.id, ("cosignature",))])
    return known.note + (cosignature or "")


@dataclass(frozen=True)
class Listed:
    """A row as the auditor's API and doctor see it: what reads, and what does not."""

    id: int
    peer: str | None
    row: Stored | Damaged
    cosignature: str | None
    dates: dict[str, datetime | None]
    damaged: tuple[str, ...]  # every column that cannot be read, or is not its note's


def listing(
    session: Session, *, limit: int, peer: str | None = None, before: int | None = None
) -> list[Listed]:
    """Up to `limit` rows (of `peer`, below id `before`) newest first, every column read
    apart from the others."""
    statement = select(
        *_columns(session.get_bind().dialect.name),
        stored_text(session, W.peer_authority),
        stored_text(session, W.cosignature),
    ).order_by(W.id.desc())
    if peer is not None:
        statement = statement.where(W.peer_authority == peer)
    if before is not None:
        statement = statement.where(W.id < before)
    rows = session.execute(statement.limit(limit)).tuples().all()
    ids = [row[0] for row in rows]
    dates = {name: column_dates(session, W.id, getattr(W, name), ids) for name in DATES}
    found = []
    for row_id, size, root, note, stored_peer, stored_cosignature in rows:
        row = _row(row_id, size, root, note)
        authority = readable_note(stored_peer)
        cosignature = readable_note(stored_cosignature)
        damaged = (
            *(("peer_authority",) if authority is None else ()),
            *(row.columns if isinstance(row, Damaged) else ()),
            *(("cosignature",) if cosignature is None and stored_cosignature is not None else ()),
            *(name for name in DATES if row_id in dates[name][1]),
        )
        read_dates = {name: dates[name][0].get(row_id) for name in DATES}
        found.append(Listed(row_id, authority, row, cosignature, read_dates, damaged))
    return found


def view(listed: Listed) -> dict[str, Any]:
    """The auditor's view of a row: a damaged value is null, and named, never shown."""
    row = listed.row
    shown: dict[str, Any] = {
        "peer": listed.peer,
        "size": row.size if isinstance(row, Stored) else None,
        "root_hash": row.root_hash.hex() if isinstance(row, Stored) else None,
        "cosigned": (
            row.note + (listed.cosignature or "")
            if isinstance(row, Stored) and "cosignature" not in listed.damaged
            else None
        ),
        **listed.dates,
    }
    if listed.damaged:
        shown["row"] = listed.id
        shown["damaged"] = list(listed.damaged)
    return shown


@dataclass(frozen=True)
class Damage:
    rows: dict[str, list[int]]  # by column
    held: list[str]  # peers whose witnessing a damaged row holds


def find_damage(session: Session, peers: Sequence[str], *, newest: int = DOCTOR_ROWS) -> Damage:
    """For doctor: the newest rows (more than the auditor's API lists), and those the check
    of each of `peers` reads, which hold its witnessing. Not every row: a peer's checkpoints
    pile up by the minute, and a row no check reads holds nothing."""
    found: dict[str, set[int]] = {}
    held = []
    for listed in listing(session, limit=newest):
        for column in listed.damaged:
            found.setdefault(column, set()).add(listed.id)
    for peer in peers:
        try:
            largest_known(session, peer)
        except WitnessedDamaged as exc:
            held.append(peer)
            for row in exc.rows:
                for column in row.columns:
                    found.setdefault(column, set()).add(row.id)
    return Damage({column: sorted(found[column]) for column in sorted(found)}, held)

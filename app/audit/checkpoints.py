"""Signed checkpoints of the node's own log (C2SP tlog-checkpoint, signed-note format).

A checkpoint is signed every N entries or T seconds (by whichever delivery worker notices
first) and on demand. Signing locks the log head, so two workers never sign two different
checkpoints of the same size, and checks first that every entry since the latest checkpoint
carries its MAC (app/audit/mac.py): nothing is signed over an entry no key vouches for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

from nacl.signing import SigningKey
from sqlalchemy import ColumnElement, LargeBinary, case, cast, event, func, null, select
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.audit.index import INDEX_BATCH, catch_up
from app.audit.log import HEAD_ID, lock_head, mark_checkpointed
from app.audit.mac import MACS_EXTENSION, check_macs, mac_key
from app.audit.note import (
    Checkpoint,
    NoteError,
    Verifier,
    format_verifier_key,
    open_note,
    sign_note,
)
from app.audit.verify import FUTURE_MARGIN, TIME_EXTENSION
from app.crypto.encoding import format_time, utc_now
from app.db import undecodable_column
from app.errors import EntraideError
from app.models import AuditCheckpoint, AuditHead, AuditIndex

log = logging.getLogger(__name__)


class LogProgress(Protocol):
    """How far the log is, and how far its last checkpoint reached (the head row)."""

    @property
    def size(self) -> int: ...

    @property
    def last_checkpoint_size(self) -> int: ...


def log_origin(authority_id: str) -> str:
    """The log's name: checkpoint origin line and signer name (no spaces, no '+')."""
    return f"entraide.log/{authority_id}"


def log_verifier(authority_id: str, log_public: bytes) -> Verifier:
    return Verifier(log_origin(authority_id), log_public)


def log_verifier_key(authority_id: str, log_key: SigningKey) -> str:
    return format_verifier_key(log_origin(authority_id), log_key.verify_key)


class SignedSize(Protocol):
    @property
    def size(self) -> int: ...


class Anchor(Protocol):
    """What the log key signed, kept outside the database (app/audit/anchor.py)."""

    def read(self) -> SignedSize | None: ...
    def problem(self, session: Session, size: int, root: bytes) -> str | None: ...
    def check(self, session: Session, size: int, root: bytes) -> None: ...
    def remember(self, size: int, root: bytes) -> None: ...
    def alarm(self, problem: object, message: str) -> None: ...


class LogRewritten(EntraideError):
    """An entry no checkpoint covers yet carries no valid MAC (app/audit/mac.py): it was
    written or rewritten by someone without the log key. Never input, an alarm: nothing is
    signed over it."""

    status_code = 500
    code = "audit_log_rewritten"


def sign_checkpoint(
    session: Session, *, authority_id: str, log_key: SigningKey, anchor: Anchor | None = None
) -> SignedCheckpoint:
    """Sign the current head, unless the latest checkpoint covers it already. With `anchor`,
    only a head that extends what was signed before (LogRolledBack otherwise), and what is
    signed is recorded there once committed."""
    head = lock_head(session)
    if anchor is not None:
        anchor.check(session, head.size, head.root_hash)
    existing = latest_signed(session, log_verifier(authority_id, bytes(log_key.verify_key)))
    if existing is not None and (existing.size, existing.root_hash) == (head.size, head.root_hash):
        # Recorded too (forward only: nothing if it is already): a node from before the
        # record gets one on its first checkpoint, even with nothing new to sign.
        _remember_after_commit(session, anchor, head.size, head.root_hash)
        return existing
    # Nothing signs what no key vouches for: every entry since the latest checkpoint must
    # carry its MAC (app/audit/mac.py), or a database writer's rewrite would be signed here.
    found = check_macs(
        session,
        mac_key(log_key),
        start=0 if existing is None else existing.size,
        end=head.size,
        legacy=not macs_required(existing, anchor),
        head_root=head.root_hash,  # what is signed is the head's root: vouched for, or not signed
    ).problem
    if found is not None:
        if anchor is not None:
            anchor.alarm(("rewritten", found), found[1])  # once, not at every worker round
        else:
            log.critical("audit log rolled back or rewritten: %s", found[1])
        raise LogRewritten(found[1])
    origin = log_origin(authority_id)
    now = utc_now()
    if head.last_time is not None and head.last_time > now + FUTURE_MARGIN:
        # Entries never go back in time: one dated ahead (an edited last entry) stamps every
        # later one with its time. The checkpoint says when it was signed, so `audit verify`
        # names them for good; this says so now.
        log.error(
            "the audit log's last entry is dated %s, after this node's clock (%s): the clock "
            "was set back after running fast, or the entry's time was pushed ahead; "
            "`entraide audit verify --db` names the entries no checkpoint was signed at",
            format_time(head.last_time),
            format_time(now),
        )
    extensions = (f"{TIME_EXTENSION}{format_time(now)}", MACS_EXTENSION)
    body = Checkpoint(origin, head.size, head.root_hash, extensions=extensions).format()
    checkpoint = AuditCheckpoint(
        size=head.size,
        root_hash=head.root_hash,
        note=sign_note(body, origin, log_key),
        created_at=now,
    )
    session.add(checkpoint)
    mark_checkpointed(session)
    session.flush()
    _remember_after_commit(session, anchor, head.size, head.root_hash)
    return SignedCheckpoint(
        head.size, head.root_hash, checkpoint.note, checkpoint.created_at, macs_after=True
    )


def macs_required(latest: SignedCheckpoint | None, anchor: Anchor | None) -> bool:
    """Must every entry after `latest` carry a MAC? Yes once a checkpoint says so (signed by a
    node of this version), or once the record beside the keys reaches past `latest`: then
    checkpoints were removed from the database (to make an older one, signed before MACs,
    the latest), and no entry is let off. No while the latest checkpoint was signed by a node
    of an earlier version, or there is none (a first release signed none): the entries after
    it may have been appended by one (before the upgrade, or by a process of it still
    running), which could not MAC them (docs/audit.md §4)."""
    if latest is not None and latest.macs_after:
        return True
    try:
        record = anchor.read() if anchor is not None else None
    except EntraideError:  # unreadable: what it says is unknown, so nothing is let off
        return True
    return record is not None and record.size > (0 if latest is None else latest.size)


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint as its note says, the note's signature checked with the log key: never
    as the row's `size` and `root_hash` columns say, which anyone with SQL access can change
    without the key (a size raised past the log's stops every checkpoint after it; a stale
    row given the head's size is handed out as covering it)."""

    size: int
    root_hash: bytes
    note: str
    created_at: datetime | None  # None: the row's date cannot be read (checkpoint_dates)
    macs_after: bool = False  # its note says every later entry carries a MAC


# Rows are read by their size column, largest first, a page at a time: the first whose note
# verifies and agrees with its columns is the latest checkpoint (columns raised past their
# note, forged notes and copies are passed over; an id cannot be trusted to say which row is
# newest: PostgreSQL takes any id an INSERT names without moving its sequence). Past
# LATEST_PAGES pages of forged rows, none: a checkpoint is then due each round, and `audit
# verify --db` names every one of those rows.
LATEST_PAGE = 16
LATEST_PAGES = 64
# Our notes: an origin, a size, a root and one signature line, a few hundred bytes.
OUR_NOTE_BYTES = 1024


@lru_cache(maxsize=LATEST_PAGE * LATEST_PAGES)
def opened_checkpoint(note: str, origin: str, log_public: bytes) -> Checkpoint | None:
    """The checkpoint a note signs with this log key, or None. Cached: the worker and every
    receipt read the same few notes, and a note that verified once always will."""
    try:
        text, _ = open_note(note, [Verifier(origin, log_public)])
        checkpoint = Checkpoint.parse(text)
    except NoteError:
        return None
    return checkpoint if checkpoint.origin == origin else None


def latest_signed(session: Session, verifier: Verifier) -> SignedCheckpoint | None:
    """The latest checkpoint this node signed, its date read with it: one query, as a batch
    of receipts reads it once. Where a date among the rows cannot be read (damaged
    storage), read again without dates, and the chosen row's date apart: None if it is
    the damaged one, which takes nothing from its signed note."""
    try:
        return _latest_signed(session, verifier, dated=True)
    except _DATE_ERRORS as exc:
        if not _date_unreadable(exc):
            raise
    return _latest_signed(session, verifier, dated=False)


def _latest_signed(session: Session, verifier: Verifier, *, dated: bool) -> SignedCheckpoint | None:
    query = (
        select(
            AuditCheckpoint.id,
            stored_size(session),
            # As bytes even where a row was rewritten as text (SQLite keeps any type): a
            # forged row is passed over, it does not raise in every worker round.
            cast(AuditCheckpoint.root_hash, LargeBinary),
            stored_note(session),
            AuditCheckpoint.created_at if dated else null(),
        )
        .where(
            # Never one of more entries than the log holds (a note signed before a restore, put
            # back: it covers no log there is now).
            AuditCheckpoint.size
            <= select(AuditHead.size).where(AuditHead.id == HEAD_ID).scalar_subquery()
        )
        .order_by(AuditCheckpoint.size.desc(), AuditCheckpoint.id.desc())
    )
    for page in range(LATEST_PAGES):
        rows = session.execute(query.offset(page * LATEST_PAGE).limit(LATEST_PAGE)).all()
        for row_id, size, root_hash, stored, created_at in rows:
            note = readable_note(stored)
            # One that cannot be read (damaged storage) is no note of ours either: named by
            # `audit verify --db` and doctor, it failed every receipt here (from review).
            if note is None or len(note) > OUR_NOTE_BYTES:  # nor kept in the cache
                continue
            opened = opened_checkpoint(note, verifier.name, verifier.public_key)
            if opened is not None and (opened.size, opened.root_hash) == (size, bytes(root_hash)):
                macs = MACS_EXTENSION in opened.extensions
                if not dated:
                    created_at = checkpoint_dates(session, [row_id]).get(row_id)
                return SignedCheckpoint(opened.size, opened.root_hash, note, created_at, macs)
        if len(rows) < LATEST_PAGE:
            return None
    return None


# The newest checkpoints read to tell whose log a database holds.
OWNER_PROBE = 8
ANOTHER_NODES_DATABASE = (
    "{why}: ENTRAIDE_DATABASE_URL names another node's database, or ENTRAIDE_KEYS_DIR "
    "({keys}) another node's keys; check both (nothing was changed)"
)


def foreign_log(session: Session, authority_id: str, log_public: bytes) -> str | None:
    """Why this database's audit log is not this node's, or None.

    A log key never changes (`keys rotate` keeps it), so the checkpoints of a node's own
    database verify with its key. When none of its first and newest ones does and every one
    that reads names another log, or this log under another key, the keys and the database
    are of two nodes (a copied settings file, a mistyped database URL): the node said
    "rolled back or rewritten", served as ready, and took envelopes into the other node's
    database (from review). None where there is no checkpoint, or none that reads: other
    checks name those."""
    own = log_origin(authority_id)
    # The first checkpoints (`init` signs one) as well as the newest: someone who may write
    # to the database but holds no log key can add rows no key of ours signed, not make the
    # node's first ones its own (from review: eight forged rows made a node "another's").
    rows = [
        *session.execute(
            select(stored_note(session)).order_by(AuditCheckpoint.id).limit(OWNER_PROBE)
        ).scalars(),
        *session.execute(
            select(stored_note(session))
            .order_by(AuditCheckpoint.size.desc(), AuditCheckpoint.id.desc())
            .limit(OWNER_PROBE)
        ).scalars(),
    ]
    origins = set()
    for stored in rows:
        note = readable_note(stored)
        if note is None:
            continue
        if opened_checkpoint(note, own, log_public) is not None:
            return None
        origins.add(note.split("\n", 1)[0])
    if not origins:
        return None
    others = sorted(origin.removeprefix("entraide.log/") for origin in origins - {own})
    if others:
        return f"the database holds the audit log of {' and '.join(others)}, not {authority_id}'s"
    return f"the database's audit log is signed by another log key than {authority_id}'s"


# An expression, built once: built at each call, it cost every receipt's read of the latest
# checkpoint more than the query itself takes SQLite to run.
_INTEGER_SIZE = case((func.typeof(AuditCheckpoint.size) == "integer", AuditCheckpoint.size))


def stored_size(session: Session) -> ColumnElement[Any]:
    """The size column where it holds a number of entries, else NULL (never NULL otherwise).
    SQLite keeps any value in it, and its driver fails the whole query on text that is not
    UTF-8 (a damaged page, a hand edit): text, bytes and fractions are read as NULL there,
    never handed back. PostgreSQL's bigint holds integers only: read as it is."""
    if session.get_bind().dialect.name == "sqlite":
        return _INTEGER_SIZE
    return AuditCheckpoint.size.expression


def stored_note(session: Session) -> ColumnElement[Any]:
    """The note column as the driver can always give it back, for `readable_note`. SQLite
    keeps any value in it, and its driver fails the whole query on text that is not UTF-8
    (a damaged page, a hand edit): read as bytes there. PostgreSQL holds valid text only,
    and its cast of text to bytea would parse backslashes: read as it is."""
    return stored_text(session, AuditCheckpoint.note)


def stored_text(session: Session, column: InstrumentedAttribute[Any]) -> ColumnElement[Any]:
    """A text column as `stored_note` reads the note, for `readable_note`."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(column, LargeBinary)
    return column.expression


def readable_note(stored: object) -> str | None:
    """A note as `stored_note` read it, or None where the stored value is no text (damaged
    storage, which `audit verify --db` and doctor name): never a note of ours."""
    if isinstance(stored, str):
        return stored
    if isinstance(stored, bytes | memoryview):
        try:
            return bytes(stored).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def checkpoint_notes(session: Session) -> list[tuple[int, str | None]]:
    """Each checkpoint row's id and note, by id; None where the note cannot be read."""
    rows = session.execute(
        select(AuditCheckpoint.id, stored_note(session)).order_by(AuditCheckpoint.id)
    )
    return [(row_id, readable_note(stored)) for row_id, stored in rows]


def unsized_checkpoints(session: Session) -> list[int]:
    """The checkpoint rows, by id, whose size is no number of entries (`stored_size`):
    passed over as no checkpoint of this log, as one whose note cannot be read."""
    statement = select(AuditCheckpoint.id).where(stored_size(session).is_(None))
    return list(session.scalars(statement.order_by(AuditCheckpoint.id)))


def checkpoint_dates(
    session: Session, rows: Sequence[int] | None = None
) -> dict[int, datetime | None]:
    """Each checkpoint row's date (of `rows`, or of every row), None where the stored value
    cannot be read: damaged storage, which `audit verify --db` and doctor name. No signature
    covers a row's date, so a damaged one takes nothing from its checkpoint; read with the
    rest, it failed every command and call that read the latest checkpoint, receipts
    included (from review)."""
    dates, unreadable = column_dates(session, AuditCheckpoint.id, AuditCheckpoint.created_at, rows)
    return {**dates, **dict.fromkeys(unreadable)}


def column_dates(
    session: Session,
    key: InstrumentedAttribute[int],
    column: InstrumentedAttribute[Any],
    rows: Sequence[int] | None = None,
) -> tuple[dict[int, datetime | None], set[int]]:
    """Each row's date in `column` (of `rows`, or of every row), and apart the rows whose
    stored value cannot be read (damaged storage). All at once; row by row only once that
    fails."""
    statement = select(key, column)
    if rows is not None:
        statement = statement.where(key.in_(rows))
    try:
        return dict(session.execute(statement).tuples().all()), set()
    except _DATE_ERRORS as exc:
        if not _date_unreadable(exc):
            raise
    found: dict[int, datetime | None] = {}
    unreadable: set[int] = set()
    for row in rows if rows is not None else session.scalars(select(key)).all():
        try:
            found[row] = session.scalar(select(column).where(key == row))
        except _DATE_ERRORS as exc:
            if not _date_unreadable(exc):
                raise
            unreadable.add(row)
    return found, unreadable


# What reading back a date the driver cannot read raises: SQLite's text that is no date
# (ValueError) or a value that is no text (TypeError), PostgreSQL's `infinity`, which
# Python's datetime cannot hold (DataError, raised by the driver as it reads: the
# transaction goes on), and SQLite's text that is not UTF-8 (app/db.py).
_DATE_ERRORS = (ValueError, TypeError, OverflowError, DataError, OperationalError)


def _date_unreadable(exc: Exception) -> bool:
    return not isinstance(exc, OperationalError) or undecodable_column(exc) is not None


def _remember_after_commit(session: Session, anchor: Anchor | None, size: int, root: bytes) -> None:
    if anchor is not None:
        event.listen(
            session, "after_commit", lambda _session: _remember(anchor, size, root), once=True
        )


# Processes that could not write the record (a keys folder mounted read-only, as in
# docker-compose.yml): said once, not at every checkpoint.
_UNRECORDED: set[int] = set()


def _remember(anchor: Anchor, size: int, root: bytes) -> None:
    try:
        anchor.remember(size, root)
    except OSError as exc:  # committed and signed already; the next checkpoint may record it
        if exc.errno not in _UNRECORDED:
            _UNRECORDED.add(exc.errno or 0)
            log.warning(
                "could not record the signed checkpoint beside the keys (%s): this process "
                "cannot tell a rolled-back audit log from the database alone",
                exc.strerror,
            )


def checkpoint_due(
    head: LogProgress, latest: datetime | None, *, every: int, seconds: float
) -> bool:
    """Pure rule: N new entries, or T seconds since the last checkpoint with anything new."""
    new_entries = head.size - head.last_checkpoint_size
    if new_entries <= 0 and latest is not None:
        return False
    if new_entries >= every or latest is None:
        return True
    return utc_now() - latest >= timedelta(seconds=seconds)


@dataclass(frozen=True)
class Progress:
    size: int
    last_checkpoint_size: int
    latest_checkpoint_at: datetime | None
    indexed: int  # entries in the query index (app/audit/index.py)


_LONG_AGO = datetime.fromtimestamp(0, UTC)
DATE_MARGIN = timedelta(minutes=5)


def read_progress(session: Session, verifier: Verifier) -> Progress | None:
    """What the worker's log upkeep needs.

    How far checkpoints reach is read from the latest checkpoint's signed note, not from the
    head row's `last_checkpoint_size` nor a checkpoint row's `size`: numbers anyone with SQL
    access could raise to stop every checkpoint, leaving new entries unsigned (and
    rewritable) for as long as they liked. Its time, which no signature covers, counts only
    if it is not in the future (a row dated ahead would put off every checkpoint due by
    time)."""
    indexed = select(func.max(AuditIndex.idx))
    row = session.execute(
        select(AuditHead.size, indexed.scalar_subquery()).where(AuditHead.id == HEAD_ID)
    ).one_or_none()
    if row is None:
        return None
    size, largest = row
    latest = latest_signed(session, verifier)
    if latest is None:
        return Progress(size, 0, None, 0 if largest is None else largest + 1)
    # Its date, which no signature covers: a little ahead (another process's clock) is now,
    # far ahead counts as long ago (a date set ahead would put off checkpoints due by time).
    # Unreadable (damaged storage): long ago too, so a checkpoint with a readable one is due.
    now, at = utc_now(), latest.created_at
    latest_at = min(at, now) if at is not None and at <= now + DATE_MARGIN else _LONG_AGO
    return Progress(size, latest.size, latest_at, 0 if largest is None else largest + 1)


class CheckpointClock:
    """How long this process has seen the log's newest checkpoint stay the newest, on its own
    monotonic clock. A checkpoint row's date is no one's signature: dated a few minutes ahead
    (within DATE_MARGIN, which replicas' clocks need), and again after each checkpoint, it
    put off every checkpoint due by time until `every` entries piled up, leaving them
    unsigned and rewritable (from review). This bounds that: a checkpoint is due once this
    process has seen the same one newest for `seconds` with entries after it, whatever the
    row says."""

    def __init__(self) -> None:
        self._size: int | None = None
        self._since = 0.0

    def overdue(self, newest_size: int, seconds: float) -> bool:
        now = time.monotonic()
        # Only a checkpoint larger than any seen restarts the count: a row deleted and put
        # back (the newest seen going from N to an older N' and back) restarted it every
        # time, and put checkpoints off for good (from review).
        if self._size is None or newest_size > self._size:
            self._size, self._since = newest_size, now
            return False
        return now - self._since >= seconds


def maybe_checkpoint(
    session: Session,
    *,
    authority_id: str,
    log_key: SigningKey,
    every: int,
    seconds: float,
    anchor: Anchor | None = None,
    clock: CheckpointClock | None = None,
) -> SignedCheckpoint | None:
    """The delivery worker's upkeep of the log: index new entries, sign a checkpoint if due."""
    progress = read_progress(session, log_verifier(authority_id, bytes(log_key.verify_key)))
    if progress is None:
        return None
    due = checkpoint_due(progress, progress.latest_checkpoint_at, every=every, seconds=seconds)
    if clock is not None:
        overdue = clock.overdue(progress.last_checkpoint_size, seconds)
        due = due or (overdue and progress.size > progress.last_checkpoint_size)
    # In batches; everything up to the new checkpoint when one is signed.
    catch_up(session, size=progress.size, indexed=progress.indexed, batch=1 if due else INDEX_BATCH)
    if not due:
        return None
    from app.audit.anchor import LogRolledBack  # app.audit.anchor imports this module

    try:
        return sign_checkpoint(session, authority_id=authority_id, log_key=log_key, anchor=anchor)
    except (LogRolledBack, LogRewritten):
        # Logged critical where found, once per problem (not at every round, from review);
        # signing nothing more over a rewritten log is the point, stopping every delivery
        # with it is not (peers see no new checkpoint).
        return None
    except EntraideError as exc:  # no checkpoint, deliveries go on
        log.warning("no checkpoint signed: %s", exc.code)
        return None

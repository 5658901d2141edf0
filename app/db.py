"""Engine and session factory; the unit of work commits or rolls back in one place."""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Engine, Table, create_engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement

BUSY_TIMEOUT_SECONDS = 30
MUTEX_WAIT_SECONDS = 10
_HOLDS_WRITER = "entraide_holds_writer"
_CHANGES = "entraide_changes_at_begin"
_GROUP_SYNC = "entraide_group_sync"
_NO_WAIT = "entraide_commit_no_wait"


class _SQLiteWriters:
    """One engine's writers: queued on a mutex, and made durable together (group commit).

    Queueing: this process's transactions wait for SQLite's write lock on a mutex, woken the
    moment it is free. Left to SQLite, a waiting writer sleeps and polls (busy_timeout backs
    off up to 100 ms a try): under load the lock sits free while waiters sleep, and the
    delivery worker's thread starves behind the API's. This only orders waiters: SQLite's lock
    still guards the data and orders this process against others (`entraide worker`).

    Group commit: with synchronous=FULL, SQLite fsyncs the WAL inside every COMMIT, holding
    the write lock, so a node commits at most one transaction per fsync (4 ms and more on a
    virtual disk). Instead the connection runs with synchronous=NORMAL (commits are atomic and
    ordered, the WAL is synced at checkpoints) and every commit that wrote returns only once
    an fsync of the WAL that began after it has finished; the transactions that committed
    meanwhile share that fsync. A 201 still means the rows are on disk: the commit returns,
    as before, only when they are.
    """

    def __init__(self) -> None:
        # The WAL SQLite writes (`use`); None: no file to sync (in memory), SQLite's own FULL
        # syncing stays.
        self.wal: Path | None = None
        self._database: Path | None = None
        # Set once a sync failed: see DurabilityLost.
        self.failure: str | None = None
        self._mutex = threading.Lock()
        self._sync = threading.Condition()
        self._committed = 0  # commits that wrote, numbered in order
        self._synced = 0  # every commit up to this number is on disk
        self._syncing = False
        self._wal_inode: int | None = None

    def use(self, database: Path) -> None:
        """The database file as SQLite opened it (symbolic links resolved, as SQLite does:
        its WAL is beside the real file, not beside the link)."""
        self._database = database
        self.wal = database.with_name(database.name + "-wal")

    def begin(self, connection: Any) -> None:
        if self.failure is not None:
            # Nothing more is committed, read or written, once durability is lost: a write
            # committed now could not be acknowledged, yet the worker would deliver it.
            raise DurabilityLost(self.failure)
        info = connection.info
        if not info.get(_HOLDS_WRITER):
            # Past a while, go on without it and let SQLite's own busy wait decide, as before
            # (a transaction nested in another of the same thread fails, it does not hang).
            info[_HOLDS_WRITER] = self._mutex.acquire(timeout=MUTEX_WAIT_SECONDS)
        info[_CHANGES] = connection.connection.dbapi_connection.total_changes
        info.pop(_NO_WAIT, None)

    def end(self, pooled: Any, *, committed: bool) -> None:
        """After the COMMIT or ROLLBACK itself: let the next writer in, then wait for disk."""
        try:
            info = pooled.info
        except NotImplementedError:  # the engine's first-connect check, outside the pool
            return
        before = info.pop(_CHANGES, None)
        no_wait = info.pop(_NO_WAIT, False)
        wrote = (
            committed
            and not no_wait
            and info.get(_GROUP_SYNC, False)
            and before is not None
            and before != pooled.dbapi_connection.total_changes
        )
        self.release(info)
        if wrote:
            self._durable()

    def release(self, info: dict[Any, Any]) -> None:
        if info.pop(_HOLDS_WRITER, False):
            self._mutex.release()

    def _durable(self) -> None:
        with self._sync:
            self._committed += 1
            ticket = self._committed
        while True:
            with self._sync:
                while self._syncing and self._synced < ticket:
                    self._sync.wait()
                if self._synced >= ticket:  # made durable by a sync before any failure
                    return
                if self.failure is not None:
                    raise DurabilityLost(self.failure)
                self._syncing = True
                target = self._committed  # every commit numbered so far is in the file
            synced = False
            try:
                self._fsync_wal()
                synced = True
            except _FsyncFailed as failed:
                # Never retried: after a failed fsync the kernel may have dropped the dirty
                # pages, and a second fsync would succeed without writing them.
                with self._sync:
                    self.failure = (
                        f"a sync of the database failed ({_errno_name(failed.cause)}); what "
                        "was committed since the last sync may not be on disk: check the "
                        "disk, then restart the node"
                    )
                raise DurabilityLost(self.failure) from failed.cause
            except OSError as exc:
                # The file could not be opened to sync it (out of descriptors, say): nothing
                # was lost, and the next sync covers this commit too. Only this one fails.
                raise DurabilityLost(
                    f"the database could not be synced ({_errno_name(exc)}); retry"
                ) from exc
            finally:
                with self._sync:
                    self._syncing = False
                    if synced:
                        self._synced = max(self._synced, target)
                    self._sync.notify_all()

    def _fsync_wal(self) -> None:
        if self.wal is None or self._database is None:
            return
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            # Checkpointed into the database and removed (its last connection closed): sync
            # the database file itself rather than assume SQLite did.
            fd = os.open(self._database, os.O_RDONLY)
        try:
            inode = os.fstat(fd).st_ino
            _fsync(fd)
            if inode != self._wal_inode:
                # A new WAL file: its directory entry must reach the disk too.
                directory = os.open(self.wal.parent, os.O_RDONLY)
                try:
                    _fsync(directory)
                finally:
                    os.close(directory)
                self._wal_inode = inode
        finally:
            os.close(fd)


class _FsyncFailed(Exception):
    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _FsyncFailed(exc) from exc


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


class DurabilityLost(RuntimeError):
    """A sync of the SQLite database failed. What was committed since the last good sync may
    not be on disk, and the failure is not retried (a second fsync can succeed without
    writing the pages the first one lost): every later transaction fails with this at its
    start, so nothing more is committed or acknowledged, until the node is restarted (as
    PostgreSQL stops on a failed fsync). Also raised, once and without that, when the file
    could not even be opened to sync it."""


_WRITERS: weakref.WeakKeyDictionary[Engine, _SQLiteWriters] = weakref.WeakKeyDictionary()


def durability_failure(engine: Engine) -> str | None:
    """Why this engine's commits can no longer be acknowledged, or None (readiness)."""
    writers = _WRITERS.get(engine)
    return writers.failure if writers is not None else None


def _configure_sqlite(engine: Engine) -> None:
    writers = _SQLiteWriters()
    _WRITERS[engine] = writers

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        # The file SQLite opened, as it names it ('' in memory): with a symbolic link, the
        # real file, beside which SQLite keeps the WAL that must be synced.
        opened = next(
            (row[2] for row in cursor.execute("PRAGMA database_list") if row[1] == "main"), ""
        )
        # A 201 must survive a power cut: either the commit waits for our fsync of the WAL
        # (group commit, _SQLiteWriters), or SQLite syncs inside every COMMIT.
        group_sync = bool(opened) and str(mode).lower() == "wal"
        if group_sync and writers.wal is None:
            writers.use(Path(opened))
        record.info[_GROUP_SYNC] = group_sync
        cursor.execute(f"PRAGMA synchronous={'NORMAL' if group_sync else 'FULL'}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
        # What is deleted or overwritten is zeroed on disk, not left in free pages (an erased
        # value must not stay readable in a copy of the file). Debian builds SQLite with it
        # on; upstream's default is off, so it is asked for, not assumed.
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_SNAPSHOT):
            # Deferred: in WAL mode a reader sees one snapshot from its first read and holds
            # off no writer (`read_snapshot`); it never writes, so it needs no writer's turn.
            connection.exec_driver_sql("BEGIN")
            return
        writers.begin(connection)
        # IMMEDIATE takes the write lock up front: a deferred transaction that later writes
        # can fail with SQLITE_BUSY without waiting, which busy_timeout cannot help.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        _name_undecodable(context)

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        # Normally released at COMMIT or ROLLBACK; this catches a connection invalidated
        # mid-transaction (closed without either), so the mutex is never lost with it.
        writers.release(record.info)

    # After the statement, not before it as the engine's commit/rollback events are: the
    # pool's reset on return goes through do_rollback too.
    dialect = engine.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def do_commit(pooled: PoolProxiedConnection) -> None:
        try:
            commit(pooled)
        except BaseException:
            writers.end(pooled, committed=False)
            raise
        writers.end(pooled, committed=True)

    def do_rollback(pooled: PoolProxiedConnection) -> None:
        try:
            rollback(pooled)
        finally:
            writers.end(pooled, committed=False)

    # Per engine, on its own dialect instance: SQLAlchemy has no event after a COMMIT.
    dialect.do_commit = do_commit  # type: ignore[method-assign,assignment]  # see above
    dialect.do_rollback = do_rollback  # type: ignore[method-assign,assignment]  # see above


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_SECONDS}
        )
        _configure_sqlite(engine)
        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    _configure_postgresql(engine)
    return engine


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _in_utc(dbapi_connection: Any, _record: Any) -> None:
        # A timestamptz is read back in the session's time zone, which is the server's or the
        # database's setting (or PGTZ) unless set: in one east of UTC, the latest instant
        # stored (9999-12-31T23:59:59Z) is past what the driver reads (year 10000), and the
        # request, its proof and the whole backup can no longer be read. In UTC every stored
        # instant reads back. Committed: a SET in a transaction rolled back is undone.
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        _name_unloadable(context)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def commit_without_waiting(session: Session) -> None:
    """Let this transaction's commit return before its rows reach the disk.

    Only for a transaction whose loss in a power cut is harmless and that nobody outside sees
    before a later commit: the delivery worker's claim (lost, the row is claimed and posted
    again, and the receiver answers a repeat with its stored receipt). It is still atomic and
    ordered: the next commit that waits for the disk takes it along (SQLite: the WAL fsync;
    PostgreSQL: `synchronous_commit` off for this transaction only).
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
    else:
        connection.info[_NO_WAIT] = True


READ_SNAPSHOT = "entraide_read_snapshot"


@contextmanager
def read_snapshot(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A read-only transaction that sees the database as it stood at its first read and
    holds off no writer, for long reads of a running node (`audit verify --db`): on SQLite
    a deferred transaction in WAL mode (a unit of work takes the writer's lock up front, so
    the node could append nothing until the read ended), on PostgreSQL REPEATABLE READ."""
    session = factory()
    try:
        options: dict[str, Any] = {READ_SNAPSHOT: True}
        if session.get_bind().dialect.name == "postgresql":
            options["isolation_level"] = "REPEATABLE READ"
        session.connection(execution_options=options)
        yield session
    finally:
        session.rollback()  # nothing was written
        session.close()


@contextmanager
def reading(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A short read that writes nothing, for checks asked on every call (is this address
    blocked?): on SQLite a deferred transaction, which waits for no writer and holds none
    off (a unit of work takes the writer's lock up front, so each check queued behind, and
    held up, every write of the node); on PostgreSQL an ordinary one (READ COMMITTED: no
    snapshot to pin, no isolation level to set and reset)."""
    session = factory()
    try:
        if session.get_bind().dialect.name == "sqlite":
            session.connection(execution_options={READ_SNAPSHOT: True})
        yield session
    finally:
        session.rollback()  # nothing was written
        session.close()


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Commit if the block succeeds, roll back if it raises. Services only flush."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class PeriodicJob:
    """A transaction of a node's background loop (pruning, sweeping), run at most once per
    period, the first at once; several processes may run it at the same time."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job: Callable[[Session], int],
        *,
        every_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from app.clock import Every  # app.clock imports FastAPI: only a node's loop needs it

        self.sessions = sessions
        self.job = job
        self._every = Every(every_seconds, clock)

    def run_due(self) -> int | None:
        """What the job returned (how many rows it removed, say), or None when not due."""
        if not self._every.due():
            return None
        with unit_of_work(self.sessions) as session:
            return self.job(session)


# sqlite3's words for a TEXT value that is not UTF-8 (a BLOB rewritten as text by a hand edit,
# a damaged page): the whole row is unreadable. Followed by the text, which is not repeated.
_UNDECODABLE = re.compile(r"Could not decode to UTF-8 column '([^']{1,64})'")
# Where `_name_undecodable` leaves the column's "table.column" on the driver's exception.
_TABLE_COLUMN = "entraide_table_column"


def _name_undecodable(context: ExceptionContext) -> None:
    """sqlite3 names the column of a value it cannot decode as the query named it: its label
    (`requests_peer_authority`, `peer_authority_1`) or its bare name, never its table (from
    review: `stored_data_corrupt` said either, by route). The statement's own columns, in
    the context of its execution, say which table's column that is."""
    original = context.original_exception
    found = _UNDECODABLE.match(str(original)) if isinstance(original, sqlite3.Error) else None
    if found is None:
        return
    named = _table_column(context, found.group(1))
    if named is not None:
        setattr(original, _TABLE_COLUMN, named)


def _table_column(context: ExceptionContext, label: str) -> str | None:
    """The `table.column` of the statement's result column the driver named `label`, if
    one only."""
    compiled = getattr(context.execution_context, "compiled", None)
    if not isinstance(compiled, SQLCompiler):
        return None
    named = {  # SQLAlchemy's own record of the columns, by which its results map each row
        f"{base.table.name}.{base.name}"
        # A private attribute: should a SQLAlchemy release drop it, the column keeps the
        # driver's name (a test pins the table.column form), the error is not masked.
        for entry in getattr(compiled, "_result_columns", ())
        if label in (entry.name, entry.keyname)
        for element in entry.objects
        if isinstance(element, ColumnElement)
        for base in element.base_columns
        if isinstance(base, Column) and isinstance(base.table, Table)
    }
    return named.pop() if len(named) == 1 else None  # two of one name: left unnamed


# Set by `_name_unloadable` on a psycopg DataError raised while loading fetched rows.
_UNLOADABLE = "entraide_unloadable"


def _name_unloadable(context: ExceptionContext) -> None:
    """psycopg loads each value of a result as it is fetched, and raises DataError for one
    Python cannot hold (a time of 'infinity', or past the year 9999). Raised while fetching
    (SQLAlchemy passes no statement then: the statement ran) and by psycopg itself (no
    SQLSTATE: the server refused nothing), it is a value read back, damaged storage; any
    other DataError is the server's or psycopg's refusal of what the statement sent (a NUL
    character), the caller's input (from review: both answered `400 invalid_value`)."""
    import psycopg  # only a PostgreSQL engine has this listener

    original = context.original_exception
    if (
        context.statement is not None
        or context.execution_context is None
        or not isinstance(original, psycopg.DataError)
        or original.sqlstate is not None
    ):
        return
    setattr(original, _UNLOADABLE, True)
    # The execution's cursor: SQLAlchemy declares `context.cursor` but leaves it unset.
    label = _unloadable_label(getattr(context.execution_context, "cursor", None))
    if label is not None:
        setattr(original, _TABLE_COLUMN, _table_column(context, label) or label)


def _unloadable_label(cursor: Any) -> str | None:
    """The driver's name of the first result column holding a value psycopg cannot load: its
    error does not say. Each value fetched is loaded again, only after such a failure."""
    import psycopg
    from psycopg import pq

    result = getattr(cursor, "pgresult", None)
    fields = getattr(cursor, "description", None)
    if result is None or not fields:
        return None
    loaders = []
    for number, field in enumerate(fields):
        kind = cursor.adapters.get_loader(field.type_code, pq.Format(result.fformat(number)))
        loaders.append(kind(field.type_code, cursor) if kind is not None else None)
    for row in range(result.ntuples):
        for number, loader in enumerate(loaders):
            value = result.get_value(row, number)
            if loader is None or value is None:
                continue
            try:
                loader.load(value)
            except psycopg.DataError:
                return str(fields[number].name)
    return None


# SQLSTATE of PostgreSQL's disk_full (class 53, insufficient resources).
PG_DISK_FULL = "53100"
# SQLSTATE read_only_sql_transaction: a standby, or a database set read-only.
PG_READ_ONLY = "25006"


def driver_error_name(exc: BaseException) -> str:
    """The driver's name for a failure (SQLITE_FULL, SQLSTATE 53100, ...), never its
    message: a message may quote a value (a key of a unique index, say)."""
    orig = getattr(exc, "orig", None) or exc
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if isinstance(sqlite_name, str):
        return sqlite_name
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return f"SQLSTATE {sqlstate}"
    return type(orig).__name__


def database_full(exc: BaseException) -> bool:
    """Whether `exc` says the database's disk (or the size allowed it) is full: not an
    outage that passes by itself, but one the operator ends by making room (from review:
    answered `503 database_unavailable`, logged as a class name, /readyz ready)."""
    return driver_error_name(exc) in ("SQLITE_FULL", f"SQLSTATE {PG_DISK_FULL}")


def database_unwritable(exc: BaseException) -> str | None:
    """What keeps the database from taking any write, if `exc` says so: a read-only file or
    folder, a file-size limit, a standby. Like a full disk, not an outage that passes by
    itself (from review: every write answered 503 while /readyz said ready and doctor found
    no problem); None for any other failure."""
    name = driver_error_name(exc)
    if name.startswith("SQLITE_READONLY"):
        return f"is read-only ({name}: check the file's and its folder's owner and mode)"
    if name == "SQLITE_IOERR_WRITE":
        return f"could not be written ({name}: a file-size or quota limit, or the disk)"
    if name == f"SQLSTATE {PG_READ_ONLY}":
        return f"is read-only ({name}: a standby, or default_transaction_read_only)"
    return None


def undecodable_column(exc: BaseException) -> str | None:
    """The column of stored text SQLite cannot decode, if that is what `exc` is (a
    SQLAlchemy error or the driver's own); None for any other failure (`unreadable` knows
    every kind of unreadable value). Named `table.column`
    when the query that met it says which (`_name_undecodable`), else as sqlite3 named it.
    Damage to one row, not a database out of reach: SQLite raises it as an
    OperationalError, as it does a locked or missing database. PostgreSQL has no such text:
    its bytea holds bytes only, and a UTF8 database only valid UTF-8 text (it refuses the
    rest when written); what it keeps and cannot give back is a time (`_name_unloadable`)."""
    orig = getattr(exc, "orig", None) or exc
    if not isinstance(orig, sqlite3.OperationalError):
        return None
    found = _UNDECODABLE.match(str(orig))
    if found is None:
        return None
    named = getattr(orig, _TABLE_COLUMN, None)
    return named if isinstance(named, str) else found.group(1)


class UnreadableValue(ValueError):
    """A stored value its column's type cannot give back, met while reading rows (SQLite: a
    time or date that is none; app/models.py `UTCDateTime`, `CheckedDate`): damage to the
    row. A ValueError, as the parser's own error was; its text names the column, never the
    value."""

    def __init__(self, column: str | None, why: str) -> None:
        where = f"column '{column}'" if column is not None else "a column"
        super().__init__(f"a value stored in {where} cannot be read ({why})")
        self.column = column
        self.why = why


UNDECODABLE_TEXT = "text that is not UTF-8"
NO_TIME = "a time that is no time"
NO_DATE = "a date that is no date"
UNLOADABLE = "a time or other value the database driver cannot load"


@dataclass(frozen=True)
class Unreadable:
    column: str | None  # "table.column" where the statement says which
    why: str  # what kind of value, never the value


def unreadable(exc: BaseException) -> Unreadable | None:
    """What `exc` says of a stored value that cannot be given back as its column's type,
    when that is what it is: text SQLite cannot decode; a value psycopg cannot load as it
    fetches rows (`_name_unloadable`); a time SQLite holds that is no time. None for any
    other failure: a value the statement sent and the database refused (a DataError of a
    write, or of a comparison) is the caller's input, a locked database an outage."""
    if isinstance(exc, UnreadableValue):
        return Unreadable(exc.column, exc.why)
    column = undecodable_column(exc)
    if column is not None:
        return Unreadable(column, UNDECODABLE_TEXT)
    orig = getattr(exc, "orig", None) or exc
    if not getattr(orig, _UNLOADABLE, False):
        return None
    named = getattr(orig, _TABLE_COLUMN, None)
    return Unreadable(named if isinstance(named, str) else None, UNLOADABLE)

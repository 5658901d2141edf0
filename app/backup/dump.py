"""A logical copy of the database: every table's rows as JSON lines, and back.

One format for both backends, so a backup restores into SQLite or PostgreSQL alike (moving a
node from SQLite to PostgreSQL is a backup and a restore). The copy is consistent: SQLite is
first copied with the sqlite3 online backup API, then read from that copy; PostgreSQL is read
in one REPEATABLE READ, READ ONLY transaction. Tables are read by reflection, not from our
models, so a database one schema behind the code (backed up before `entraide migrate`) is
copied exactly as it is, with its revision.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    Table,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    select,
    text,
)

from app.db import make_engine

VERSION_TABLE = "alembic_version"
BATCH_ROWS = 500


class UndecodableText(bytes):
    """A SQLite TEXT value that is not UTF-8 (a BLOB rewritten as text by a hand edit, a
    damaged page), as its raw bytes. The driver refuses to read such a row at all; a backup
    of a damaged database is exactly what its operator needs, so it is copied, as bytes,
    and named in the manifest (`damaged`)."""


def _text_or_raw(raw: bytes) -> str | bytes:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return UndecodableText(raw)


def encode_value(value: object) -> object:
    if isinstance(value, bytes | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return {"t": aware.isoformat()}
    if isinstance(value, date):
        return {"d": value.isoformat()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"no backup encoding for {type(value).__name__} values")


def decode_value(value: object) -> object:
    if isinstance(value, dict):
        if "b64" in value:
            return base64.b64decode(value["b64"])
        if "t" in value:
            return datetime.fromisoformat(value["t"])
        if "d" in value:
            return date.fromisoformat(value["d"])
        raise ValueError("unknown value encoding in the backup")
    return value


@contextmanager
def _snapshot(url: str, scratch: Path) -> Iterator[Connection]:
    """A connection that sees one consistent state of the whole database. A SQLite database
    is copied into `scratch` (the backup's own staging folder, beside its output: the
    system's temporary folder may be too small, and holds no copy if the backup dies)."""
    if url.startswith("sqlite"):
        source_path = make_url(url).database
        if not source_path or not Path(source_path).exists():
            raise FileNotFoundError(f"no SQLite database at {source_path!r}")
        with tempfile.TemporaryDirectory(dir=scratch, prefix="snapshot-") as folder:
            copy = Path(folder) / "snapshot.db"
            source = sqlite3.connect(source_path)
            target = sqlite3.connect(copy)
            try:
                source.backup(target)
            except sqlite3.Error as exc:  # a full disk, an unreadable source
                raise OSError(f"could not copy the database for the backup: {exc}") from exc
            finally:
                target.close()
                source.close()
            engine = create_engine(f"sqlite:///{copy}")

            @event.listens_for(engine, "connect")
            def _raw_when_undecodable(connection: sqlite3.Connection, _record: object) -> None:
                connection.text_factory = _text_or_raw

            try:
                with engine.connect() as connection:
                    yield connection
            finally:
                engine.dispose()
        return
    engine = make_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
            connection.execute(text("SET TRANSACTION READ ONLY"))
            yield connection
    finally:
        engine.dispose()


def schema_revisions(connection: Connection) -> list[str]:
    if not inspect(connection).has_table(VERSION_TABLE):
        return []
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))  # noqa: S608
    return sorted(str(row[0]) for row in rows)


# Not the node's data: the migrations' own record, and which workers run now (a restore must
# not bring back workers that ran when the backup was taken, nor name their hosts).
_NOT_DATA = {VERSION_TABLE, "worker_heartbeats"}


def _data_tables(connection: Connection) -> list[Table]:
    metadata = MetaData()
    metadata.reflect(bind=connection)
    return [table for table in metadata.sorted_tables if table.name not in _NOT_DATA]


def dump_database(
    url: str, open_member: Callable[[str], IO[bytes]], *, scratch: Path
) -> dict[str, Any]:
    """Write one `<table>.jsonl` member per table; return the dialect, revision and counts,
    and `damaged`: where a value that cannot be read as stored was copied as its bytes (each
    `{table, column, row}`, `row` the primary key's values)."""
    with _snapshot(url, scratch) as connection:
        revisions = schema_revisions(connection)
        counts: dict[str, int] = {}
        damaged: list[dict[str, Any]] = []
        for table in _data_tables(connection):
            columns = [column.name for column in table.columns]
            keys = [column.name for column in table.primary_key.columns]
            count = 0
            with open_member(f"{table.name}.jsonl") as handle:
                statement = select(table)
                if keys:
                    statement = statement.order_by(*table.primary_key.columns)
                result = connection.execution_options(yield_per=BATCH_ROWS).execute(statement)
                for row in result:
                    values = dict(zip(columns, row, strict=True))
                    damaged += [
                        {
                            "table": table.name,
                            "column": column,
                            "row": {key: encode_value(values[key]) for key in keys},
                        }
                        for column, value in values.items()
                        if isinstance(value, UndecodableText)
                    ]
                    document = {key: encode_value(value) for key, value in values.items()}
                    handle.write(json.dumps(document, separators=(",", ":")).encode() + b"\n")
                    count += 1
            counts[table.name] = count
        return {
            "dialect": connection.dialect.name,
            "schema_revisions": revisions,
            "tables": counts,
            "damaged": damaged,
        }


# Rows the migrations seed in a new database, which hold nothing yet: the empty audit log's
# head, and running totals at zero (a freshly migrated database is a restore's target).
_SEEDED_EMPTY = {"audit_head": "size", "delivery_counters": "value"}


def holds_data(engine: Engine) -> list[str]:
    """Tables that hold rows, other than those the migrations seed while still empty."""
    busy = []
    with engine.connect() as connection:
        for table in _data_tables(connection):
            statement = select(func.count()).select_from(table)
            seeded = _SEEDED_EMPTY.get(table.name)
            if seeded is not None:
                statement = statement.where(func.coalesce(table.c[seeded], 0) != 0)
            if connection.scalar(statement):
                busy.append(table.name)
    return busy


def current_revisions(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return schema_revisions(connection)


def load_database(
    engine: Engine, rows_of: Callable[[str], Iterable[bytes]], expected: dict[str, int]
) -> None:
    """Replace every row of the (migrated, otherwise empty) database with the backup's."""
    with engine.begin() as connection:
        tables = {table.name: table for table in _data_tables(connection)}
        missing = sorted(set(expected) - set(tables) - _NOT_DATA)
        if missing:
            raise ValueError(f"the database lacks the backed-up tables {', '.join(missing)}")
        for table in reversed(list(tables.values())):
            connection.execute(table.delete())  # the rows the migrations seeded
        for name, table in tables.items():
            if name not in expected:
                continue
            loaded = _load_table(connection, table, rows_of(f"{name}.jsonl"))
            if loaded != expected[name]:
                raise ValueError(
                    f"{name}: {loaded} rows in the backup, the manifest says {expected[name]}"
                )
        if connection.dialect.name == "postgresql":
            _advance_sequences(connection, list(tables.values()))


def _load_table(connection: Connection, table: Table, lines: Iterable[bytes]) -> int:
    known = set(table.columns.keys())
    batch: list[dict[str, object]] = []
    count = 0
    for line in lines:
        document = json.loads(line)
        unknown = set(document) - known
        if unknown:
            raise ValueError(f"{table.name}: the backup has unknown columns {sorted(unknown)}")
        batch.append({key: decode_value(value) for key, value in document.items()})
        count += 1
        if len(batch) >= BATCH_ROWS:
            connection.execute(table.insert(), batch)
            batch = []
    if batch:
        connection.execute(table.insert(), batch)
    return count


def _advance_sequences(connection: Connection, tables: list[Table]) -> None:
    """Rows came with their ids: move each serial sequence past the largest one."""
    for table in tables:
        for column in table.primary_key.columns:
            sequence = connection.scalar(
                text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": table.name, "column": column.name},
            )
            if sequence is None:
                continue
            largest = connection.scalar(select(func.max(column)))
            connection.execute(
                text("SELECT setval(CAST(:sequence AS regclass), :value, :called)"),
                {"sequence": sequence, "value": largest or 1, "called": largest is not None},
            )

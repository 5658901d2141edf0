"""SQLite group commit (app.db): a write is acknowledged only once the WAL that SQLite really
writes is on disk, and a failed sync is never papered over by a second one."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import DurabilityLost, durability_failure, make_engine, make_session_factory
from app.db import unit_of_work as unit
from tests.conftest import migrated_sqlite
from tests.requests.conftest import example_document, serve_node


def _synced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records which file every fsync of this process is given (then really syncs it)."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def _failing_fsync(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """fsync fails with EIO until the returned function puts the real one back."""
    real = os.fsync

    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    return lambda: monkeypatch.setattr(os, "fsync", real)


def _with_a_table(tmp_path: Path) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    sessions = make_session_factory(engine)
    with unit(sessions) as session:
        session.execute(text("CREATE TABLE t (a INTEGER)"))
    return engine, sessions


def test_a_database_reached_through_a_symbolic_link_syncs_the_real_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Operators put the database on another volume and link to it. SQLite follows the link
    # and keeps its WAL beside the real file: that is the file a commit must wait for.
    (tmp_path / "data").mkdir()
    (tmp_path / "etc").mkdir()
    real = tmp_path / "data" / "node.db"
    link = tmp_path / "etc" / "node.db"
    make_engine(f"sqlite:///{real}").dispose()  # create the file (WAL mode)
    link.symlink_to(real)
    engine = make_engine(f"sqlite:///{link}")
    sessions = make_session_factory(engine)
    with unit(sessions) as session:
        session.execute(text("CREATE TABLE t (a INTEGER)"))
    synced = _synced_paths(monkeypatch)
    with unit(sessions) as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
    engine.dispose()
    assert str(real) + "-wal" in synced, synced
    assert not (tmp_path / "etc" / "node.db-wal").exists()


def test_a_failed_sync_fails_every_later_write_until_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, sessions = _with_a_table(tmp_path)
    restore = _failing_fsync(monkeypatch)
    with pytest.raises(DurabilityLost), unit(sessions) as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
    restore()
    # The disk answers again, but what the failed sync held may be gone from the page cache:
    # a second fsync would succeed without writing it. Nothing more is committed (a commit
    # the caller is told failed must not be delivered either) or acknowledged.
    with (
        pytest.raises(DurabilityLost, match="check the disk, then restart"),
        unit(sessions) as session,
    ):
        session.execute(text("INSERT INTO t VALUES (2)"))
    with pytest.raises(DurabilityLost), unit(sessions) as session:
        session.scalar(text("SELECT count(*) FROM t"))
    assert "EIO" in (durability_failure(engine) or "")
    engine.dispose()
    # A restart (a new engine) starts clean: the refused second write is not there.
    fresh = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    assert durability_failure(fresh) is None
    with unit(make_session_factory(fresh)) as session:
        assert session.scalar(text("SELECT count(*) FROM t")) == 1
        session.execute(text("INSERT INTO t VALUES (3)"))
    fresh.dispose()


def test_a_sync_that_cannot_open_the_file_fails_only_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors for a moment: nothing was lost, the next sync covers this commit.
    engine, sessions = _with_a_table(tmp_path)
    real = os.open

    def no_descriptors(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith("-wal"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_descriptors)
    with pytest.raises(DurabilityLost, match="EMFILE"), unit(sessions) as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
    monkeypatch.undo()
    assert durability_failure(engine) is None
    with unit(sessions) as session:
        session.execute(text("INSERT INTO t VALUES (2)"))
        assert session.scalar(text("SELECT count(*) FROM t")) == 2
    engine.dispose()


def test_a_node_whose_sync_failed_answers_503_and_is_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_node(migrated_sqlite(tmp_path / "ar.db"), tmp_path / "ar") as ar:
        ar.receive_request()
        restore = _failing_fsync(monkeypatch)
        refused = ar.post_envelope(
            ar._seal({"kind": "request", "document": example_document()}, None, None)
        )
        restore()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "database_unavailable"
        again = ar.post_envelope(
            ar._seal({"kind": "request", "document": example_document()}, None, None)
        )
        assert again.status_code == 503, again.text
        ready = ar.http.get("/readyz")
        assert ready.status_code == 503
        assert "database" in ready.json()["failing"]
        assert "a sync of the database failed" in ready.json()["checks"]["database"]


def test_a_sqlite_node_zeroes_what_it_erases(tmp_path: Path) -> None:
    """An erased value (a plaintext hash in clear before its migration, a discarded draft's
    key) must not stay readable in the file's free pages: asked for, as upstream SQLite's
    default is off (from review)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("PRAGMA secure_delete")) == 1
    finally:
        engine.dispose()

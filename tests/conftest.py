"""Databases for tests: SQLite files and uniquely named PostgreSQL databases, dropped after;
empty, or copies of one migrated to head.

PostgreSQL is the shared server on 127.0.0.1:5432. Without it the PostgreSQL variants are
skipped, except in CI (`CI=true`), where a missing PostgreSQL is a failure.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from app.localnodes import use_fork_server, use_port_range
from app.migrate import upgrade

PG_ADMIN = os.environ.get("ENTRAIDE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgresql"]

# Test workers (pytest-xdist, `-n`) start nodes side by side: each takes its ports from a range
# of its own, below the kernel's ephemeral range (32768 and up), so no two get the same port.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
use_port_range(20000 + 1500 * (_WORKER % 8), 21500 + 1500 * (_WORKER % 8))
# Nodes and commands are forked from an interpreter that has imported the application once
# (app/forkserver.py): a new interpreter costs about a second of CPU in imports, and the suite
# starts several hundred. ENTRAIDE_TEST_FORK=0 starts each with exec, as an operator does
# (tests/test_forkserver.py does so once; the footprint tests and the benchmarks always do).
use_fork_server(os.environ.get("ENTRAIDE_TEST_FORK", "1") != "0")


# The slowest files first. Each file runs whole in one test process (`--dist loadfile`), handed
# out in collection order (`--no-loadscope-reorder`: pytest-xdist otherwise hands out first
# the files of most tests, whatever their length, so that this order was never followed). No file
# depends on another's having run. The twenty longest by `--durations=0` (2026-12-01), then
# the folders of real nodes, then the rest; within a rank, the files of most tests first.
SLOWEST = (
    "tests/security/test_schemathesis.py",
    "tests/ops/test_backup.py",
    "tests/e2e/test_evidence.py",
    "tests/ops/test_upgrade_from_before_the_record.py",
    "tests/faults/test_delivery_faults.py",
    "tests/e2e/test_exchange.py",
    "tests/e2e/test_evidence_stored.py",
    "tests/e2e/test_live_rotation.py",
    "tests/e2e/test_live_rotation_reload.py",
    "tests/faults/test_delivery_workers.py",
    "tests/faults/test_delivery_network.py",
    "tests/e2e/test_stalled_bodies.py",
    "tests/e2e/test_evidence_replies.py",
    "tests/security/test_authz_matrix.py",
    "tests/requests/test_carriage.py",
    "tests/ops/test_deploy.py",
    "tests/audit/test_witnessed_damage.py",
    "tests/e2e/test_suspension.py",
    "tests/e2e/test_tampering.py",
    "tests/e2e/test_requests_cli.py",
)
SLOW_FOLDERS = ("tests/faults/", "tests/e2e/", "tests/ops/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests_in = collections.Counter(item.nodeid.partition("::")[0] for item in items)

    def rank(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.partition("::")[0]
        if path in SLOWEST:
            return SLOWEST.index(path), 0
        found = (n for n, folder in enumerate(SLOW_FOLDERS) if path.startswith(folder))
        return len(SLOWEST) + next(found, len(SLOW_FOLDERS)), -tests_in[path]

    items.sort(key=rank)  # stable: a file's tests keep their order


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def require_postgres() -> None:
    if not _pg_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI and is not reachable at {PG_ADMIN}")
        pytest.skip("PostgreSQL is not reachable; set CI=true to make this a failure")


def _admin_execute(statement: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute(statement)  # type: ignore[arg-type]  # test-made identifiers


# Migrating an empty database costs 0.3 s on SQLite and 0.5 s on PostgreSQL, and the suite
# needed some five hundred. Each test process migrates one database per backend, the first
# time one is asked for, and copies it: a file copy on SQLite, CREATE DATABASE ... TEMPLATE
# on PostgreSQL (0.08 s). A copy is what the migrations made, seeded rows included (the empty
# log's head row is dated when the template was made: a past time, which no entry takes).
# Tests of the migrations themselves, and of commands run on an empty database, ask for an
# empty one.
_templates: dict[str, str] = {}
_templates_lock = threading.Lock()
_template_folder: list[Path] = []


def _pg_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _template(backend: str) -> str:
    """This process's database of `backend` migrated to head: a SQLite file's path, or a
    PostgreSQL database's name. Made on first use; dropped when the session ends."""
    with _templates_lock:
        if backend not in _templates:
            _templates[backend] = _make_template(backend)
        return _templates[backend]


def _make_template(backend: str) -> str:
    if backend == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="entraide-test-template-"))
        _template_folder.append(folder)
        path = folder / "head.db"
        upgrade(f"sqlite:///{path}")
        # Closing its last connection folds SQLite's WAL into the file: the file is all of it.
        if path.with_name(path.name + "-wal").exists():
            raise RuntimeError(f"{path} kept its WAL after the migration; a copy would lack it")
        return str(path)
    name = f"entraide_test_tpl_{uuid.uuid4().hex}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(_pg_url(name))  # its engine is disposed: no session is left connected
        # A database is copied only while no session is connected to it: none can be now.
        _admin_execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    except BaseException:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        raise
    return name


def pytest_sessionfinish() -> None:
    """This process's templates go with its session (each xdist worker has its own)."""
    name = _templates.pop("postgresql", None)
    if name is not None:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _templates.pop("sqlite", None)
    while _template_folder:
        shutil.rmtree(_template_folder.pop(), ignore_errors=True)


def migrated_sqlite(path: Path) -> str:
    """The URL of a new SQLite database at `path`, migrated to head (a copy of the template)."""
    shutil.copyfile(_template("sqlite"), path)
    return f"sqlite:///{path}"


class Databases:
    """Creates databases for one test and drops the PostgreSQL ones afterwards."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.created: list[str] = []

    def new(self, label: str = "db", *, migrated: bool = False) -> str:
        """An empty database, or with `migrated` one at the latest migration, as `entraide
        migrate` leaves it (`entraide init` then finds nothing to do)."""
        if self.backend == "sqlite":
            path = self.tmp_path / f"{label}-{uuid.uuid4().hex[:8]}.db"
            return migrated_sqlite(path) if migrated else f"sqlite:///{path}"
        name = f"entraide_test_{uuid.uuid4().hex}"
        copy = f' TEMPLATE "{_template(self.backend)}" STRATEGY WAL_LOG' if migrated else ""
        _admin_execute(f'CREATE DATABASE "{name}"{copy}')
        self.created.append(name)
        return _pg_url(name)

    def drop_all(self) -> None:
        for name in self.created:
            _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_databases(backend: str, tmp_path: Path) -> Databases:
    if backend == "postgresql":
        require_postgres()
    return Databases(backend, tmp_path)


@pytest.fixture(params=BACKENDS)
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    dbs = make_databases(request.param, tmp_path)
    yield dbs
    dbs.drop_all()


DatabaseFactory = Callable[[str], str]

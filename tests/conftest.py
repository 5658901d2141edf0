"""Databases for tests: SQLite files and uniquely named PostgreSQL databases, dropped after.

PostgreSQL is the shared server on 127.0.0.1:5432. Without it the PostgreSQL variants are
skipped, except in CI (`CI=true`), where a missing PostgreSQL is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from app.localnodes import use_fork_server, use_port_range

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
# out in collection order: a long file handed out last kept one process busy for minutes
# after the others had finished. No file depends on another's having run.
SLOW_FIRST = ("tests/faults/", "tests/e2e/", "tests/ops/", "tests/security/test_schemathesis.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        found = (index for index, prefix in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefix))
        return next(found, len(SLOW_FIRST))

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


class Databases:
    """Creates databases for one test and drops the PostgreSQL ones afterwards."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.created: list[str] = []

    def new(self, label: str = "db") -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp_path / f'{label}-{uuid.uuid4().hex[:8]}.db'}"
        name = f"entraide_test_{uuid.uuid4().hex}"
        _admin_execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

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

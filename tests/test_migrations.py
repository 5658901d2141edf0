"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from app.audit.merkle import EMPTY_ROOT, CompactRange
from app.db import make_engine
from app.migrate import ROOT, pending
from app.models import AuditHead, Base
from tests.conftest import Databases


def test_alembic_upgrade_head_on_an_empty_database(databases: Databases) -> None:
    url = databases.new("migrations")
    env = {**os.environ, "ENTRAIDE_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        assert not pending(engine, url)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            head = connection.execute(select(AuditHead)).one()
            assert head.size == 0
            assert head.root_hash == EMPTY_ROOT
            assert CompactRange.from_bytes(head.compact_range).size == 0
    finally:
        engine.dispose()

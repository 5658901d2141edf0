"""Every PostgreSQL session the application opens reads timestamps in UTC (app/db.py).

A timestamptz is returned in the session's time zone, which is the server's or the database's
setting unless the client sets one. East of UTC, the latest instant the protocol can spell,
9999-12-31T23:59:59Z, is in year 10000 there, past what psycopg reads: found in review, a
request, its custody proof and `entraide backup` then failed for the whole node. Here the
test's own database defaults to Asia/Tokyo (never the shared server's setting).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, select, text

from app.db import make_engine, make_session_factory, unit_of_work
from app.models import Base, PeerKey
from tests.conftest import _admin_execute, make_databases

LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
ZONE = "Asia/Tokyo"  # east of UTC, no daylight saving time


@pytest.fixture
def tokyo(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    databases = make_databases("postgresql", tmp_path)
    url = databases.new("tz")
    name = url.rsplit("/", 1)[1]
    _admin_execute(f"ALTER DATABASE \"{name}\" SET timezone TO '{ZONE}'")
    engine = make_engine(url)
    try:
        Base.metadata.create_all(engine)
        yield url, engine
    finally:
        engine.dispose()
        databases.drop_all()


def test_a_far_future_instant_reads_back_whatever_the_database_time_zone(
    tokyo: tuple[str, Engine],
) -> None:
    url, engine = tokyo
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as connection:  # the setting the test relies on is in force
        assert connection.execute("SHOW timezone").fetchone() == (ZONE,)
    sessions = make_session_factory(engine)
    with unit_of_work(sessions) as session:
        session.add(
            PeerKey(
                peer_authority="DE/BFJ",
                purpose="signing",
                kid="0" * 32,
                public_key=bytes(32),
                pinned_at=datetime(2026, 11, 29, tzinfo=UTC),
                superseded_at=LAST,
            )
        )
    with unit_of_work(sessions) as session:
        assert session.scalars(select(PeerKey.superseded_at)).all() == [LAST]
    # A session that rolled back leaves the connection in UTC too (the SET was committed).
    session = sessions()
    try:
        session.execute(text("SELECT 1"))
        session.rollback()
    finally:
        session.close()
    with engine.connect() as connection:
        assert connection.scalar(text("SHOW timezone")) == "UTC"
        assert connection.scalar(select(PeerKey.superseded_at)) == LAST

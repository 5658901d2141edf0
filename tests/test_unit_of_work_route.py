"""Routes commit in their own worker thread as they return, not in a later trip through the
thread pool (app/deps.py, `UnitOfWorkRoute`): the transaction, which holds the audit log's
head, ends as soon as the work does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from app.deps import UnitOfWorkRoute, commit_on_return, get_session
from app.main import ROUTERS


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'uow.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE rows (value TEXT)"))
    yield engine
    engine.dispose()


def _stored(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(text("SELECT value FROM rows")))


def test_a_route_commits_in_its_own_thread_as_it_returns(engine: Engine) -> None:
    committed_in: list[int] = []
    session = sessionmaker(engine)()
    event.listen(session, "after_commit", lambda _: committed_in.append(threading.get_ident()))

    @commit_on_return
    def route(*, session: Session, value: str) -> str:
        session.execute(text("INSERT INTO rows VALUES (:value)"), {"value": value})
        return value

    try:
        assert route(session=session, value="kept") == "kept"
        # Committed before the dependency's exit (the session is still open here).
        assert _stored(engine) == ["kept"]
        assert committed_in == [threading.get_ident()]
    finally:
        session.close()


def test_a_route_that_raises_commits_nothing(engine: Engine) -> None:
    session = sessionmaker(engine)()

    @commit_on_return
    def route(*, session: Session) -> None:
        session.execute(text("INSERT INTO rows VALUES ('lost')"))
        raise ValueError("refused")

    try:
        with pytest.raises(ValueError, match="refused"):
            route(session=session)
        session.rollback()  # what get_session's exit does with the error
        assert _stored(engine) == []
    finally:
        session.close()


def test_every_route_with_a_session_commits_on_return() -> None:
    """A router created without `route_class=UnitOfWorkRoute` would commit late again."""
    with_session = [
        route
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute)
        and any(dep.call is get_session for dep in route.dependant.dependencies)
    ]
    assert len(with_session) >= 20
    for route in with_session:
        assert isinstance(route, UnitOfWorkRoute), f"{sorted(route.methods)} {route.path}"
        assert route.endpoint.__wrapped__ is not None  # type: ignore[attr-defined]


def test_a_generator_route_taking_a_session_is_refused() -> None:
    def stream(session: Session) -> Iterator[bytes]:
        yield b""

    with pytest.raises(TypeError, match="generator route"):
        UnitOfWorkRoute("/stream", stream)

"""Peer rows holding a value the database cannot give back, found column by column.

From review: one peer's row holding such a value (SQLite text that is not UTF-8 or a time that
is no time, a PostgreSQL time of 'infinity') failed every delivery round, since a round reads
the rows of the peers it claimed for: deliveries to every other peer stopped too. The worker
now holds that peer's deliveries back, untried, until its row reads again
(app/delivery/worker.py), and `entraide doctor` names the row and column.

The table is small (one row per pinned peer): it is read whole, and only if that fails row by
row and column by column, each read in a savepoint (a failed read ends no transaction).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from app.db import UnreadableValue, unreadable
from app.models import Peer

PEERS = cast(Table, Peer.__table__)


@dataclass(frozen=True)
class DamagedPeer:
    row_id: int
    authority: str | None  # None: its own authority_id is what cannot be read
    columns: tuple[str, ...]  # "peers.column", each


def find_damaged_peers(
    session: Session, *, ids: Collection[int] | None = None
) -> list[DamagedPeer]:
    """Every peer row (or those of `ids`) holding a value that cannot be read, with each
    such column. Any other failure (the database out of reach) is raised."""
    rows = select(PEERS.c.id).order_by(PEERS.c.id)
    if ids is not None:
        rows = rows.where(PEERS.c.id.in_(list(ids)))
    if _reads(session, select(PEERS).where(PEERS.c.id.in_(rows.scalar_subquery()))):
        return []
    found = []
    for row_id in session.scalars(rows).all():
        columns = [
            column.name
            for column in PEERS.c
            if not _reads(session, select(column).where(PEERS.c.id == row_id))
        ]
        if not columns:
            continue
        authority = (
            None
            if PEERS.c.authority_id.name in columns
            else session.scalar(select(PEERS.c.authority_id).where(PEERS.c.id == row_id))
        )
        found.append(DamagedPeer(row_id, authority, tuple(f"peers.{name}" for name in columns)))
    return found


def _reads(session: Session, statement: Select[tuple[object, ...]]) -> bool:
    try:
        with session.begin_nested():
            session.execute(statement).all()
    except (DBAPIError, UnreadableValue) as exc:
        if unreadable(exc) is None:
            raise
        return False
    return True

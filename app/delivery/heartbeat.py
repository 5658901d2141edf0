"""Which delivery workers are running, whatever process runs them.

Each worker (in `entraide serve`, or an `entraide worker` process of its own) writes its row
from a thread of its own every `worker_heartbeat_seconds`, and removes it when it stops. The
row says until when it vouches for the worker (`expires_at`: three periods of the worker's
own setting, so a reader set otherwise does not misjudge it). Times are the database's clock
on PostgreSQL, where workers and readers may run on hosts whose clocks differ (a worker whose
clock ran ahead would otherwise be counted alive long after it died); a SQLite node's
processes share one host. The API process's `/readyz`, `/metrics` (`entraide_delivery_workers`)
and `entraide doctor` count the rows not expired: a node whose deliveries run in separate
processes is watched like one that runs them in its own (from an operator's review).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.orm import Session

from app.crypto.encoding import utc_now
from app.models import WorkerHeartbeat

# A worker missing this many beats is taken for gone (killed, its host down).
MISSED_BEATS = 3
# Rows of workers gone without removing them (killed) are forgotten after this long.
FORGET_AFTER = timedelta(days=1)


def database_now(reader: Session | Connection) -> datetime:
    """The time by the database's clock (PostgreSQL), or this host's (SQLite)."""
    bind = reader if isinstance(reader, Connection) else reader.get_bind()
    if bind.dialect.name == "postgresql":
        now = reader.scalar(select(func.statement_timestamp()))
        if isinstance(now, datetime):
            return now
    return utc_now()


def beat(session: Session, worker_id: str, *, every_seconds: float) -> None:
    """This worker is alive now, and vouched for until three periods from now."""
    now = database_now(session)
    expires = now + timedelta(seconds=every_seconds * MISSED_BEATS)
    refreshed = session.execute(
        update(WorkerHeartbeat)
        .where(WorkerHeartbeat.worker_id == worker_id)
        .values(seen_at=now, expires_at=expires)
    )
    if not getattr(refreshed, "rowcount", 0):
        session.add(
            WorkerHeartbeat(worker_id=worker_id, started_at=now, seen_at=now, expires_at=expires)
        )
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.expires_at < now - FORGET_AFTER))


def stopped(session: Session, worker_id: str) -> None:
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id))


def alive(reader: Session | Connection) -> int:
    """How many workers' rows have not expired."""
    now = database_now(reader)
    count = reader.scalar(
        select(func.count()).select_from(WorkerHeartbeat).where(WorkerHeartbeat.expires_at > now)
    )
    return int(count or 0)

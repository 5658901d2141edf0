"""Which delivery workers are running, whatever process runs them.

Each worker (in `entraide serve`, or an `entraide worker` process of its own) writes its row
every `worker_heartbeat_seconds` and removes it when it stops. A worker is taken for alive
while its row is fresher than three periods: the API process's `/readyz`, `/metrics`
(`entraide_delivery_workers`) and `entraide doctor` read it, so a node whose deliveries run in
separate processes is watched like one that runs them in its own (from an operator's review:
with the worker apart, no check or metric could tell that none was running).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.orm import Session

from app.models import WorkerHeartbeat

# A worker missing this many beats is taken for gone (killed, its host down).
MISSED_BEATS = 3
# Rows of workers gone without removing them (killed) are forgotten after this long.
FORGET_AFTER = timedelta(days=1)


def fresh_since(now: datetime, every_seconds: float) -> datetime:
    return now - timedelta(seconds=every_seconds * MISSED_BEATS)


def beat(session: Session, worker_id: str, *, now: datetime) -> None:
    """This worker is alive at `now` (its row written, or refreshed)."""
    refreshed = session.execute(
        update(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id).values(seen_at=now)
    )
    if not getattr(refreshed, "rowcount", 0):
        session.add(WorkerHeartbeat(worker_id=worker_id, started_at=now, seen_at=now))
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < now - FORGET_AFTER))


def stopped(session: Session, worker_id: str) -> None:
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id))


def alive(reader: Session | Connection, *, now: datetime, every_seconds: float) -> int:
    """How many workers wrote their row within the last MISSED_BEATS periods."""
    since = fresh_since(now, every_seconds)
    count = reader.scalar(
        select(func.count()).select_from(WorkerHeartbeat).where(WorkerHeartbeat.seen_at >= since)
    )
    return int(count or 0)

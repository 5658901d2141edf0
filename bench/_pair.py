"""Two real nodes for the request-path benchmarks, and read-only probes of their databases.

The nodes run with the shipped defaults: `LocalNode` sets a few test-suite values (a faster
worker poll, high refusal limits), and `shipped_env()` puts the defaults back.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from app.config import Settings
from app.localnodes import LocalNode

SENDER = ("ES/MJ", "Ministerio de Justicia")
RECEIVER = ("AR/MPF", "Ministerio Publico Fiscal")
PENDING = ("queued", "in_flight", "retry")


def shipped_env() -> dict[str, str]:
    """The defaults of Settings for what LocalNode changes for the test suites."""
    fields = Settings.model_fields
    return {
        "ENTRAIDE_WORKER_POLL_SECONDS": str(fields["worker_poll_seconds"].default),
        "ENTRAIDE_AUTH_FAILURE_LIMIT": str(fields["auth_failure_limit"].default),
        "ENTRAIDE_P2P_REFUSAL_LIMIT": str(fields["p2p_refusal_limit"].default),
    }


def start_timed(node: LocalNode, timeout: float = 60.0) -> float:
    """Start `entraide serve` as LocalNode.start does; seconds from spawn to /readyz 200."""
    log = node.log_path.open("ab")
    started = time.monotonic()
    node.process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(node.port)],
        env=node.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    with httpx.Client(timeout=1.0) as http:
        while time.monotonic() - started < timeout:
            if node.process.poll() is not None:
                raise RuntimeError(f"node {node.authority_id} exited; see {node.log_path}")
            try:
                if http.get(node.url + "/readyz").status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
    raise RuntimeError(f"node {node.authority_id} not ready after {timeout}s")


@dataclass
class Pair:
    es: LocalNode  # the sender: officers submit here
    ar: LocalNode  # the receiver
    ready_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def nodes(self) -> tuple[LocalNode, LocalNode]:
        return self.es, self.ar

    def start(self) -> None:
        for node in self.nodes:
            self.ready_seconds[node.authority_id] = start_timed(node)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def pids(self) -> dict[str, int]:
        return {
            node.authority_id: node.process.pid for node in self.nodes if node.process is not None
        }


def make_pair(workdir: Path, es_url: str, ar_url: str) -> Pair:
    """Set up as an operator would (init, API clients, pinning over HTTP); left running."""
    env = shipped_env()
    es = LocalNode(*SENDER, workdir / "es", es_url, extra_env=env)
    ar = LocalNode(*RECEIVER, workdir / "ar", ar_url, extra_env=env)
    pair = Pair(es, ar)
    for node in pair.nodes:
        node.init(clients={"admin": ("admin",), "officer": ("officer",)})
    pair.start()
    es.pin(ar)
    ar.pin(es)
    return pair


class Probe:
    """Read-only queries on a node's database, outside the node (autocommit reads)."""

    def __init__(self, url: str) -> None:
        self.sqlite = url.startswith("sqlite")
        self._lock = threading.Lock()
        if self.sqlite:
            path = url.split("///", 1)[1]
            self._sqlite = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._sqlite.execute("PRAGMA busy_timeout=10000")
        else:
            plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
            self._pg = psycopg.connect(plain, autocommit=True)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self.sqlite:
                return list(self._sqlite.execute(sql.replace("%s", "?"), tuple(params)))
            return list(self._pg.execute(sql, tuple(params)))  # type: ignore[arg-type]

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self.sqlite:
            self._sqlite.close()
        else:
            self._pg.close()


def as_utc(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass
class Marks:
    """Highest row ids before a run: counting rows above them stays cheap at any table size."""

    outbox: int
    receipts: int
    received: int

    @classmethod
    def take(cls, sender: Probe, receiver: Probe) -> Marks:
        return cls(
            outbox=int(sender.scalar("SELECT coalesce(max(id), 0) FROM outbox")),
            receipts=int(sender.scalar("SELECT coalesce(max(id), 0) FROM receipts")),
            received=int(receiver.scalar("SELECT coalesce(max(id), 0) FROM messages")),
        )


@dataclass
class Sample:
    at: float  # wall clock
    pending: int  # outbox rows not yet delivered (queued, in flight, waiting for retry)
    queued: int  # outbox rows written since the mark (requests accepted)
    receipted: int  # receipts stored at the sender since the mark
    received: int  # envelopes stored at the receiver since the mark


def sample(sender: Probe, receiver: Probe, marks: Marks) -> Sample:
    at = time.time()
    pending = sender.scalar("SELECT count(*) FROM outbox WHERE state IN (%s, %s, %s)", PENDING)
    queued = sender.scalar("SELECT count(*) FROM outbox WHERE id > %s", (marks.outbox,))
    receipted = sender.scalar("SELECT count(*) FROM receipts WHERE id > %s", (marks.receipts,))
    received = receiver.scalar("SELECT count(*) FROM messages WHERE id > %s", (marks.received,))
    return Sample(at, int(pending), int(queued), int(receipted), int(received))


class Sampler(threading.Thread):
    """Samples the backlog and the counters every `interval` seconds while a load runs."""

    def __init__(self, sender: Probe, receiver: Probe, marks: Marks, interval: float) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.sender = sender
        self.receiver = receiver
        self.marks = marks
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(sample(self.sender, self.receiver, self.marks))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[Sample]:
        self._stop_event.set()
        self.join(timeout=30)
        return self.samples

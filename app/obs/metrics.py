"""Prometheus metrics: per-process counters, and gauges read from the database at scrape time.

Several processes (API replicas, `entraide worker`s) may share one database, so anything the
database knows (the delivery queue, the audit log, witness alarms) is computed from it when
/metrics is scraped, with a few cheap queries that do not grow with history (totals of delivered
rows and attempts are kept by settlement, app/delivery/settle.py): every replica reports the
same value, so aggregate those with `max`, not `sum`. What only a process knows (the HTTP
requests it served, the envelopes it refused) is a counter of that process: aggregate with
`sum(rate(...))`.

Labels hold route templates, status codes, states, error codes, key purposes: never request
content, request ids, client names or tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.audit.checkpoints import log_verifier, read_progress
from app.crypto.encoding import parse_time, utc_now
from app.crypto.keyring import chain_length
from app.delivery import heartbeat, outbox
from app.models import DeliveryCounter, Peer, WitnessAlarm
from app.node import Node
from app.obs.storage import DATABASE, EVIDENCE
from app.requests.overdue import overdue_counts

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTBOX_STATES = (outbox.QUEUED, outbox.IN_FLIGHT, outbox.RETRY, outbox.DELIVERED, outbox.FAILED)


class Metrics:
    """The process's registry. One per application, so tests can build many apps."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.http_requests = Counter(
            "entraide_http_requests",
            "HTTP requests served by this process, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "entraide_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.envelopes_refused = Counter(
            "entraide_envelopes_refused",
            "Envelopes from peers refused by this process, by refusal code.",
            ["code"],
            registry=self.registry,
        )
        self.buffered_body_bytes = Gauge(
            "entraide_buffered_body_bytes",
            "Bytes of request bodies this process holds in memory (app/limits.py BodyBudget).",
            registry=self.registry,
        )
        self._node_collector: NodeCollector | None = None

    def watch(self, node: Node, worker_alive: Callable[[], bool | None]) -> None:
        """Add the gauges read from the node's database and keys (called by the lifespan)."""
        if self._node_collector is not None:
            self.registry.unregister(self._node_collector)
        self._node_collector = NodeCollector(node, worker_alive)
        self.registry.register(self._node_collector)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(route).observe(seconds)

    def envelope_refused(self, code: str) -> None:
        self.envelopes_refused.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _age(now: datetime, moment: datetime | None) -> float | None:
    return None if moment is None else max((now - moment).total_seconds(), 0.0)


def key_dates(keys_dir: Path) -> dict[str, tuple[datetime | None, datetime | None]]:
    """Each key file's purpose with its creation and (if any) expiry time.

    Only the dates are kept: the file also holds the secret, which is dropped at once.
    """
    dates: dict[str, tuple[datetime | None, datetime | None]] = {}
    for path in sorted(keys_dir.glob("*.key")):
        try:
            document = json.loads(path.read_bytes())
            if document.get("retired_at"):
                continue  # a retired key kept to reopen old messages, not in use
            purpose = str(document["kind"])
            created = document.get("created_at")
            expires = document.get("expires_at")
            dates[purpose] = (
                parse_time(created) if created else None,
                parse_time(expires) if expires else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # `entraide doctor` explains unreadable key files; metrics stay quiet
    return dates


# Every gauge family `NodeCollector.collect` may yield (and one counter, below).
NODE_GAUGES = (
    "entraide_key_age_seconds",
    "entraide_key_expires_in_seconds",
    "entraide_keys_reload_failed",
    "entraide_key_rotations",
    "entraide_worker_alive",
    "entraide_delivery_workers",
    "entraide_database_up",
    "entraide_storage_full",
    "entraide_outbox_messages",
    "entraide_outbox_oldest_pending_age_seconds",
    "entraide_audit_log_entries",
    "entraide_audit_entries_since_checkpoint",
    "entraide_audit_last_checkpoint_age_seconds",
    "entraide_witness_alarms",
    "entraide_peers",
    "entraide_requests_overdue",
)


class NodeCollector(Collector):
    def __init__(self, node: Node, worker_alive: Callable[[], bool | None]) -> None:
        self.node = node
        self.worker_alive = worker_alive
        self._log_verifier = log_verifier(node.authority_id, node.keys.log_public)

    def describe(self) -> Iterable[Metric]:
        """The families `collect` yields, without values, for the registry's name check.

        Without it the registry (auto_describe) runs `collect` when the collector is
        registered, in the node's start-up: every database query of a scrape before the node
        could answer, one second of its start with 200,000 stored requests.
        """
        for name in NODE_GAUGES:
            yield GaugeMetricFamily(name, "")
        yield CounterMetricFamily("entraide_delivery_attempts", "")

    def collect(self) -> Iterable[Metric]:
        now = utc_now()
        yield from self._keys(now)
        alive = self.worker_alive()
        if alive is not None:
            yield GaugeMetricFamily(
                "entraide_worker_alive",
                "1 if this process's in-process delivery worker is running.",
                value=1.0 if alive else 0.0,
            )
        full = GaugeMetricFamily(
            "entraide_storage_full",
            "1 if this process found the database or the evidence storage full (or taking no "
            "write) within the last minute; /readyz says when (storage, evidence).",
            labels=["storage"],
        )
        for label, what in (("database", DATABASE), ("evidence", EVIDENCE)):
            full.add_metric([label], 1.0 if self.node.storage_full.failing(what) else 0.0)
        yield full
        try:
            families = list(self._database(now))
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable: %s", type(exc).__name__)
            families = []
        yield GaugeMetricFamily(
            "entraide_database_up",
            "1 if the database answered the metrics queries.",
            value=1.0 if families else 0.0,
        )
        yield from families

    def _keys(self, now: datetime) -> Iterable[Metric]:
        # The keys this process uses, not the files: after a rotation it could not load,
        # the files are new and the keys in use are not (from review). Read without a reload.
        state = self.node.keyring.state()
        keys = state.generation.keys
        age = GaugeMetricFamily(
            "entraide_key_age_seconds",
            "Age of the keys this process uses, by purpose.",
            labels=["purpose"],
        )
        expiry = GaugeMetricFamily(
            "entraide_key_expires_in_seconds",
            "Time left before a key this process uses expires (negative: expired), by purpose.",
            labels=["purpose"],
        )
        for purpose, (created, expires) in sorted(keys.dates.items()):
            created_age = _age(now, created)
            if created_age is not None:
                age.add_metric([purpose], created_age)
            if expires is not None:
                expiry.add_metric([purpose], (expires - now).total_seconds())
        yield age
        yield expiry
        yield GaugeMetricFamily(
            "entraide_keys_reload_failed",
            "1 if this process could not load the keys folder after it changed (a rotation) "
            "and still uses its previous keys; /readyz says why (keys_reload).",
            value=1.0 if state.failure is not None else 0.0,
        )
        rotations = GaugeMetricFamily(
            "entraide_key_rotations",
            "Rotations in the chain of the keys this process uses (in_use) and in the keys "
            "folder (on_disk): they differ after a rotation this process has not loaded.",
            labels=["keys"],
        )
        rotations.add_metric(["in_use"], len(keys.rotations))
        on_disk = chain_length(self.node.settings.keys_dir)
        if on_disk is not None:
            rotations.add_metric(["on_disk"], on_disk)
        yield rotations

    def _database(self, now: datetime) -> Iterable[Metric]:
        with self.node.sessions() as session:
            # The backlog through the state index (outbox.queue_stats, as /readyz); what
            # grows with history (delivered rows, attempts) from the totals settlement keeps.
            backlog = outbox.queue_stats(session)
            states = dict.fromkeys(OUTBOX_STATES, 0) | backlog.by_state
            totals = dict(
                session.execute(select(DeliveryCounter.name, DeliveryCounter.value)).tuples().all()
            )
            states[outbox.DELIVERED] = int(totals.get("delivered", 0))
            oldest = backlog.oldest_pending_at
            attempts: dict[str, int] = {
                name.removeprefix("attempts:"): int(value)
                for name, value in totals.items()
                if name.startswith("attempts:")
            }
            # The worker's own one-query read (the newest checkpoint through its primary key),
            # not a scan of every checkpoint on each scrape.
            log_progress = read_progress(session, self._log_verifier)
            alarms = (
                session.scalar(
                    select(func.count())
                    .select_from(WitnessAlarm)
                    .where(WitnessAlarm.resolved_at.is_(None))
                )
                or 0
            )
            peers = session.scalar(select(func.count()).select_from(Peer)) or 0
            workers = heartbeat.alive(session)
            overdue = overdue_counts(session, now=now)

        yield GaugeMetricFamily(
            "entraide_delivery_workers",
            "Delivery workers of this node running, in any process (their heartbeats).",
            value=workers,
        )
        queue = GaugeMetricFamily(
            "entraide_outbox_messages", "Outbound messages by delivery state.", labels=["state"]
        )
        for state, count in states.items():
            queue.add_metric([state], count)
        yield queue
        yield GaugeMetricFamily(
            "entraide_outbox_oldest_pending_age_seconds",
            "Age of the oldest message not yet delivered (queued, in flight or retrying); "
            "0 when none is pending.",
            value=_age(now, oldest) or 0.0,
        )
        tries = CounterMetricFamily(
            "entraide_delivery_attempts",
            "Delivery attempts recorded in the database (all workers), by outcome.",
            labels=["outcome"],
        )
        for outcome, count in sorted(attempts.items()):
            tries.add_metric([outcome], count)
        yield tries
        if log_progress is not None:
            yield GaugeMetricFamily(
                "entraide_audit_log_entries", "Entries in the audit log.", value=log_progress.size
            )
            yield GaugeMetricFamily(
                "entraide_audit_entries_since_checkpoint",
                "Audit entries not yet covered by a signed checkpoint.",
                value=log_progress.size - log_progress.last_checkpoint_size,
            )
        checkpoint_age = (
            None if log_progress is None else _age(now, log_progress.latest_checkpoint_at)
        )
        if checkpoint_age is not None:
            yield GaugeMetricFamily(
                "entraide_audit_last_checkpoint_age_seconds",
                "Time since the audit log's last signed checkpoint.",
                value=checkpoint_age,
            )
        yield GaugeMetricFamily(
            "entraide_witness_alarms",
            "Split-view alarms: a peer showed two histories of its log that cannot both be true.",
            value=int(alarms),
        )
        yield GaugeMetricFamily("entraide_peers", "Pinned peer nodes.", value=int(peers))
        late = GaugeMetricFamily(
            "entraide_requests_overdue",
            "Requests past their current deadline (docs/domain.md, Deadlines), by direction "
            "and status.",
            labels=["direction", "status"],
        )
        for (direction, status), count in sorted(overdue.items()):
            late.add_metric([direction, status], count)
        yield late

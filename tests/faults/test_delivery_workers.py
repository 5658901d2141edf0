"""Several delivery workers and batches (issue 4): `entraide worker` processes sharing one
backlog, a backlog posted in batches (and one by one when the peer's body limit refuses a
batch), and a node that tells when none of its separate workers runs.

Each scenario runs two real node processes and ends with the exactly-once ledger of
tests/faults/harness.py.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.models import OutboxItem
from tests.conftest import Databases
from tests.faults.conftest import Lab
from tests.faults.harness import ADMIN, Pair, wait_until

pytestmark = pytest.mark.e2e


def test_four_workers_deliver_one_backlog_on_postgresql(shared_pg: Databases, lab: Lab) -> None:
    pair = lab.pair(
        shared_pg.new("es"), shared_pg.new("ar"), sender_env={"ENTRAIDE_RUN_WORKER": "false"}
    )
    proxy = lab.proxy(pair.receiver.port)
    pair.start(sender_pins_receiver_at=proxy.url)
    backlog = 200
    accepted = pair.submit(backlog, concurrency=4)
    assert pair.outbox_states() == {"queued": backlog}

    # The lease and peer timeout at their defaults (no worker is killed here): with the short
    # ones of the harness, a batch's post on a busy host outlived its lease, and its rows were
    # taken over and posted again, several times each (on PostgreSQL, 456 attempts whose
    # lease ran out for 200 rows in one run; a lease shorter than a post is what `entraide
    # doctor` warns of). Takeovers have tests of their own (test_delivery_faults.py).
    defaults = {"ENTRAIDE_LEASE_SECONDS": "300", "ENTRAIDE_PEER_TIMEOUT_SECONDS": "30"}
    workers = [pair.start_worker(f"w{index}", **defaults) for index in range(4)]
    pair.wait_delivered(backlog, timeout=120)
    assert all(worker.process.poll() is None for worker in workers)

    ledger = pair.ledger(accepted)
    ledger.check()
    assert ledger.delivered == backlog
    assert proxy.count("max_concurrent") >= 2, proxy.snapshot()  # they did work side by side
    assert proxy.count("proxy_errors") == 0


# Over one envelope of the example request (about 16 KB on the wire), under two.
BODY_LIMIT = 28 * 1024


def _posts(pair: Pair, route: str, status: str | None = None) -> float:
    """POSTs the receiver answered on `route` (with `status`), from its /metrics."""
    text = pair.receiver.metrics(ADMIN).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "entraide_http_requests_total"
        and sample.labels.get("route") == route
        and sample.labels.get("method") == "POST"
        and status in (None, sample.labels.get("status"))
    )


def test_a_backlog_goes_to_the_peer_in_batches(lab: Lab) -> None:
    pair = lab.pair(sender_env={"ENTRAIDE_RUN_WORKER": "false"})
    pair.start()
    backlog = 70
    accepted = pair.submit(backlog, concurrency=4)
    assert pair.outbox_states() == {"queued": backlog}

    # A batch of 64 takes the receiver a while to store and sign on a busy host: the short
    # test timeout would have it posted again (one attempt each is what is checked here).
    pair.start_worker("batches", ENTRAIDE_PEER_TIMEOUT_SECONDS="30")
    pair.wait_delivered(backlog, timeout=60)

    ledger = pair.ledger(accepted)
    ledger.check()
    assert ledger.delivered == backlog
    assert ledger.attempts == {1: backlog}
    # Claimed 64 at a time (a batch's most): two posts, 64 and 6, none one by one.
    assert _posts(pair, "/p2p/v1/envelopes/batch") == 2
    assert _posts(pair, "/p2p/v1/envelopes") == 0
    # Each request's id still reaches the peer's log, one line per envelope.
    with pair.engine(pair.sender).connect() as connection:
        traces = set(connection.scalars(select(OutboxItem.trace_id)))
    logged = {
        json.loads(line).get("request_id")
        for line in pair.receiver.log_path.read_text().splitlines()
        if line.startswith("{") and "in a batch" in line
    }
    assert len(traces) == backlog
    assert traces <= logged


def test_a_batch_over_the_peers_body_limit_goes_one_by_one(lab: Lab) -> None:
    # The receiver takes bodies of one envelope but not of five: it refuses the batch as a
    # whole (413 too_large) and the worker posts the same envelopes one by one instead.
    pair = lab.pair(
        sender_env={"ENTRAIDE_RUN_WORKER": "false"},
        receiver_env={"ENTRAIDE_MAX_BODY_BYTES": str(BODY_LIMIT)},
    )
    pair.start()
    accepted = pair.submit(5)
    pair.start_worker("fallback", ENTRAIDE_PEER_TIMEOUT_SECONDS="30")
    pair.wait_delivered(5, timeout=60)

    ledger = pair.ledger(accepted)
    ledger.check()
    assert ledger.delivered == 5
    # The batch was refused before routing (the body limit): its metric names the route it
    # was for all the same, with the 413.
    assert _posts(pair, "/p2p/v1/envelopes/batch") == 1
    assert _posts(pair, "/p2p/v1/envelopes/batch", "413") == 1
    assert _posts(pair, "/p2p/v1/envelopes") == 5


def _workers_seen(pair: Pair) -> tuple[float, int]:
    """What the API process says of the node's delivery workers: the metric, and /readyz."""
    text = pair.sender.metrics(ADMIN).text
    gauge = next(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "entraide_delivery_workers"
        for sample in family.samples
    )
    ready = pair.sender.readyz(ADMIN)  # the backlog is for a monitor's or an admin's token
    assert ready.status_code == 200, ready.text  # the API serves whether or not one runs
    workers: int = ready.json()["delivery"]["workers"]
    return gauge, workers


def test_a_node_whose_workers_run_apart_tells_when_none_runs(lab: Lab) -> None:
    """From an operator's walk-through: with deliveries in `entraide worker` processes, no
    metric, readiness report or doctor check could tell that none was running (a killed
    worker left requests queued while everything said all was well)."""
    pair = lab.pair(
        sender_env={"ENTRAIDE_RUN_WORKER": "false", "ENTRAIDE_WORKER_HEARTBEAT_SECONDS": "0.5"}
    )
    pair.start()
    assert _workers_seen(pair) == (0, 0)
    pair.submit(1)
    doctor = pair.sender.cli("doctor", check=False)
    assert "no delivery worker is running" in doctor.stdout, doctor.stdout

    first = pair.start_worker("first")
    wait_until("the worker reported", lambda: _workers_seen(pair) == (1, 1))
    pair.wait_delivered(1, timeout=30)
    second = pair.start_worker("second")
    wait_until("both workers reported", lambda: _workers_seen(pair) == (2, 2))
    first.stop()  # a clean stop says so at once
    assert _workers_seen(pair) == (1, 1)
    second.kill()  # a killed one is taken for gone after three silent periods
    wait_until("the killed worker is taken for gone", lambda: _workers_seen(pair) == (0, 0))

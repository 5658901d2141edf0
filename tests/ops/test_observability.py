"""Metrics, request ids and readiness on real nodes, around the demo's own journey."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from alembic import command
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, select

from app.config import Settings
from app.db import make_engine
from app.demo import _journey as demo_journey
from app.localnodes import LocalNode
from app.migrate import alembic_config
from app.models import Message, OutboxItem
from app.node import load_node
from app.obs.metrics import Metrics, NodeCollector
from tests.e2e.conftest import EXAMPLE, wait_delivered, wait_for
from tests.ops.nodes import Pair, pinned_pair
from tests.ops.test_doctor import _previous_revision

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(node: LocalNode) -> tuple[str, Samples]:
    response = node.metrics("prometheus")  # a monitor client's token, as operators give one
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def log_lines(node: LocalNode) -> list[dict[str, object]]:
    lines = []
    for line in node.log_path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    # test_readyz_answers_503_naming_the_failing_check stamps ES/MJ's schema back and forth:
    # on databases the nodes' own `init` migrated.
    with pinned_pair("sqlite", tmp_path_factory.mktemp("observability"), migrated=False) as nodes:
        for node in (nodes.es, nodes.ar):
            node.create_client("prometheus", "monitor")  # what operations.md section 6 says
        yield nodes


@pytest.mark.e2e
def test_metrics_move_with_the_demo_journey(pair: Pair) -> None:
    es, ar = pair.es, pair.ar
    _, es_before = scrape(es)
    _, ar_before = scrape(ar)

    demo_journey(es, ar)

    # Counters moved, by route template and status, on both sides.
    es_text, es_after = scrape(es)
    ar_text, ar_after = scrape(ar)
    submitted = {"method": "POST", "route": "/api/v1/requests", "status": "201"}
    assert value(es_after, "entraide_http_requests_total", **submitted) == (
        value(es_before, "entraide_http_requests_total", **submitted) + 1
    )
    received = {"method": "POST", "route": "/p2p/v1/envelopes"}
    assert total(ar_after, "entraide_http_requests_total", **received) >= (
        total(ar_before, "entraide_http_requests_total", **received) + 1
    )
    reads = {"route": "/api/v1/requests/{request_id}", "status": "200"}
    assert total(es_after, "entraide_http_requests_total", **reads) > 0
    assert total(es_after, "entraide_http_request_duration_seconds_count") > total(
        es_before, "entraide_http_request_duration_seconds_count"
    )
    # Database-backed gauges: the queue drained, the audit logs grew.
    for node, before, after in ((es, es_before, es_after), (ar, ar_before, ar_after)):
        assert value(after, "entraide_database_up") == 1.0
        assert value(after, "entraide_outbox_messages", state="delivered") >= 1
        assert value(after, "entraide_outbox_messages", state="failed") == 0
        assert value(after, "entraide_audit_log_entries") > value(
            before, "entraide_audit_log_entries"
        )
        assert value(after, "entraide_witness_alarms") == 0
        assert value(after, "entraide_peers") == 1
        assert value(after, "entraide_key_age_seconds", purpose="signing") > 0
        assert total(after, "entraide_delivery_attempts_total") >= 1, node.authority_id
        assert ("entraide_audit_last_checkpoint_age_seconds", frozenset()) in after
    assert value(ar_after, "entraide_outbox_messages", state="delivered") >= 2
    # Nothing about content or callers: no request ids, tokens or client names.
    for text, node in ((es_text, es), (ar_text, ar)):
        assert "officer" not in text
        for token in node.tokens.values():
            assert token not in text

    # A refused envelope is counted by its refusal code.
    refused = httpx.post(ar.url + "/p2p/v1/envelopes", json={"not": "an envelope"})
    assert refused.status_code >= 400
    code = refused.json()["error"]
    _, ar_refused = scrape(ar)
    assert value(ar_refused, "entraide_envelopes_refused_total", code=code) == 1 + value(
        ar_after, "entraide_envelopes_refused_total", code=code
    )


@pytest.mark.e2e
def test_a_request_id_travels_from_the_caller_through_the_outbox_to_the_peer(
    pair: Pair,
) -> None:
    es, ar = pair.es, pair.ar
    trace = f"case-system-{uuid.uuid4().hex[:12]}"
    with es.client("officer") as http:
        health = http.get("/healthz", headers={"x-request-id": "bad id\x7f!"})
        generated = health.headers["x-request-id"]
        assert generated != "bad id\x7f!"
        assert len(generated) == 32
        response = http.post("/api/v1/requests", json=EXAMPLE, headers={"x-request-id": trace})
    assert response.status_code == 201, response.text
    assert response.headers["x-request-id"] == trace
    request_id = response.json()["id"]
    wait_delivered(es, request_id)

    engine = make_engine(es.database_url)
    try:
        with engine.connect() as connection:
            traces = list(
                connection.scalars(
                    select(OutboxItem.trace_id)
                    .join(Message, Message.id == OutboxItem.message_id)
                    .where(Message.request_id == request_id)
                )
            )
    finally:
        engine.dispose()
    assert traces == [trace]
    # The sender logged the submission with it; the peer logged the envelope with it.
    sent = [line for line in log_lines(es) if line.get("request_id") == trace]
    assert any(line.get("route") == "/api/v1/requests" for line in sent), sent
    arrived = wait_for(
        "the peer's log line",
        lambda: [line for line in log_lines(ar) if line.get("request_id") == trace],
    )
    assert any(line.get("route") == "/p2p/v1/envelopes" for line in arrived), arrived
    assert all(line["level"] in {"info", "warning"} for line in arrived)
    # No content in the logs: not the facts, not the token.
    for node in (es, ar):
        text = node.log_path.read_text()
        assert EXAMPLE["document"]["summary_of_facts"][:40] not in text
        assert es.tokens["officer"] not in text


@pytest.mark.e2e
def test_readyz_answers_503_naming_the_failing_check(pair: Pair) -> None:
    es = pair.es
    assert httpx.get(es.url + "/healthz").json() == {"status": "ok"}
    head = httpx.head(es.url + "/healthz")  # as a load balancer may probe (it was 405)
    assert (head.status_code, head.content) == (200, b"")
    ready = httpx.get(es.url + "/readyz").json()
    assert ready["status"] == "ready"
    assert set(ready["checks"]) >= {"database", "migrations", "keys", "worker"}
    config = alembic_config(es.database_url)
    command.stamp(config, _previous_revision(es.database_url))  # as if upgraded, unmigrated
    try:
        response = httpx.get(es.url + "/readyz")
        assert response.status_code == 503
        assert response.json()["failing"] == ["migrations"]
        assert "run `entraide migrate`" in response.json()["checks"]["migrations"]
        assert httpx.get(es.url + "/healthz").status_code == 200  # alive, not ready
    finally:
        command.stamp(config, "head")
    assert httpx.get(es.url + "/readyz").status_code == 200


def test_watching_a_node_runs_no_query_and_describes_every_family(pair: Pair) -> None:
    # Registering the node's collector happens in start-up: it must not run the scrape's
    # queries (they grow with history), and the names it declares must cover what it yields.
    node = load_node(Settings(database_url=pair.es.database_url, keys_dir=pair.es.keys_dir))
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(node.engine, "before_cursor_execute", listener)
    try:
        metrics = Metrics()
        metrics.watch(node, lambda: True)
        assert statements == []
        collector = NodeCollector(node, lambda: True)
        described = {family.name for family in collector.describe()}
        collected = {family.name for family in collector.collect()}
        assert statements, "collect() reads the database"
        assert collected <= described
    finally:
        event.remove(node.engine, "before_cursor_execute", listener)
        node.close()

"""Operators and deliveries, with real node processes: a peer that is down, deliveries that
wait, an operator who cancels one and retries another, and a worker that stops cleanly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db import make_engine
from app.localnodes import LocalNode
from app.models import OutboxItem
from tests.conftest import migrated_sqlite
from tests.e2e.conftest import EXAMPLE, audit_details, read_request, wait_for


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, LocalNode]]:
    base = tmp_path_factory.mktemp("delivery-nodes")
    fast = {"ENTRAIDE_PEER_TIMEOUT_SECONDS": "3", "ENTRAIDE_LEASE_SECONDS": "5"}
    es = LocalNode(
        "ES/MJ", "Ministerio", base / "es", migrated_sqlite(base / "es.db"), extra_env=fast
    )
    ar = LocalNode("AR/MPF", "Fiscal", base / "ar", migrated_sqlite(base / "ar.db"), extra_env=fast)
    try:
        for node in (es, ar):
            node.init(clients={role: (role,) for role in ("admin", "officer", "auditor")})
            node.start()
        es.pin(ar)
        ar.pin(es)
        yield es, ar
    finally:
        es.stop()
        ar.stop()


def _deliveries(node: LocalNode, **params: Any) -> list[dict[str, Any]]:
    with node.client("admin") as http:
        response = http.get("/api/v1/admin/deliveries", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def _submit(node: LocalNode) -> str:
    with node.client("officer") as http:
        response = http.post("/api/v1/requests", json=EXAMPLE)
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    return request_id


def test_operator_cancels_one_waiting_delivery_and_retries_another(
    pair: tuple[LocalNode, LocalNode],
) -> None:
    es, ar = pair
    ar.stop()
    keep, drop = _submit(es), _submit(es)
    waiting = wait_for(
        "both deliveries to wait for retry",
        lambda: (rows := _deliveries(es, state="retry")) and len(rows) == 2 and rows,
    )
    by_request = {row["request_id"]: row for row in waiting}
    # The worker retries them meanwhile (each is in flight for a moment): read until both wait.
    backlog = wait_for(
        "/readyz to count both as waiting for retry",
        lambda: (
            (found := es.readyz("admin").json()["delivery"])["by_state"].get("retry") == 2 and found
        ),
    )
    assert backlog["oldest_pending_age_seconds"] >= 0
    assert "delivery" not in es.readyz().json()  # not for a load balancer, nor for peers
    assert by_request[keep]["last_error"].startswith("transport:")
    assert by_request[keep]["history"][0]["outcome"] == "retry"
    assert by_request[keep]["next_attempt_at"] is not None

    # An officer cannot administer deliveries; an admin sees no content, only routing data.
    with es.client("officer") as http:
        assert http.get("/api/v1/admin/deliveries").status_code == 403
    assert "document" not in waiting[0]

    with es.client("admin") as http:
        url = f"/api/v1/admin/deliveries/{by_request[drop]['id']}/cancel"
        # Refused (409) while an attempt is under way: the worker keeps retrying meanwhile.
        cancelled = wait_for("a cancel between two attempts", lambda: _unless_in_flight(http, url))
        assert cancelled.json() == {"id": by_request[drop]["id"], "state": "cancelled"}
        again = http.post(f"/api/v1/admin/deliveries/{by_request[drop]['id']}/cancel")
        assert again.status_code == 409
        assert again.json()["error"] == "not_cancellable"
    listed = es.cli("deliveries", "list", "--state", "cancelled").stdout
    assert drop in listed
    misspelt = es.cli("deliveries", "list", "--state", "canceled", check=False)
    assert misspelt.returncode == 1  # not an empty list, as if nothing were cancelled
    assert "no state 'canceled'" in misspelt.stderr
    # The officer sees it cancelled, with no next attempt announced (as the admin view).
    (message,) = read_request(es, drop)["messages"]
    assert message["delivery"]["state"] == "cancelled"
    assert message["delivery"]["next_attempt_at"] is None

    retried = es.cli("deliveries", "retry", str(by_request[keep]["id"]))
    assert "is now queued" in retried.stdout
    ar.start()
    wait_for("the retried delivery", lambda: _deliveries(es, state="delivered"))
    (delivered,) = _deliveries(es, state="delivered")
    assert delivered["request_id"] == keep
    with ar.client("officer") as http:
        inbox = http.get("/api/v1/requests", params={"direction": "inbound"}).json()["items"]
    assert [item["id"] for item in inbox] == [keep]

    with es.client("auditor") as http:
        actions = [
            entry["action"]
            for entry in http.get("/api/v1/audit", params={"limit": 500}).json()["items"]
        ]
    assert "delivery.cancelled" in actions
    assert "delivery.retried" in actions
    # Every attempt found the peer down (no connection made): nothing of it was sent.
    (cancel,) = audit_details(es, "delivery.cancelled")
    assert cancel["peer_may_hold_it"] is False


def test_stopping_the_node_leaves_no_delivery_in_flight(pair: tuple[LocalNode, LocalNode]) -> None:
    es, ar = pair
    ar.stop()
    for _ in range(5):
        _submit(es)
    wait_for("attempts to start", lambda: len(_deliveries(es, state="retry")) >= 5)
    es.stop()  # SIGTERM: the worker finishes its attempt and hands back what it claimed
    engine = make_engine(es.database_url)
    try:
        with engine.connect() as connection:
            states = list(connection.scalars(select(OutboxItem.state)))
            owners = list(connection.scalars(select(OutboxItem.lease_owner)))
    finally:
        engine.dispose()
    assert "in_flight" not in states
    assert owners == [None] * len(owners)
    es.start()
    ar.start()
    wait_for(
        "everything delivered after restart",
        lambda: not _deliveries(es, state="retry") and not _deliveries(es, state="queued"),
        timeout=60,
    )


def _unless_in_flight(http: httpx.Client, url: str) -> httpx.Response | None:
    answer = http.post(url)
    in_flight = answer.status_code == 409 and "in_flight" in answer.json()["detail"]
    return None if in_flight else answer

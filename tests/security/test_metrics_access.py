"""/metrics needs the token of a `monitor` (or `admin`) client, unless the operator opts out.

From a security review: /metrics answered anyone who reached the node's listener, which peers
on the internet reach for /p2p/v1. Its counters (`POST /p2p/v1/envelopes` answered 201, the
audit log's size) say that envelopes arrived and when, and the fact of a request is itself
confidential (DESIGN.md 1): to the world, and to an officer not named on a restricted one.
It now takes the local API's own policy (app/deps.py): the same 401 and 403, audited and
throttled the same way. `ENTRAIDE_METRICS_PUBLIC=true` is for nodes whose proxy restricts it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import unit_of_work
from app.models import AuditEntry
from tests.conftest import Databases
from tests.requests.conftest import Harness, serve_node


@pytest.fixture
def ar(databases: Databases, tmp_path: Path) -> Iterator[Harness]:
    """A node of its own: the throttle tests block its only address."""
    with serve_node(databases.new("ar", migrated=True), tmp_path) as harness:
        yield harness


def _head(ar: Harness) -> int:
    with unit_of_work(ar.node.sessions) as session:
        last = session.scalar(select(AuditEntry.idx).order_by(AuditEntry.idx.desc()).limit(1))
    return 0 if last is None else last + 1


def _entries(ar: Harness, since: int, action: str | None = None) -> list[dict[str, Any]]:
    with unit_of_work(ar.node.sessions) as session:
        query = select(AuditEntry.entry).where(AuditEntry.idx >= since)
        if action is not None:
            query = query.where(AuditEntry.action == action)
        return [json.loads(row) for row in session.scalars(query.order_by(AuditEntry.idx))]


def _is_metrics(text: str) -> bool:
    return "entraide_audit_log_entries" in text


def test_metrics_refuse_a_call_without_a_valid_token_as_the_local_api_does(ar: Harness) -> None:
    since = _head(ar)
    bare = ar.http.get("/metrics")
    assert (bare.status_code, bare.json()["error"]) == (401, "missing_token")
    assert bare.headers["www-authenticate"] == 'Bearer realm="entraide"'
    assert not _is_metrics(bare.text)
    # No header at all: refused, and nothing written (anyone may knock), as on /api/v1.
    assert _entries(ar, since) == []
    for header, code in (("Bearer ent_guessed", "invalid_token"), ("Basic eDp5", "missing_token")):
        answer = ar.http.get("/metrics", headers={"authorization": header})
        assert (answer.status_code, answer.json()["error"]) == (401, code), header
        assert answer.headers["www-authenticate"] == 'Bearer realm="entraide"'
        assert not _is_metrics(answer.text)
    failed = _entries(ar, since, "auth.failed")
    assert [(entry["actor"], entry["outcome"], entry["details"]) for entry in failed] == [
        ("address:127.0.0.1", "invalid_token", {"route": "GET /metrics"}),
        ("address:127.0.0.1", "missing_token", {"route": "GET /metrics"}),
    ]
    assert "ent_guessed" not in json.dumps(_entries(ar, since))  # never the token


def test_guessing_tokens_on_metrics_blocks_the_address(ar: Harness) -> None:
    ar.node.settings.auth_failure_limit = 3  # this test's node only
    bad = {"authorization": "Bearer ent_guessed"}
    statuses = [ar.http.get("/metrics", headers=bad).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    # Blocked means blocked: a monitor's valid token from there is not looked at either.
    blocked = ar.get("/metrics", client="monitor")
    assert (blocked.status_code, blocked.json()["error"]) == (429, "rate_limited")
    assert int(blocked.headers["retry-after"]) > 0


@pytest.mark.parametrize("client", ["officer", "auditor"])
def test_an_officer_or_an_auditor_is_forbidden_the_metrics_on_record(
    ar: Harness, client: str
) -> None:
    """An officer must not learn from the counters that a request they were not named on
    arrived; nor is an auditor's token (the log, never the traffic) a scraper's."""
    ar.node.settings.auth_failure_limit = 2  # this test's node only
    since = _head(ar)
    answers = [ar.get("/metrics", client=client) for _ in range(3)]
    assert [(answer.status_code, answer.json()["error"]) for answer in answers] == [
        (403, "forbidden"),
        (403, "forbidden"),
        (429, "rate_limited"),
    ]
    assert answers[0].json()["detail"] == "this operation requires the role admin, monitor"
    assert not any(_is_metrics(answer.text) for answer in answers)
    forbidden = _entries(ar, since, "auth.forbidden")
    assert [(entry["actor"], entry["details"]) for entry in forbidden] == [
        (f"client:{client}", {"route": "GET /metrics", "requires": "admin, monitor"})
    ] * 2
    # Only the forbidden calls are held back: the client's own work goes on.
    own = "/api/v1/requests" if client == "officer" else "/api/v1/audit"
    assert ar.get(own, client=client).status_code == 200


@pytest.mark.parametrize("client", ["monitor", "admin"])
def test_a_monitor_or_an_admin_reads_the_metrics(ar: Harness, client: str) -> None:
    since = _head(ar)
    answer = ar.get("/metrics", client=client)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert _is_metrics(answer.text)
    assert [entry["action"] for entry in _entries(ar, since)] == []  # a scrape writes nothing


def test_a_monitor_token_opens_nothing_but_the_metrics(ar: Harness) -> None:
    for path in (
        "/api/v1/requests",
        "/api/v1/audit",
        "/api/v1/admin/peers",
        "/api/v1/openapi.json",
    ):
        answer = ar.get(path, client="monitor")
        assert (answer.status_code, answer.json()["error"]) == (403, "forbidden"), path


def test_metrics_public_serves_them_without_a_token(ar: Harness) -> None:
    """The operator's explicit choice, for a node whose proxy restricts /metrics."""
    ar.node.settings.metrics_public = True  # this test's node only
    since = _head(ar)
    bare = ar.http.get("/metrics")
    assert bare.status_code == 200, bare.text
    assert _is_metrics(bare.text)
    # A scraper still configured with a token goes on working; nothing is looked at.
    assert ar.get("/metrics", client="monitor").status_code == 200
    assert _entries(ar, since) == []


def test_metrics_are_private_unless_the_operator_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ENTRAIDE_METRICS_PUBLIC", raising=False)
    assert Settings().metrics_public is False
    monkeypatch.setenv("ENTRAIDE_METRICS_PUBLIC", "true")
    assert Settings().metrics_public is True

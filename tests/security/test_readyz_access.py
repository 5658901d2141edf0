"""/readyz tells anyone whether the node is ready; its delivery backlog only a monitor (or admin).

From review: /readyz, which takes no token so that load balancers can read it, also showed the
delivery backlog (messages by state, the oldest one's age, how many delivery workers run) to
anyone who reached the listener peers reach: when this ministry sends requests, and how many.
That is what /metrics showed until it took a token (tests/security/test_metrics_access.py),
and the fact of a request is itself confidential (DESIGN.md 1). Now the status code, `status`,
`checks` and `failing` stay public, and `delivery` goes to whoever /metrics admits. A probe
without a token is never looked up, written down or throttled; a token that is sent is
authenticated as on any route (401, 429, on record); a valid token without those roles gets
the public answer. `ENTRAIDE_METRICS_PUBLIC=true` makes the backlog public again, with the
metrics. On both backends: the tokens, the throttle and the
audit log are rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import unit_of_work
from app.main import create_app
from app.models import AuditEntry
from tests.conftest import Databases
from tests.requests.conftest import Harness, example_document, serve_node

PUBLIC_KEYS = {"status", "checks", "failing"}


@pytest.fixture
def ar(databases: Databases, tmp_path: Path) -> Iterator[Harness]:
    """A node of its own, with one delivery waiting (no worker runs): a backlog to hide.
    The throttle tests block its only address."""
    with serve_node(databases.new("ar", migrated=True), tmp_path) as harness:
        document = example_document(requesting_authority="AR/MPF", requested_authority="ES/MJ")
        submitted = harness.post("/api/v1/requests", {"to": "ES/MJ", "document": document})
        assert submitted.status_code == 201, submitted.text
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


def _public(answer: httpx.Response) -> dict[str, Any]:
    """The answer of a ready node to a caller not shown the backlog."""
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert set(body) == PUBLIC_KEYS, body
    assert body["status"] == "ready"
    assert body["failing"] == []
    assert set(body["checks"]) >= {"database", "migrations", "keys"}
    return body


def _with_backlog(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert set(body) == {*PUBLIC_KEYS, "delivery"}, body
    assert body["delivery"]["by_state"]["queued"] == 1  # the fixture's submission
    assert body["delivery"]["oldest_pending_age_seconds"] >= 0
    assert body["delivery"]["workers"] == 0  # no worker runs in this harness
    return body


def test_readyz_without_a_token_answers_readiness_but_not_the_backlog(ar: Harness) -> None:
    since = _head(ar)
    bare = _public(ar.http.get("/readyz"))
    assert "queued" not in json.dumps(bare)
    # Every spelling of the same probe: a query string, the path with a slash (redirected
    # to /readyz), HEAD (a status code and no body, as load balancers may ask).
    _public(ar.http.get("/readyz", params={"verbose": "1", "delivery": "1"}))
    _public(ar.http.get("/readyz/", follow_redirects=True))
    _public(ar.http.get("/readyz/?x=1", follow_redirects=True))
    head = ar.http.head("/readyz")
    assert (head.status_code, head.content) == (200, b"")
    # A token anywhere but the Authorization header is no token.
    monitor = ar.tokens["monitor"]
    _public(ar.http.get("/readyz", params={"access_token": monitor, "token": monitor}))
    _public(ar.http.get("/readyz", headers={"x-api-key": monitor, "cookie": f"token={monitor}"}))
    # A header without a bearer token asks for nothing here (no token is needed): not a
    # failed authentication, as it would be where a token is required.
    _public(ar.http.get("/readyz", headers={"authorization": "Basic eDp5"}))
    _public(ar.http.get("/readyz", headers={"authorization": "Bearer"}))
    assert _entries(ar, since) == []  # anyone may ask: nothing is written


@pytest.mark.parametrize("client", ["monitor", "admin"])
def test_a_monitor_or_an_admin_reads_the_backlog(ar: Harness, client: str) -> None:
    since = _head(ar)
    _with_backlog(ar.get("/readyz", client=client))
    _with_backlog(ar.http.get("/readyz?verbose=1", headers=ar.as_(client)))
    _with_backlog(ar.http.get("/readyz/", headers=ar.as_(client), follow_redirects=True))
    head = ar.http.head("/readyz", headers=ar.as_(client))
    assert (head.status_code, head.content) == (200, b"")
    assert _entries(ar, since) == []  # a probe writes nothing


def test_a_token_refused_on_readyz_is_refused_on_record_as_on_any_route(ar: Harness) -> None:
    since = _head(ar)
    for path in ("/readyz", "/readyz?x=1"):
        answer = ar.http.get(path, headers={"authorization": "Bearer ent_guessed"})
        assert (answer.status_code, answer.json()["error"]) == (401, "invalid_token"), path
        assert answer.headers["www-authenticate"] == 'Bearer realm="entraide"'
        assert "delivery" not in answer.text
    head = ar.http.head("/readyz", headers={"authorization": "Bearer ent_guessed"})
    assert (head.status_code, head.headers["entraide-error"]) == (401, "invalid_token")
    failed = _entries(ar, since, "auth.failed")
    assert [(entry["actor"], entry["outcome"], entry["details"]) for entry in failed] == [
        ("address:127.0.0.1", "invalid_token", {"route": "GET /readyz"}),
        ("address:127.0.0.1", "invalid_token", {"route": "GET /readyz"}),
        ("address:127.0.0.1", "invalid_token", {"route": "HEAD /readyz"}),
    ]
    assert "ent_guessed" not in json.dumps(_entries(ar, since))  # never the token


@pytest.mark.parametrize("client", ["officer", "auditor"])
def test_another_valid_token_gets_the_public_answer_with_nothing_on_record(
    ar: Harness, client: str
) -> None:
    """An officer must not learn from the backlog that requests they were not named on were
    sent; but the route is public and nothing was refused: a case system that sends its
    token with every call (as deploy/exchange.py does) is told whether the node is ready,
    neither 403 nor, after a few probes, 429."""
    ar.node.settings.auth_failure_limit = 2  # this test's node only: no throttle to reach
    since = _head(ar)
    for _ in range(4):
        _public(ar.get("/readyz", client=client))
        head = ar.http.head("/readyz", headers=ar.as_(client))
        assert (head.status_code, head.content) == (200, b"")
    assert _entries(ar, since) == []
    # A monitor's token from the same address is not held back by them.
    _with_backlog(ar.get("/readyz", client="monitor"))


def test_guessing_tokens_on_readyz_blocks_the_address_but_never_its_probes(
    ar: Harness,
) -> None:
    ar.node.settings.auth_failure_limit = 3  # this test's node only
    bad = {"authorization": "Bearer ent_guessed"}
    statuses = [ar.http.get("/readyz", headers=bad).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    # Blocked means blocked for tokens: a monitor's valid one from there is not looked at.
    blocked = ar.get("/readyz", client="monitor")
    assert (blocked.status_code, blocked.json()["error"]) == (429, "rate_limited")
    assert int(blocked.headers["retry-after"]) > 0
    assert ar.get("/metrics", client="monitor").status_code == 429  # one throttle for both
    # A probe without a token is neither throttled nor written down, however many.
    since = _head(ar)
    for _ in range(5):
        _public(ar.http.get("/readyz"))
        assert ar.http.head("/readyz").status_code == 200
    assert _entries(ar, since) == []


def test_probes_without_a_token_never_count_toward_the_throttle(ar: Harness) -> None:
    ar.node.settings.auth_failure_limit = 1  # this test's node only
    for _ in range(5):
        _public(ar.http.get("/readyz"))
        _public(ar.http.get("/readyz", headers={"authorization": "Basic eDp5"}))
    _with_backlog(ar.get("/readyz", client="monitor"))


def test_metrics_public_makes_the_backlog_public_with_the_metrics(ar: Harness) -> None:
    """The operator's explicit choice, for a node whose proxy restricts /metrics and /readyz
    to its monitoring: the backlog is the metrics' own figures. (Not a change: the backlog
    was public before; this keeps the opt-out whole.)"""
    ar.node.settings.metrics_public = True  # this test's node only
    since = _head(ar)
    _with_backlog(ar.http.get("/readyz"))
    # A token sent anyway is not looked at, as on /metrics.
    _with_backlog(ar.http.get("/readyz", headers={"authorization": "Bearer ent_guessed"}))
    _with_backlog(ar.get("/readyz", client="officer"))
    assert _entries(ar, since) == []


def test_the_description_says_who_sees_the_backlog_and_what_a_token_may_answer() -> None:
    paths = create_app(Settings()).openapi()["paths"]["/readyz"]
    assert set(paths) == {"get", "head"}
    for operation in paths.values():
        assert {"200", "401", "429", "503"} <= set(operation["responses"])
        assert "403" not in operation["responses"]  # another role: the public answer
    get = paths["get"]
    assert "monitor" in get["description"]
    schema = get["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["status", "checks", "failing"]  # delivery: not for all
    assert "monitor" in schema["properties"]["delivery"]["description"]


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/readyz/", "/readyz"),
        ("/readyz//?verbose=1", "/readyz?verbose=1"),
        ("/api/v1/requests/", "/api/v1/requests"),
        ("/p2p/v1/envelopes/", "/p2p/v1/envelopes"),
        ("/.well-known/entraide/", None),
        ("//evil.example/", None),
        ("//evil.example", None),
        ("/no/such/route/", None),
    ],
)
def test_a_path_a_slash_off_a_route_is_redirected_on_this_host(
    ar: Harness, path: str, location: str | None
) -> None:
    """Starlette's redirect of `/readyz/` to `/readyz` named the Host header's
    authority (`Location: http://evil.example/readyz`), so anyone could have the node answer
    a redirect to any host, which a cache or a proxy in front could keep for others. Now the
    Location is a path, relative to the URL the caller used; a path no route has is a 404,
    and nothing is redirected to another host, whatever the path."""
    answer = ar.http.get(path, headers={"host": "evil.example"})
    if location is None:
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"] == "not_found"
        assert "location" not in answer.headers
        return
    assert answer.status_code == 307, answer.text
    assert answer.headers["location"] == location

"""What a caller sends never becomes a metric label or words in the audit log, and every
refusal of a caller that presents credentials is on record, bounded (from review): a method
of the caller's own added a metric series for good; a path's text (a name, an account
number) went into `auth.failed` entries that can never be edited; a query holding a NUL and
an Authorization header without a bearer token were refused off the record; an officer
looping over a restricted id wrote an entry per call without end."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from app.db import unit_of_work
from app.models import AuditEntry
from tests.requests.conftest import Harness
from tests.requests.test_need_to_know import NEED_TO_KNOW


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


def test_a_method_of_the_callers_own_is_no_metric_label(fresh_ar: Harness) -> None:
    answer = fresh_ar.http.request("XQZMETHOD1", "/healthz")
    assert answer.status_code == 405
    metrics = fresh_ar.get("/metrics", client="monitor").text
    assert "XQZMETHOD1" not in metrics
    assert 'method="other"' in metrics


def test_a_path_is_never_written_into_the_audit_log(fresh_ar: Harness) -> None:
    ar = fresh_ar
    since = _head(ar)
    path = "/api/v1/requests/Jane%20Doe%2C%20born%201970%2C%20acct%2012345"
    answer = ar.http.get(path, headers={"authorization": "Bearer not-a-token"})
    assert answer.status_code == 401
    (failed,) = _entries(ar, since, "auth.failed")
    assert failed["details"]["route"] == "GET /api/v1/requests/{request_id}"
    assert "Jane" not in json.dumps(_entries(ar, since))


def test_a_header_without_a_bearer_token_is_a_failed_authentication(fresh_ar: Harness) -> None:
    ar = fresh_ar
    since = _head(ar)
    for header in ("Basic b2ZmaWNlcjpzZWNyZXQ=", "Bearer", "Token abc"):
        answer = ar.http.get("/api/v1/requests", headers={"authorization": header})
        assert (answer.status_code, answer.json()["error"]) == (401, "missing_token"), header
    failed = _entries(ar, since, "auth.failed")
    assert [entry["outcome"] for entry in failed] == ["missing_token"] * 3
    assert "b2ZmaWNlcjpzZWNyZXQ" not in json.dumps(failed)  # never the credential itself
    # No header at all: refused, and nothing written (anyone may knock).
    since = _head(ar)
    assert ar.http.get("/api/v1/requests").status_code == 401
    assert _entries(ar, since) == []


def test_a_nul_in_a_query_is_refused_on_record(fresh_ar: Harness) -> None:
    ar = fresh_ar
    since = _head(ar)
    answer = ar.http.get("/api/v1/requests?status=%00", headers=ar.as_("officer"))
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_request")
    (refused,) = _entries(ar, since, "api.refused")
    assert refused["actor"] == "client:officer"
    assert refused["outcome"] == "invalid_request"


def test_need_to_know_refusals_are_bounded_and_always_404(fresh_ar: Harness) -> None:
    ar = fresh_ar
    limit = ar.node.settings.auth_failure_limit
    request_id = ar.receive_request(confidentiality=NEED_TO_KNOW)
    since = _head(ar)
    answers = {
        (a.status_code, a.json()["error"])
        for a in (ar.get(f"/api/v1/requests/{request_id}", "bob") for _ in range(limit + 5))
    }
    assert answers == {(404, "unknown_request")}  # a 429 would tell it from an unknown id
    refused = [e for e in _entries(ar, since, "request.read") if e["actor"] == "client:bob"]
    assert len(refused) == limit
    assert [e["details"]["key"] for e in _entries(ar, since, "auth.throttled")] == ["hidden"]
    # Nothing else of bob's answers tells what these calls were: his calls outside his role
    # are counted apart, and refused 403 as before.
    forbidden = ar.get("/api/v1/admin/requests/restricted", "bob")
    assert (forbidden.status_code, forbidden.json()["error"]) == (403, "forbidden")

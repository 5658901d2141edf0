"""Refusals of the local API are on record: a token holder's malformed, misplaced or unknown
input (422, 400, 404, 409, 413) is an `api.refused` entry, saying who, which route and why;
refusals audited where they happen are not recorded twice; calls without a token write
nothing; and a client's entries are bounded without its calls being held back."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import select

from app.db import unit_of_work
from app.models import AuditEntry
from tests.requests.conftest import EXAMPLE, Harness


def _entries(ar: Harness, action: str, since: int) -> list[dict[str, Any]]:
    with unit_of_work(ar.node.sessions) as session:
        rows = session.scalars(
            select(AuditEntry.entry)
            .where(AuditEntry.action == action, AuditEntry.idx >= since)
            .order_by(AuditEntry.idx)
        )
        return [json.loads(row) for row in rows]


def _head(ar: Harness) -> int:
    with unit_of_work(ar.node.sessions) as session:
        last = session.scalar(select(AuditEntry.idx).order_by(AuditEntry.idx.desc()).limit(1))
    return 0 if last is None else last + 1


def test_a_token_holders_refused_calls_are_on_record(fresh_ar: Harness) -> None:
    ar = fresh_ar
    since = _head(ar)
    unknown = uuid.uuid4().hex
    invalid = ar.post("/api/v1/requests", {"to": "ES/MJ", "document": {}})
    missing = ar.get(f"/api/v1/requests/{unknown}")
    broken = ar.http.post(
        "/api/v1/requests",
        content=b"[" * 5000 + b"]" * 5000,
        headers={**ar.as_("officer"), "content-type": "application/json"},
    )
    bomb = ar.http.post(
        "/api/v1/requests",
        content=b"[" + b"0," * 300_000 + b"0]",
        headers={**ar.as_("officer"), "content-type": "application/json"},
    )
    assert (bomb.status_code, bomb.json()["error"]) == (413, "too_large")
    assert invalid.status_code == 422
    assert missing.status_code == 404
    assert (broken.status_code, broken.json()["error"]) in {
        (400, "invalid_json"),
        (422, "invalid_request"),
    }
    refused = _entries(ar, "api.refused", since)
    assert [(e["actor"], e["outcome"], e["details"]) for e in refused] == [
        ("client:officer", "invalid_request", {"route": "POST /api/v1/requests", "status": 422}),
        (
            "client:officer",
            "unknown_request",
            {"route": "GET /api/v1/requests/{request_id}", "status": 404},
        ),
        # Refused before the route's policy ran: the token's client is found all the same.
        ("client:officer", "invalid_json", {"route": "POST /api/v1/requests", "status": 400}),
        ("client:officer", "too_large", {"route": "POST /api/v1/requests", "status": 413}),
    ]
    assert refused[1]["request_id"] == unknown  # an auditor finds the probes of an id


def test_refusals_on_record_elsewhere_are_not_recorded_twice(fresh_ar: Harness) -> None:
    ar = fresh_ar
    since = _head(ar)
    forbidden = ar.get("/api/v1/requests", "auditor")
    assert forbidden.status_code == 403
    assert len(_entries(ar, "auth.forbidden", since)) == 1
    assert _entries(ar, "api.refused", since) == []


def test_calls_without_a_token_write_nothing(fresh_ar: Harness) -> None:
    ar = fresh_ar
    since = _head(ar)
    for body in (b"{not json", b'{"to": 1}'):
        answer = ar.http.post(
            "/api/v1/requests", content=body, headers={"content-type": "application/json"}
        )
        # Refused for want of a token before its body is read: not a 422 for its JSON.
        assert (answer.status_code, answer.json()["error"]) == (401, "missing_token")
        assert answer.headers["www-authenticate"] == 'Bearer realm="entraide"'
    assert _head(ar) == since


def test_a_clients_entries_are_bounded_and_its_calls_go_on(fresh_ar: Harness) -> None:
    ar = fresh_ar
    limit = ar.node.settings.auth_failure_limit
    since = _head(ar)
    statuses = {ar.post("/api/v1/requests", {"to": "ES/MJ"}).status_code for _ in range(limit + 5)}
    assert statuses == {422}  # never 429: a client's mistakes do not stop its work
    assert len(_entries(ar, "api.refused", since)) == limit
    throttled = _entries(ar, "auth.throttled", since)
    assert [e["details"]["key"] for e in throttled] == ["refused"]
    assert ar.get("/api/v1/requests").status_code == 200


def test_a_key_given_twice_is_refused_not_read_one_way(fresh_ar: Harness) -> None:
    """`{"to": "FR/MJ", "to": "AR/MPF"}`: a proxy in front of the node may read the first,
    the node read the last (and sealed it to AR/MPF). Refused, as the protocol refuses it."""
    ar = fresh_ar
    body = json.dumps({**_request_body(), "document": _request_body()["document"]})
    twice = body.replace('{"to": "ES/MJ"', '{"to": "FR/MJ", "to": "ES/MJ"', 1)
    assert twice != body
    answer = ar.http.post(
        "/api/v1/requests",
        content=twice.encode(),
        headers={**ar.as_("officer"), "content-type": "application/json"},
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert answer.json()["fields"] == [
        {"loc": ["body"], "msg": "duplicate key in a JSON object", "type": "duplicate_key"}
    ]
    assert ar.get("/api/v1/requests").json()["items"] == []  # nothing was sealed
    assert [e["outcome"] for e in _entries(ar, "api.refused", 0)] == ["invalid_request"]
    # The same body with each key once goes through.
    once = ar.http.post(
        "/api/v1/requests",
        content=body.encode(),
        headers={**ar.as_("officer"), "content-type": "application/json"},
    )
    assert once.status_code == 201, once.text


def _request_body() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    return {"to": body.pop("to"), **body}

"""`Idempotency-Key`: a case system that lost the answer to its submission sends it again
with the same key, and the node answers as the first time and seals nothing twice."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.models import IdempotencyKey, Message, OutboxItem
from app.requests import idempotency, service
from tests.requests.conftest import EXAMPLE, Harness


def _body(**document: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["document"].update(document)
    return body


def _post(
    ar: Harness, path: str, body: object, key: str, client: str = "officer"
) -> httpx.Response:
    return ar.http.post(path, json=body, headers={**ar.as_(client), "Idempotency-Key": key})


def _outbound(ar: Harness) -> int:
    with unit_of_work(ar.node.sessions) as session:
        return int(session.scalar(select(func.count()).select_from(OutboxItem)) or 0)


def test_a_submission_sent_again_with_its_key_is_answered_not_sent_twice(
    fresh_ar: Harness,
) -> None:
    ar = fresh_ar
    key = str(uuid.uuid4())
    first = _post(ar, "/api/v1/requests", _body(), key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = _post(ar, "/api/v1/requests", _body(), key)
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert _outbound(ar) == 1  # one envelope sealed and queued, not two

    # The key with another call: refused, nothing sent.
    other = _post(ar, "/api/v1/requests", _body(purpose="Another purpose altogether."), key)
    assert (other.status_code, other.json()["error"]) == (422, "idempotency_key_reused")
    # Keys are each client's own: another client's same key is another submission.
    alice = _post(ar, "/api/v1/requests", _body(), key, client="alice")
    assert alice.status_code == 201
    assert alice.json()["id"] != first.json()["id"]
    assert _outbound(ar) == 2


def test_a_refused_submission_takes_no_key(fresh_ar: Harness) -> None:
    ar = fresh_ar
    key = "case-2026-0042"
    refused = _post(ar, "/api/v1/requests", {**_body(), "to": "FR/MJ"}, key)
    assert refused.status_code in (400, 404, 422), refused.text
    fixed = _post(ar, "/api/v1/requests", _body(), key)
    assert fixed.status_code == 201, fixed.text
    assert "idempotent-replayed" not in fixed.headers


def test_a_message_sent_again_with_its_key_is_one_message(fresh_ar: Harness) -> None:
    ar = fresh_ar
    request_id = ar.receive_request()
    ack = {"document": {"type": "acknowledgement", "text": "Registered."}}
    path = f"/api/v1/requests/{request_id}/messages"
    first = _post(ar, path, ack, "ack-1")
    again = _post(ar, path, ack, "ack-1")
    assert first.status_code == again.status_code == 201, again.text
    assert again.json() == first.json()
    assert ar.messages(request_id) == 2  # the request and one acknowledgement
    # The same key on another request's messages is another call.
    second_request = ar.receive_request()
    reused = _post(ar, f"/api/v1/requests/{second_request}/messages", ack, "ack-1")
    assert (reused.status_code, reused.json()["error"]) == (422, "idempotency_key_reused")


def test_two_calls_with_one_key_at_once_are_one_submission(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first holds its key, uncommitted, while the second arrives (PostgreSQL: the
    second waits for it, then answers with what it stored)."""
    ar = fresh_ar
    real = service.submit_request

    def slow(*args: Any, **kwargs: Any) -> Any:
        done = real(*args, **kwargs)
        time.sleep(0.5)  # the key and the request held, not yet committed
        return done

    monkeypatch.setattr(service, "submit_request", slow)
    answers: list[httpx.Response] = []

    def call() -> None:
        answers.append(_post(ar, "/api/v1/requests", _body(), "at-once"))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(30)
    assert sorted(answer.status_code for answer in answers) == [201, 201]
    assert answers[0].json() == answers[1].json()
    assert _outbound(ar) == 1
    assert [a.headers.get("idempotent-replayed") for a in answers].count("true") == 1


def test_keys_are_forgotten_after_their_days(fresh_ar: Harness) -> None:
    ar = fresh_ar
    assert _post(ar, "/api/v1/requests", _body(), "old-key").status_code == 201
    later = utc_now() + timedelta(days=idempotency.IDEMPOTENCY_DAYS, seconds=1)
    with unit_of_work(ar.node.sessions) as session:
        assert idempotency.prune(session, later) == 1
        assert session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
        # The request itself stays, of course.
        assert session.scalar(select(func.count()).select_from(Message)) == 1

"""Two copies of one message that moves a request's status arrive at once (the sender retried
after a timeout while the first copy was still being stored): one is accepted, the other is
answered as the repeat it is, with the same receipt, never refused.

Both copies passed the repeat check (protocol §9 step 18) before either was stored; the
second then waited for the conversation's lock and, seeing the status the first had moved,
was refused for good (409 transition_not_allowed), so its sender marked a delivered message
failed. PostgreSQL only: SQLite's writer lock makes the copies take turns from the start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from app.p2p import service
from tests.conftest import make_databases
from tests.requests.conftest import Harness, serve_node


@pytest.fixture
def ar_pg(tmp_path: Path) -> Iterator[Harness]:
    databases = make_databases("postgresql", tmp_path)
    try:
        with serve_node(databases.new("ar", migrated=True), tmp_path / "ar") as harness:
            yield harness
    finally:
        databases.drop_all()


def _both_past_the_repeat_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first two repeat checks wait for each other: each copy has looked, found
    nothing, and goes on, before either is stored."""
    barrier = threading.Barrier(2, timeout=10)
    looked = []
    lock = threading.Lock()
    real = service.stored_message

    def stored_message(session: Session, msg_id: str) -> Any:
        found = real(session, msg_id)
        with lock:
            looked.append(msg_id)
            first_two = len(looked) <= 2
        if first_two:
            barrier.wait()
        return found

    monkeypatch.setattr(service, "stored_message", stored_message)


def _at_once(post: Callable[[], httpx.Response]) -> list[httpx.Response]:
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(post())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return answers


@pytest.mark.parametrize("route", ["single", "batch"])
def test_two_copies_of_a_withdrawal_arriving_together_are_one_message_and_a_repeat(
    ar_pg: Harness, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    ar = ar_pg
    request_id = ar.receive_request()
    withdrawal = ar.seal_message(request_id, {"type": "withdrawal", "text": "no longer needed"})
    wire = withdrawal.to_wire()
    refused_before = len(ar.audit("envelope.refused"))
    _both_past_the_repeat_check(monkeypatch)
    if route == "single":
        answers = _at_once(lambda: ar.http.post("/p2p/v1/envelopes", json=wire))
        statuses = sorted(answer.status_code for answer in answers)
        receipts = {answer.json()["receipt"] for answer in answers}
    else:
        batch = {"v": 1, "envelopes": [wire]}
        answers = _at_once(lambda: ar.http.post("/p2p/v1/envelopes/batch", json=batch))
        assert [answer.status_code for answer in answers] == [200, 200]
        results = [answer.json()["results"][0] for answer in answers]
        statuses = sorted(result["status"] for result in results)
        receipts = {result.get("receipt") for result in results}
    assert statuses == [200, 201], [answer.text for answer in answers]
    assert len(receipts) == 1  # the same receipt for both copies
    assert ar.status(request_id) == "withdrawn"
    assert ar.messages(request_id) == 2
    assert len(ar.audit("envelope.refused")) == refused_before
    assert len(ar.audit("envelope.repeated")) >= 1

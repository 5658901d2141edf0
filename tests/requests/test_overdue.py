"""Overdue queries return exactly the requests past their deadline, at any fixed moment."""

from __future__ import annotations

import datetime as dt
from typing import Any

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.requests.overdue import overdue_counts
from tests.requests.conftest import Harness, example_document

DAY = dt.timedelta(days=1)
TICK = dt.timedelta(microseconds=1)


def _end_of(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day + DAY, dt.time(), tzinfo=dt.UTC)


def _routine() -> dict[str, Any]:
    return {"level": "routine"}


def _ids(ar: Harness, **params: Any) -> set[str]:
    response = ar.get("/api/v1/requests", limit=200, **params)
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["items"]}


def test_overdue_and_due_before_with_a_fixed_clock(fresh_ar: Harness) -> None:
    ar = fresh_ar
    today = utc_now().date()
    requested = today + 3 * DAY
    postponed_until = today + 10 * DAY
    ack = {"type": "acknowledgement", "text": "Registered."}
    accept = {"type": "acceptance", "text": "Accepted."}

    routine = ar.receive_request(urgency=_routine())
    urgent = ar.receive_request(
        urgency={
            "level": "urgent",
            "reason": "Funds are being moved.",
            "requested_date": str(requested),
        }
    )
    preservation = ar.receive_request(request_type="expedited_preservation", urgency=_routine())
    acknowledged = ar.receive_request(urgency=_routine())
    accepted = ar.receive_request(urgency=_routine())
    postponed = ar.receive_request(urgency=_routine())
    executed = ar.receive_request(urgency=_routine())
    refused = ar.receive_request(urgency=_routine())
    for request_id in (acknowledged, accepted, postponed, executed, refused):
        assert ar.reply(request_id, ack).status_code == 201
    for request_id in (accepted, executed):
        assert ar.reply(request_id, accept).status_code == 201
    postponement = {
        "type": "postponement",
        "text": "Postponed.",
        "reason": "It would interfere with an investigation here.",
        "until": str(postponed_until),
    }
    assert ar.reply(postponed, postponement).status_code == 201
    assert ar.reply(executed, {"type": "result", "text": "Done."}).status_code == 201
    refusal = {
        "type": "refusal",
        "text": "Refused.",
        "reasons": [{"ground": "no_dual_criminality", "explanation": "Not an offence here."}],
    }
    assert ar.reply(refused, refusal).status_code == 201
    # And one of ours, sent to ES/MJ: AR/MPF waits for its acknowledgement.
    outbound_document = example_document(
        requesting_authority="AR/MPF", requested_authority="ES/MJ", urgency=_routine()
    )
    sent = ar.post("/api/v1/requests", {"to": "ES/MJ", "document": outbound_document})
    assert sent.status_code == 201, sent.text
    outbound = sent.json()["id"]

    created = {item["id"]: item for item in ar.get("/api/v1/requests", limit=200).json()["items"]}
    arrived = {rid: dt.datetime.fromisoformat(item["created_at"]) for rid, item in created.items()}
    expected: dict[str, dt.datetime | None] = {
        routine: arrived[routine] + 7 * DAY,
        urgent: _end_of(requested),  # the requested date comes before the 7 days
        preservation: arrived[preservation] + 1 * DAY,
        acknowledged: arrived[acknowledged] + 30 * DAY,
        accepted: arrived[accepted] + 90 * DAY,
        postponed: _end_of(postponed_until),
        executed: None,
        refused: None,
        outbound: arrived[outbound] + 7 * DAY,
    }
    assert {rid: item["status"] for rid, item in created.items()} == {
        routine: "delivered",
        urgent: "delivered",
        preservation: "delivered",
        acknowledged: "acknowledged",
        accepted: "accepted",
        postponed: "postponed",
        executed: "executed",
        refused: "refused",
        outbound: "queued",
    }
    for rid, due in expected.items():
        shown = created[rid]["due_at"]
        assert (dt.datetime.fromisoformat(shown) if shown else None) == due, rid
    assert created[urgent]["deadlines"]["requested_date"] == str(requested)
    assert created[postponed]["deadlines"]["postponed_until"] == str(postponed_until)

    # Every deadline, a moment before, at, and a moment after it; and some moments between.
    moments = {utc_now(), utc_now() + 200 * DAY}
    for due in expected.values():
        if due is not None:
            moments |= {due - TICK, due, due + TICK}
    for now in sorted(moments):
        ar.clock.now = now
        late = {rid for rid, due in expected.items() if due is not None and due < now}
        assert _ids(ar, overdue="true") == late, now
        assert _ids(ar, overdue="false") == set(expected) - late, now
        assert _ids(ar, due_before=now.isoformat()) == late, now
        assert _ids(ar, overdue="true", direction="inbound") == late - {outbound}
        flags = {item["id"]: item["overdue"] for item in ar.get("/api/v1/requests").json()["items"]}
        assert {rid for rid, flag in flags.items() if flag} == late
        with unit_of_work(ar.node.sessions) as session:
            counts = overdue_counts(session, now=now)
        assert sum(counts.values()) == len(late)
        assert counts.get(("outbound", "queued"), 0) == len(late & {outbound})

    # due_before looks ahead: what falls due in the next week, late ones included.
    ar.clock.now = None
    week = utc_now() + 7 * DAY + dt.timedelta(hours=1)
    soon = {rid for rid, due in expected.items() if due is not None and due < week}
    assert _ids(ar, due_before=week.isoformat()) == soon
    assert {routine, urgent, preservation, outbound} <= soon
    # A naive time is ambiguous by the UTC offset: refused, not guessed.
    naive = ar.get("/api/v1/requests", due_before="2026-12-01T00:00:00")
    assert naive.status_code == 422
    assert naive.json()["fields"][0]["loc"] == ["query", "due_before"]


def test_the_deadline_moves_with_the_state(ar: Harness) -> None:
    request_id = ar.receive_request(urgency=_routine())

    def due() -> dt.datetime | None:
        value = ar.get(f"/api/v1/requests/{request_id}").json()["due_at"]
        return dt.datetime.fromisoformat(value) if value else None

    detail = ar.get(f"/api/v1/requests/{request_id}").json()
    arrived = dt.datetime.fromisoformat(detail["created_at"])
    assert due() == arrived + 7 * DAY
    ar.reply(request_id, {"type": "acknowledgement", "text": "Registered."})
    assert due() == arrived + 30 * DAY
    ar.reply(request_id, {"type": "additional_information_request", "text": "Which period?"})
    assert due() == arrived + 30 * DAY  # the clock does not stop while information is awaited
    assert (
        ar.peer_sends(
            request_id, {"type": "additional_information", "text": "August to November."}
        ).status_code
        == 201
    )
    ar.reply(request_id, {"type": "acceptance", "text": "Accepted."})
    assert due() == arrived + 90 * DAY
    ar.reply(request_id, {"type": "partial_result", "text": "The bank records."})
    assert due() == arrived + 90 * DAY
    ar.reply(request_id, {"type": "result", "text": "The provider's records."})
    assert due() is None
    assert ar.peer_sends(request_id, {"type": "closure", "text": "Thank you."}).status_code == 201
    assert ar.status(request_id) == "closed"
    assert due() is None


def test_overdue_requests_are_counted_in_metrics(fresh_ar: Harness) -> None:
    ar = fresh_ar
    yesterday = utc_now().date() - DAY
    late = ar.receive_request(
        urgency={"level": "urgent", "reason": "A hearing.", "requested_date": str(yesterday)}
    )
    ar.receive_request(urgency=_routine())
    assert _ids(ar, overdue="true") == {late}
    # A restricted one, as late, is not counted: /metrics is no officer's (a scraper's token,
    # or anyone's with ENTRAIDE_METRICS_PUBLIC), and the difference with an officer's own
    # list would count the requests hidden from them (from review).
    hidden = ar.receive_request(
        urgency={"level": "urgent", "reason": "A hearing.", "requested_date": str(yesterday)},
        confidentiality={"level": "need_to_know", "use_limitation": "Only in DP 1873/2026."},
    )
    assert hidden not in _ids(ar, overdue="true")
    metrics = ar.get("/metrics", client="monitor").text
    assert 'entraide_requests_overdue{direction="inbound",status="delivered"} 1.0' in metrics
    assert ar.reply(late, {"type": "acknowledgement", "text": "Registered."}).status_code == 201
    metrics = ar.get("/metrics", client="monitor").text
    assert 'entraide_requests_overdue{direction="inbound",status="acknowledged"} 1.0' in metrics
    assert 'status="delivered"' not in metrics.split("entraide_requests_overdue", 1)[1]


def test_the_last_date_there_is_makes_a_deadline_not_a_server_error(fresh_ar: Harness) -> None:
    # 9999-12-31 has no next day: its end used to overflow, a 500 for the officer and for the
    # peer whose request or postponement carried it (its whole batch refused with it).
    ar = fresh_ar
    last = str(dt.date.max)
    urgency = {"level": "urgent", "reason": "A hearing.", "requested_date": last}
    urgent = ar.receive_request(urgency=urgency)
    document = example_document(
        requesting_authority="AR/MPF", requested_authority="ES/MJ", urgency=urgency
    )
    sent = ar.post("/api/v1/requests", {"to": "ES/MJ", "document": document})
    assert sent.status_code == 201, sent.text
    postponed = ar.receive_request(urgency=_routine())
    ack = {"type": "acknowledgement", "text": "Registered."}
    assert ar.reply(postponed, ack).status_code == 201
    until = {"type": "postponement", "text": "Postponed.", "reason": "Later.", "until": last}
    assert ar.reply(postponed, until).status_code == 201

    created = {item["id"]: item for item in ar.get("/api/v1/requests", limit=200).json()["items"]}
    arrived = dt.datetime.fromisoformat(created[urgent]["created_at"])
    assert dt.datetime.fromisoformat(created[urgent]["due_at"]) == arrived + 7 * DAY
    assert created[postponed]["due_at"].startswith("9999-12-31T00:00:00")
    assert _ids(ar, overdue="true") == set()

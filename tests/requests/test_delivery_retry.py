"""An operator's retry of a failed delivery gives it the deadline its urgency sets, from now:
it was given the envelope's own expiry (seven days), so an urgent or emergency delivery
retried went on quietly for a week instead of failing loudly within hours (from review)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.delivery import outbox
from app.delivery.retry import POLICIES
from app.models import Message, OutboxItem
from tests.requests.conftest import EXAMPLE, Harness


def _request() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    return body


def test_a_retried_delivery_keeps_its_urgencys_deadline(ar: Harness) -> None:
    assert EXAMPLE["document"]["urgency"]["level"] == "urgent"
    submitted = ar.post("/api/v1/requests", _request())
    assert submitted.status_code == 201, submitted.text
    with unit_of_work(ar.node.sessions) as session:
        delivery = session.scalars(
            select(OutboxItem.id)
            .join(Message, Message.id == OutboxItem.message_id)
            .where(Message.request_id == submitted.json()["id"])
        ).one()
        # Failed: its urgent day went by without the peer answering.
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == delivery)
            .values(state=outbox.FAILED, expires_at=utc_now() - timedelta(minutes=1))
        )
    before = utc_now()

    retried = ar.http.post(f"/api/v1/admin/deliveries/{delivery}/retry", headers=ar.as_("admin"))

    assert retried.status_code == 200, retried.text
    with unit_of_work(ar.node.sessions) as session:
        item = session.get(OutboxItem, delivery)
        assert item is not None
        assert item.expires_at is not None
        deadline = item.expires_at - before
    urgent = POLICIES["urgent"].expiry
    assert urgent - timedelta(seconds=1) <= deadline <= urgent + timedelta(seconds=30), deadline

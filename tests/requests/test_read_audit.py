"""A read of a request says which messages it decrypted: how many, and the newest (from an
auditor's review: a court asking whether an officer had read a reply had only the count)."""

from __future__ import annotations

import json

from sqlalchemy import select

from app.db import unit_of_work
from app.models import AuditEntry
from tests.requests.conftest import Harness


def test_a_read_names_the_newest_message_it_showed(ar: Harness) -> None:
    request_id = ar.receive_request()
    ack = ar.reply(request_id, {"type": "acknowledgement", "text": "Registered."})
    assert ack.status_code == 201, ack.text
    response = ar.get(f"/api/v1/requests/{request_id}")
    assert response.status_code == 200, response.text
    with unit_of_work(ar.node.sessions) as session:
        entry = session.scalars(
            select(AuditEntry.entry)
            .where(AuditEntry.action == "request.read", AuditEntry.request_id == request_id)
            .order_by(AuditEntry.idx.desc())
        ).first()
    assert entry is not None
    details = json.loads(entry)["details"]
    assert details == {"messages": 2, "last_msg_id": ack.json()["msg_id"]}

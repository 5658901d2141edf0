"""A peer learns nothing of another peer's conversations: a message naming one is refused
exactly as a message naming an id never used (from review: the detail said "with this
sender" only when the conversation existed with someone else)."""

from __future__ import annotations

import os

from sqlalchemy import update

from app.db import unit_of_work
from app.models import CaseFile
from tests.requests.conftest import Harness

ACK = {"type": "acknowledgement", "text": "Registered."}


def test_another_peers_conversation_is_refused_as_an_unknown_one(ar: Harness) -> None:
    theirs = ar.receive_request()
    with unit_of_work(ar.node.sessions) as session:  # as if FR/MJ had opened it
        session.execute(
            update(CaseFile).where(CaseFile.id == theirs).values(peer_authority="FR/MJ")
        )
    never = os.urandom(16).hex()
    ar.last_msg[never] = never

    answers = [ar.peer_sends(request_id, ACK) for request_id in (theirs, never)]

    assert [a.status_code for a in answers] == [409, 409]
    assert answers[0].json() == answers[1].json(), [a.json() for a in answers]

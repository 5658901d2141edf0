"""A batch's receipts carry one checkpoint of our log, read once for the whole batch."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import event

from app.audit.checkpoints import sign_checkpoint
from app.crypto.receipts import decode_receipt
from app.db import unit_of_work
from tests.requests.conftest import Harness, example_document


def test_a_batch_reads_the_latest_checkpoint_once_and_every_receipt_carries_it(
    fresh_ar: Harness,
) -> None:
    node = fresh_ar.node
    with unit_of_work(node.sessions) as session:
        checkpoint = sign_checkpoint(session, authority_id=node.authority_id, log_key=node.keys.log)
        assert checkpoint is not None
        note = checkpoint.note
    envelopes = [
        fresh_ar._seal({"kind": "request", "document": example_document()}, None, None)
        for _ in range(5)
    ]
    engine = node.sessions.kw["bind"]
    reads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM audit_checkpoints" in statement:
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        response = fresh_ar.http.post(
            "/p2p/v1/envelopes/batch",
            json={"v": 1, "envelopes": [envelope.to_wire() for envelope in envelopes]},
        )
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result["status"] for result in results] == [201] * 5
    notes = {
        json.loads(decode_receipt({k: v for k, v in result.items() if k != "status"}).body)[
            "checkpoint"
        ]
        for result in results
    }
    assert notes == {note}
    assert len(reads) == 1, reads

    # The next batch is another transaction: it reads the checkpoint signed since.
    with unit_of_work(node.sessions) as session:
        newer = sign_checkpoint(session, authority_id=node.authority_id, log_key=node.keys.log)
        assert newer is not None
        assert newer.note != note
    second = fresh_ar.http.post(
        "/p2p/v1/envelopes/batch",
        json={
            "v": 1,
            "envelopes": [
                fresh_ar._seal(
                    {"kind": "request", "document": example_document()}, None, None
                ).to_wire()
            ],
        },
    )
    assert second.status_code == 200, second.text
    (answer,) = second.json()["results"]
    body = decode_receipt({k: v for k, v in answer.items() if k != "status"}).body
    assert json.loads(body)["checkpoint"] == newer.note

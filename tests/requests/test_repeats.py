"""A repeat of an envelope this node holds is always answered with its stored receipt; the
first few repeats of a message are audited one by one, the rest counted (from review: anyone
holding a copy could grow the audit log without end, one entry per repeat)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, update

from app.crypto.encoding import canonical_json
from app.crypto.envelope import WireEnvelope
from app.crypto.receipts import decode_receipt, verify_receipt
from app.db import unit_of_work
from app.models import AuditEntry, Message, Receipt
from app.p2p.service import REPEATS_AUDITED
from tests.requests.conftest import Harness, example_document


def _envelope(ar: Harness) -> WireEnvelope:
    return ar._seal({"kind": "request", "document": example_document()}, None, None)


def test_repeats_are_answered_always_and_audited_up_to_a_limit(fresh_ar: Harness) -> None:
    ar = fresh_ar
    envelope = _envelope(ar)
    first = ar.post_envelope(envelope)
    assert first.status_code == 201, first.text
    answers = [ar.post_envelope(envelope) for _ in range(REPEATS_AUDITED + 5)]
    assert {answer.status_code for answer in answers} == {200}
    assert all(answer.json() == first.json() for answer in answers)  # the same receipt
    assert len(ar.audit("envelope.repeated")) == REPEATS_AUDITED
    (counted,) = ar.audit("auth.throttled")
    assert counted[0] == "peer:ES/MJ"
    # Another message's repeats have their own count.
    other = _envelope(ar)
    assert ar.post_envelope(other).status_code == 201
    assert ar.post_envelope(other).status_code == 200
    assert len(ar.audit("envelope.repeated")) == REPEATS_AUDITED + 1


def _rewrite_receipt(ar: Harness, msg_id: str, **changes: object) -> bytes:
    """An insider's edit of our stored receipt (the database, not the keys): returns the
    body as it was."""
    with unit_of_work(ar.node.sessions) as session:
        row = session.scalars(
            select(Receipt)
            .join(Message, Message.id == Receipt.message_id)
            .where(Message.msg_id == msg_id)
        ).one()
        original = bytes(row.body)
        row.body = canonical_json({**json.loads(original), **changes})
    return original


def _put_back(ar: Harness, msg_id: str, body: bytes) -> None:
    with unit_of_work(ar.node.sessions) as session:
        message_id = select(Message.id).where(Message.msg_id == msg_id).scalar_subquery()
        session.execute(update(Receipt).where(Receipt.message_id == message_id).values(body=body))


@pytest.mark.parametrize(
    "changes",
    [
        # Named for a key this node does not hold: it was signed again as it stood.
        {"signer_kid": "ff" * 16, "received_at": "2020-01-01T00:00:00Z"},
        {"signer_kid": "ff" * 16, "envelope_hash": "ab" * 32},
        # Named for our key: its signature no longer verifies.
        {"received_at": "2020-01-01T00:00:00Z"},
    ],
)
def test_a_repeat_signs_nothing_an_insider_wrote_into_a_stored_receipt(
    ar: Harness, changes: dict[str, object]
) -> None:
    """From review: a repeat's receipt was signed again with our current key from whatever
    the stored row said, whenever it named another key: an insider able to edit the
    database, not to use our keys, got any receipt statement signed (a backdated time,
    another envelope). The stored receipt is checked first; if it does not check out, the
    repeat is answered 500 and audited, and the sender, retrying, gets the receipt once the
    row is mended."""
    envelope = _envelope(ar)
    first = ar.post_envelope(envelope)
    assert first.status_code == 201, first.text
    msg_id = json.loads(envelope.header)["msg_id"]
    original = _rewrite_receipt(ar, msg_id, **changes)

    repeat = ar.post_envelope(envelope)
    batch = ar.http.post(
        "/p2p/v1/envelopes/batch",
        json={"v": 1, "envelopes": [envelope.to_wire(), _envelope(ar).to_wire()]},
    )

    assert (repeat.status_code, repeat.json().get("error")) == (500, "stored_envelope_corrupt"), (
        repeat.text
    )
    assert batch.status_code == 200, batch.text
    assert [item["status"] for item in batch.json()["results"]] == [500, 201]
    corrupt = [e for e in ar.audit("envelope.repeated") if e[1] == "stored_envelope_corrupt"]
    assert len(corrupt) >= 2
    _put_back(ar, msg_id, original)
    assert ar.post_envelope(envelope).json() == first.json()


def test_a_stored_receipt_of_a_key_no_longer_held_is_signed_again_as_its_message_says(
    ar: Harness,
) -> None:
    """Its key replaced outside a rotation (after a compromise): the stored signature cannot
    be checked, and only the statement that the message's row backs is signed again. A
    signer id that is not even ASCII was a TypeError (a 500) in the key lookup."""
    envelope = _envelope(ar)
    first = ar.post_envelope(envelope)
    assert first.status_code == 201, first.text
    msg_id = json.loads(envelope.header)["msg_id"]
    original = _rewrite_receipt(ar, msg_id, signer_kid="é" * 32)
    repeat = ar.post_envelope(envelope)
    _put_back(ar, msg_id, original)
    assert repeat.status_code == 200, repeat.text
    expected = {
        "msg_id": msg_id,
        "envelope_hash": envelope.envelope_hash,
        "from_authority": "ES/MJ",
        "to_authority": "AR/MPF",
    }
    keys = ar.node.keys
    again = verify_receipt(
        decode_receipt(repeat.json()), signer_public=keys.signing_public, **expected
    )
    before = verify_receipt(
        decode_receipt(first.json()), signer_public=keys.signing_public, **expected
    )
    assert again.received_at == before.received_at
    assert again.checkpoint is None  # nothing the message's row can vouch for


def test_a_stored_receipt_no_key_checks_is_signed_again_only_if_the_log_issued_it(
    ar: Harness,
) -> None:
    """From review: the two rows alone (a message and a receipt naming a key this node never
    had) made the node sign a receipt for an envelope it had refused, for anyone who could
    write them, and a custody proof of it verified. Signed again only if the Merkle log holds
    the `receipt.issued` entry of that envelope: in the bytes it hashed, not in the columns
    queries read (relabelling another entry of the envelope does not do)."""
    envelope = _envelope(ar)
    assert ar.post_envelope(envelope).status_code == 201
    msg_id = json.loads(envelope.header)["msg_id"]
    original = _rewrite_receipt(ar, msg_id, signer_kid="ff" * 16)
    entries = {}
    with unit_of_work(ar.node.sessions) as session:
        for action in ("receipt.issued", "envelope.received"):
            row = session.scalar(
                select(AuditEntry).where(AuditEntry.action == action, AuditEntry.msg_id == msg_id)
            )
            assert row is not None
            entries[action] = (row.idx, bytes(row.entry))
        issued_idx, issued = entries["receipt.issued"]
        received_idx, _ = entries["envelope.received"]
        session.execute(  # the log's entry altered: no longer the bytes it committed to
            update(AuditEntry)
            .where(AuditEntry.idx == issued_idx)
            .values(entry=issued.replace(b"receipt.issued", b"receipt.issueD"))
        )
        session.execute(  # another entry of the envelope, relabelled in its columns
            update(AuditEntry).where(AuditEntry.idx == received_idx).values(action="receipt.issued")
        )
    try:
        repeat = ar.post_envelope(envelope)
        assert (repeat.status_code, repeat.json()["error"]) == (500, "stored_envelope_corrupt")
    finally:
        with unit_of_work(ar.node.sessions) as session:
            session.execute(
                update(AuditEntry).where(AuditEntry.idx == issued_idx).values(entry=issued)
            )
            session.execute(
                update(AuditEntry)
                .where(AuditEntry.idx == received_idx)
                .values(action="envelope.received")
            )
    assert ar.post_envelope(envelope).status_code == 200  # on record again: signed again
    _put_back(ar, msg_id, original)

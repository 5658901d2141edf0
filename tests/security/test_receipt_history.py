"""A receipt the peer stored before it rotated its key verifies with that key, from our pin
history, when it was valid; so a delivery whose first answer was lost is not failed because
the peer's key has moved on since (its repeat is answered with the stored receipt)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.crypto.envelope import WireEnvelope
from app.crypto.keys import NodeKeys
from app.crypto.receipts import (
    ReceiptError,
    SignedReceipt,
    decode_receipt,
    issue_receipt,
    verify_receipt,
)
from app.db import unit_of_work
from app.models import Peer, PeerKey
from app.peers.keys import verify_peer_receipt
from tests.conftest import migrated_sqlite
from tests.requests.conftest import Harness, example_document, serve_node

MSG_ID = "ab" * 16
ENVELOPE_HASH = "cd" * 32


@pytest.fixture
def rotated(tmp_path: Path) -> Iterator[tuple[Harness, NodeKeys, datetime]]:
    """AR/MPF has ES/MJ pinned, then follows a rotation of ES/MJ's signing key: the first
    key is kept in the history, superseded at the returned moment."""
    with serve_node(migrated_sqlite(tmp_path / "ar.db"), tmp_path / "ar") as ar:
        first = ar.peer_keys
        second = NodeKeys.generate()
        rotated_at = utc_now() - timedelta(hours=1)
        with unit_of_work(ar.node.sessions) as session:
            peer = session.scalar(select(Peer).where(Peer.authority_id == "ES/MJ"))
            assert peer is not None
            row = session.scalar(
                select(PeerKey).where(
                    PeerKey.peer_authority == "ES/MJ", PeerKey.kid == first.signing_kid
                )
            )
            assert row is not None  # pinning recorded it
            row.superseded_at = rotated_at
            peer.signing_key, peer.signing_kid = second.signing_public, second.signing_kid
        yield ar, second, rotated_at


def _receipt(keys: NodeKeys, received_at: datetime) -> SignedReceipt:
    return issue_receipt(
        keys.signing,
        signer_kid=keys.signing_kid,
        msg_id=MSG_ID,
        envelope_hash=ENVELOPE_HASH,
        from_authority="AR/MPF",
        to_authority="ES/MJ",
        received_at=received_at,
        checkpoint=None,
    )


def _verify(ar: Harness, second: NodeKeys, signed: SignedReceipt, *, sealed_at: datetime) -> object:
    with httpx.Client(timeout=2) as http:
        return verify_peer_receipt(
            ar.node,
            http,
            signed,
            authority="ES/MJ",
            signer_public=second.signing_public,
            signer_kid=second.signing_kid,
            msg_id=MSG_ID,
            envelope_hash=ENVELOPE_HASH,
            from_authority="AR/MPF",
            sealed_at=sealed_at,
        )


def test_a_stored_receipt_signed_before_the_rotation_verifies(
    rotated: tuple[Harness, NodeKeys, datetime],
) -> None:
    ar, second, rotated_at = rotated
    before = _receipt(ar.peer_keys, rotated_at - timedelta(minutes=5))
    assert _verify(ar, second, before, sealed_at=rotated_at - timedelta(minutes=6)) is not None


@pytest.mark.parametrize("kid", ["\u00e9" * 32, "AB" * 16, "x" * 32, 32])
def test_a_receipt_naming_no_key_id_is_refused_as_a_bad_receipt(
    rotated: tuple[Harness, NodeKeys, datetime], kid: object
) -> None:
    # A broken or hostile peer's receipt names a signer that is no key id (unsigned: the
    # first check already fails): a refused receipt, not an error in the worker (non-ASCII
    # text reached hmac.compare_digest, which raised a TypeError, and with it the batch).
    ar, second, _ = rotated
    body = json.dumps({"signer_kid": kid, "received_at": "2026-11-29T12:00:00Z"}).encode()
    with pytest.raises(ReceiptError):
        _verify(ar, second, SignedReceipt(body, bytes(64)), sealed_at=utc_now())


def test_the_old_key_signs_nothing_after_its_rotation(
    rotated: tuple[Harness, NodeKeys, datetime],
) -> None:
    ar, second, rotated_at = rotated
    after = _receipt(ar.peer_keys, rotated_at + timedelta(minutes=5))
    with pytest.raises(ReceiptError):
        _verify(ar, second, after, sealed_at=rotated_at - timedelta(minutes=6))


def test_the_old_key_cannot_backdate_a_receipt_for_a_later_envelope(
    rotated: tuple[Harness, NodeKeys, datetime],
) -> None:
    # Whoever still holds the retired key signs a receipt for an envelope we sealed after the
    # rotation, claiming a time before it: refused, the envelope did not exist then.
    ar, second, rotated_at = rotated
    backdated = _receipt(ar.peer_keys, rotated_at - timedelta(minutes=5))
    with pytest.raises(ReceiptError):
        _verify(ar, second, backdated, sealed_at=utc_now())


def test_a_revoked_key_verifies_no_receipt_whatever_its_time(
    rotated: tuple[Harness, NodeKeys, datetime],
) -> None:
    ar, second, rotated_at = rotated
    with unit_of_work(ar.node.sessions) as session:
        for row in session.scalars(select(PeerKey).where(PeerKey.peer_authority == "ES/MJ")):
            row.revoked_at = rotated_at
    before = _receipt(ar.peer_keys, rotated_at - timedelta(minutes=5))
    with pytest.raises(ReceiptError):
        _verify(ar, second, before, sealed_at=rotated_at - timedelta(minutes=6))


def _stored_before_a_key_change(
    url: str, tmp_path: Path, keys: NodeKeys
) -> tuple[WireEnvelope, httpx.Response, WireEnvelope, NodeKeys]:
    """AR/MPF, with `keys`, stores one envelope from ES/MJ (its answer, the receipt the
    sender lost); a second is sealed to the same keys and kept. Then the node stops, to be
    served again with another key."""
    with serve_node(url, tmp_path / "one", keys=keys) as ar:
        envelope = ar._seal({"kind": "request", "document": example_document()}, None, None)
        stored = ar.post_envelope(envelope)
        assert stored.status_code == 201, stored.text
        late = ar._seal({"kind": "request", "document": example_document()}, None, None)
        return envelope, stored, late, ar.peer_keys


def test_a_repeat_after_our_key_changed_gets_the_receipt_signed_with_the_new_key(
    tmp_path: Path,
) -> None:
    """Our signing key changed (a rotation, or a key replaced after a compromise, which the
    sender then no longer trusts) after we stored an envelope whose receipt the sender lost:
    its repeat gets the same receipt, time unchanged, signed with our current key."""
    url = migrated_sqlite(tmp_path / "ar.db")
    first = NodeKeys.generate()
    envelope, stored, _, es_keys = _stored_before_a_key_change(url, tmp_path, first)
    replaced = NodeKeys(
        signing=NodeKeys.generate().signing, encryption=first.encryption, log=first.log
    )
    with serve_node(url, tmp_path / "two", keys=replaced, es_keys=es_keys) as ar:
        repeat = ar.post_envelope(envelope)
    assert repeat.status_code == 200, repeat.text
    old, new = decode_receipt(stored.json()), decode_receipt(repeat.json())
    header = json.loads(envelope.header)
    expected = {
        "msg_id": header["msg_id"],
        "envelope_hash": envelope.envelope_hash,
        "from_authority": "ES/MJ",
        "to_authority": "AR/MPF",
    }
    before = verify_receipt(old, signer_public=first.signing_public, **expected)
    after = verify_receipt(new, signer_public=replaced.signing_public, **expected)
    assert after.signer_kid == replaced.signing_kid
    assert after.received_at == before.received_at


def test_a_repeat_after_our_encryption_key_changed_still_gets_its_receipt(
    tmp_path: Path,
) -> None:
    """Our encryption key was replaced (no overlap left for the old one) after we stored an
    envelope whose receipt its sender lost: its repeat, inline or announced for the part
    transfer, gets the stored receipt (it was sealed to a key valid when it arrived), while a
    new envelope sealed to the old key is refused as before."""
    url = migrated_sqlite(tmp_path / "ar.db")
    first = NodeKeys.generate()
    envelope, stored, late, es_keys = _stored_before_a_key_change(url, tmp_path, first)
    replaced = NodeKeys(
        signing=first.signing, encryption=NodeKeys.generate().encryption, log=first.log
    )
    with serve_node(url, tmp_path / "two", keys=replaced, es_keys=es_keys) as ar:
        repeat = ar.post_envelope(envelope)
        head = {**envelope.to_wire(), "parts": envelope.to_wire()["parts"][:1]}
        announced = ar.http.post("/p2p/v1/evidence/envelopes", json=head)
        new = ar.post_envelope(late)
    assert repeat.status_code == 200, repeat.text
    assert announced.status_code == 200, announced.text
    assert repeat.json() == stored.json() == announced.json()
    assert new.status_code == 400
    assert new.json()["error"] == "unknown_recipient_key"

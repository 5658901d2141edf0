"""A peer pinned again under the same signing key with a new encryption key (no rotation:
docs/protocol.md section 5.3): envelopes naming its old encryption key as the sender's are
refused from then on (step 19, `unknown_key`); what was received before stays readable."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from nacl.public import PrivateKey
from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.db import unit_of_work
from app.models import Peer
from app.node import Node
from app.peers.service import StaleIdentity
from tests.requests.conftest import Harness, _pin_es, example_document


def test_an_encryption_key_dropped_at_a_repin_is_refused(fresh_ar: Harness) -> None:
    before = fresh_ar.receive_request()
    old = fresh_ar.peer_keys
    new = NodeKeys(signing=old.signing, encryption=PrivateKey.generate(), log=old.log)
    _pin_es(fresh_ar.node, new)

    stale = fresh_ar._seal({"kind": "request", "document": example_document()}, None, None)
    refused = fresh_ar.post_envelope(stale)
    assert (refused.status_code, refused.json()["error"]) == (403, "unknown_key")

    renewed = replace(fresh_ar, peer_keys=new)
    assert renewed.receive_request()
    shown = fresh_ar.http.get(f"/api/v1/requests/{before}", headers=fresh_ar.as_("officer"))
    assert shown.status_code == 200, shown.text


def _pinned_encryption_kid(node: Node) -> str:
    with unit_of_work(node.sessions) as session:
        kid = session.scalar(select(Peer.encryption_kid).where(Peer.authority_id == "ES/MJ"))
    assert kid is not None
    return kid


def test_a_stale_identity_document_does_not_bring_a_dropped_key_back(fresh_ar: Harness) -> None:
    """A copy of the peer's identity document from before it changed its encryption key
    (signed with the same signing key, so the fingerprint matches) is refused: taking it
    would seal to the key the peer dropped, perhaps because it leaked."""
    old = fresh_ar.peer_keys  # pinned when the harness started, with a document issued then
    new = NodeKeys(signing=old.signing, encryption=PrivateKey.generate(), log=old.log)
    then = utc_now()
    _pin_es(fresh_ar.node, new, then + timedelta(minutes=1))  # the peer's new key
    new_kid = _pinned_encryption_kid(fresh_ar.node)

    with pytest.raises(StaleIdentity, match="older than the one pinned"):
        _pin_es(fresh_ar.node, old, then - timedelta(minutes=1))
    # Issued later (no one else can sign a copy with its date changed: this is the peer
    # itself going back to a key it dropped): refused all the same.
    with pytest.raises(StaleIdentity, match="with an encryption key it dropped"):
        _pin_es(fresh_ar.node, old, then + timedelta(minutes=2))
    assert _pinned_encryption_kid(fresh_ar.node) == new_kid

    # The current document pinned again, a newer one with the same keys, or an older one
    # with the same keys (each replica of a node issues its own when it starts): accepted.
    _pin_es(fresh_ar.node, new, then + timedelta(minutes=1))
    _pin_es(fresh_ar.node, new, then + timedelta(minutes=3))
    _pin_es(fresh_ar.node, new, then)
    assert _pinned_encryption_kid(fresh_ar.node) == new_kid

"""A peer pinned again under the same signing key with a new encryption key (no rotation:
docs/protocol.md section 5.3): envelopes naming its old encryption key as the sender's are
refused from then on (step 19, `unknown_key`); what was received before stays readable."""

from __future__ import annotations

from dataclasses import replace

from nacl.public import PrivateKey

from app.crypto.keys import NodeKeys
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

"""A peer that publishes one of this node's own public keys is not pinned: a keys folder
copied to set up another authority's node, or a node claiming keys it cannot hold. Pinned,
envelopes sealed to it would open here, and checkpoints signed here would pass as its own
(from an earlier session's note: such a peer could be pinned)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.crypto.identity import build_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, fingerprint
from app.db import unit_of_work
from app.models import AuditEntry, Peer
from app.peers.keys import refresh_peer_keys
from tests.requests.conftest import Harness


@contextmanager
def identity_served(document: object) -> Iterator[str]:
    """An address that serves `document` as its node identity, as any web server could."""
    body = json.dumps(document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/.well-known/entraide/node" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _copies(ours: NodeKeys) -> dict[str, NodeKeys]:
    """The whole keys folder copied, and each of our public keys claimed alone."""
    signing, encryption, log = SigningKey.generate(), PrivateKey.generate(), SigningKey.generate()
    return {
        "whole folder": ours,
        "signing key": NodeKeys(ours.signing, encryption, log),
        "encryption key": NodeKeys(signing, ours.encryption, log),
        "log key": NodeKeys(signing, encryption, ours.log),
        "our log key as its signing key": NodeKeys(ours.log, encryption, log),
    }


@pytest.mark.parametrize(
    "claimed",
    [
        "whole folder",
        "signing key",
        "encryption key",
        "log key",
        "our log key as its signing key",
    ],
)
def test_a_peer_publishing_one_of_our_keys_is_not_pinned(ar: Harness, claimed: str) -> None:
    keys = _copies(ar.node.keys)[claimed]
    with identity_served({}) as url:
        pass  # a free address for the document to name
    document = build_identity_document(
        NodeIdentity("FR/MJ", "Ministère de la Justice", url), keys, issued_at=utc_now()
    )
    with identity_served(document) as url:
        response = ar.http.post(
            "/api/v1/admin/peers",
            json={"url": url, "fingerprint": fingerprint(keys.signing_public)},
            headers=ar.as_("admin"),
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "own_keys"
    assert "copy of this node's keys folder" in response.json()["detail"]
    with unit_of_work(ar.node.sessions) as session:
        assert session.scalar(select(Peer).where(Peer.authority_id == "FR/MJ")) is None
        outcome = session.scalar(
            select(AuditEntry.outcome)
            .where(AuditEntry.action == "peer.add")
            .order_by(AuditEntry.idx.desc())
            .limit(1)
        )
    assert outcome == "own_keys"


def test_a_pinned_peer_whose_new_document_claims_our_log_key_is_not_followed(
    ar: Harness,
) -> None:
    """A pinned peer (ES/MJ) that starts publishing our log key is refused at its refresh,
    on record, and keeps the keys pinned before."""
    with unit_of_work(ar.node.sessions) as session:
        pinned_log = session.scalar(select(Peer.log_key).where(Peer.authority_id == "ES/MJ"))
    claimed = NodeKeys(ar.peer_keys.signing, ar.peer_keys.encryption, ar.node.keys.log)
    document = build_identity_document(
        NodeIdentity("ES/MJ", "Ministerio de Justicia", "http://es.invalid"),
        claimed,
        issued_at=utc_now(),
    )
    with identity_served(document) as url:
        with unit_of_work(ar.node.sessions) as session:
            peer = session.scalar(select(Peer).where(Peer.authority_id == "ES/MJ"))
            assert peer is not None
            original_url, peer.public_url = peer.public_url, url
        try:
            assert refresh_peer_keys(ar.node, "ES/MJ", force=True) is None
        finally:
            with unit_of_work(ar.node.sessions) as session:
                peer = session.scalar(select(Peer).where(Peer.authority_id == "ES/MJ"))
                assert peer is not None
                peer.public_url = original_url
    with unit_of_work(ar.node.sessions) as session:
        assert session.scalar(select(Peer.log_key).where(Peer.authority_id == "ES/MJ")) == (
            pinned_log
        )
        entry = session.execute(
            select(AuditEntry.outcome, AuditEntry.entry)
            .where(AuditEntry.action == "peer.keys_changed")
            .order_by(AuditEntry.idx.desc())
            .limit(1)
        ).one()
    assert entry.outcome == "rotation_refused"
    assert "copy of this node's keys folder" in json.loads(entry.entry)["details"]["reason"]

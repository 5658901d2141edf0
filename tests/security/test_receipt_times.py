"""Times a pinned but hostile peer chooses, met by a real sender node (from review).

The peer (DE/BFJ) is a loopback HTTP server with real keys: it serves its identity document
and answers each envelope with a validly signed receipt whose `received_at` it picks, or with
a signed key rotation it dates. The sender (ES/MJ) is a node process on each backend; on
PostgreSQL its sessions' default time zone is Europe/Madrid (PGTZ), east of UTC, where an
instant of year 9999 reads back as year 10000, past what the driver reads.

- A receipt dated 9999-12-31, 0001-01-01 or long before the envelope was made is refused as
  any bad receipt is (the attempt is retried, audited with the reason): the request does not
  look delivered, nothing of the receipt is stored, and the request and its deliveries still
  read. The custody proof's verifier applies the same rule (app/crypto/receipts.py).
- A rotation dated 9999-12-31 is not followed: refused and audited, the pin unchanged, the
  receipt its new key signed refused.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from sqlalchemy import select

from app.crypto.encoding import b64d, canonical_json, format_time, key_id, sha256_hex, utc_now
from app.crypto.identity import build_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, format_fingerprint
from app.crypto.receipts import SignedReceipt
from app.crypto.rotation import make_rotation
from app.crypto.signing import DOMAIN_IDENTITY, DOMAIN_RECEIPT, DOMAIN_ROTATION, sign
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry, Message, PeerKey, Receipt
from tests.conftest import BACKENDS, make_databases
from tests.e2e.conftest import EXAMPLE, read_request, wait_delivered, wait_for

PEER = "DE/BFJ"
LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


@dataclass
class HostilePeer:
    """A pinned peer whose signed answers carry the times it likes."""

    keys: NodeKeys = field(default_factory=NodeKeys.generate)
    received_at: str | None = None  # None: its clock
    document: dict[str, str] = field(default_factory=dict)
    receipt_signer: SigningKey | None = None  # None: its pinned signing key

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/entraide/node":
                    self._answer(200, outer.document)
                else:
                    self._answer(404, {"error": "not_found", "detail": ""})

            def do_POST(self) -> None:
                wire = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.path != "/p2p/v1/envelopes":  # no batches: one by one
                    self._answer(404, {"error": "not_found", "detail": ""})
                    return
                self._answer(201, outer.receipt_for(wire))

            def _answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.document = build_identity_document(
            NodeIdentity(PEER, "Bundesamt für Justiz", self.url), self.keys, issued_at=utc_now()
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receipt_for(self, wire: dict[str, Any]) -> dict[str, str]:
        header = b64d(wire["header"])
        fields = json.loads(header)
        signer = self.receipt_signer or self.keys.signing
        body = canonical_json(
            {
                "v": 1,
                "type": "entraide.receipt",
                "msg_id": fields["msg_id"],
                "envelope_hash": sha256_hex(header),
                "from": fields["from"]["authority"],
                "to": fields["to"]["authority"],
                # Spelled as the protocol spells it (§2.4), year 1 included.
                "received_at": self.received_at or format_time(utc_now()),
                "status": "accepted",
                "signer_kid": key_id(bytes(signer.verify_key)),
                "checkpoint": None,
            }
        )
        return SignedReceipt(body, sign(signer, DOMAIN_RECEIPT, body)).to_wire()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=BACKENDS)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalNode, HostilePeer]]:
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    # East of UTC, as a server set to local time in Madrid: year 9999 read there is 10000.
    env = {"ENTRAIDE_PEER_REFRESH_SECONDS": "0", "PGTZ": "Europe/Madrid"}
    url = databases.new("es", migrated=True)
    es = LocalNode(
        "ES/MJ", "Ministerio de Justicia", tmp_path_factory.mktemp("es"), url, extra_env=env
    )
    peer = HostilePeer()
    try:
        peer.start()
        es.init(clients={role: (role,) for role in ("admin", "officer")})
        es.start()
        with es.client("admin") as http:
            pinned = http.post(
                "/api/v1/admin/peers",
                json={"url": peer.url, "fingerprint": format_fingerprint(peer.keys.fingerprint)},
            )
        assert pinned.status_code == 201, pinned.text
        yield es, peer
    finally:
        es.stop()
        peer.close()
        databases.drop_all()


def submit(es: LocalNode) -> str:
    body = json.loads(json.dumps(EXAMPLE))
    body["to"] = PEER
    body["document"]["requested_authority"] = PEER
    with es.client("officer") as http:
        response = http.post("/api/v1/requests", json=body)
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    return request_id


def audited(es: LocalNode, action: str, request_id: str | None = None) -> list[dict[str, Any]]:
    engine = make_engine(es.database_url)
    try:
        with engine.connect() as connection:
            statement = select(AuditEntry.entry).where(AuditEntry.action == action)
            if request_id is not None:
                statement = statement.where(AuditEntry.request_id == request_id)
            # In the log's order: callers count what came after a point.
            statement = statement.order_by(AuditEntry.idx)
            return [json.loads(entry) for entry in connection.scalars(statement)]
    finally:
        engine.dispose()


def first_attempt(es: LocalNode, request_id: str) -> dict[str, Any]:
    entries = wait_for(
        "the first delivery attempt", lambda: audited(es, "delivery.attempt", request_id)
    )
    first: dict[str, Any] = entries[0]
    return first


def receipt_stored(es: LocalNode, msg_id: str) -> bool:
    engine = make_engine(es.database_url)
    try:
        with engine.connect() as connection:
            statement = select(Receipt.id).join(Message, Message.id == Receipt.message_id)
            return connection.scalar(statement.where(Message.msg_id == msg_id)) is not None
    finally:
        engine.dispose()


def still_reads(es: LocalNode, request_id: str) -> None:
    """The request (not delivered, no receipt), the list, the deliveries; no custody proof."""
    detail = read_request(es, request_id)
    assert detail["status"] != "delivered"
    [message] = detail["messages"]
    assert message["receipt"] is None
    assert not receipt_stored(es, message["msg_id"])
    assert audited(es, "receipt.received", request_id) == []
    with es.client("officer") as http:
        listed = http.get("/api/v1/requests")
        proof = http.get(f"/api/v1/requests/{request_id}/messages/{message['msg_id']}/proof")
    assert listed.status_code == 200, listed.text
    assert (proof.status_code, proof.json()["error"]) == (409, "no_receipt")
    with es.client("admin") as http:
        deliveries = http.get("/api/v1/admin/deliveries")
    assert deliveries.status_code == 200, deliveries.text


@pytest.mark.parametrize(
    ("received_at", "says"),
    [
        ("9999-12-31T23:59:59Z", "received in the future"),
        ("0001-01-01T00:00:00Z", "received before it was made"),
        ("2000-01-01T00:00:00Z", "received before it was made"),
    ],
    ids=["9999", "0001", "2000"],
)
def test_a_receipt_dated_outside_its_envelope_is_refused(
    pair: tuple[LocalNode, HostilePeer], received_at: str, says: str
) -> None:
    es, peer = pair
    peer.received_at = received_at
    try:  # hostile throughout: the worker tries again within seconds
        request_id = submit(es)
        attempt = first_attempt(es, request_id)
        assert attempt["outcome"] == "retry"
        assert attempt["details"]["error"].startswith("bad receipt: ")
        assert says in attempt["details"]["error"]
        still_reads(es, request_id)
    finally:
        peer.received_at = None
    # Once the peer answers with its true time, the same delivery goes through.
    wait_delivered(es, request_id)


def test_a_receipt_dated_now_is_accepted_and_proves(pair: tuple[LocalNode, HostilePeer]) -> None:
    es, _ = pair
    request_id = submit(es)
    detail = wait_delivered(es, request_id)
    assert detail["status"] == "delivered"
    with es.client("officer") as http:
        proof = http.get(f"/api/v1/requests/{request_id}/messages/{request_id}/proof")
    assert proof.status_code == 200, proof.text


def _signed_document(
    peer: HostilePeer, keys: NodeKeys, issued_at: str, **extra: Any
) -> dict[str, str]:
    """The peer's identity document with `keys`, self-signed, dated `issued_at` as spelled."""
    wire = build_identity_document(
        NodeIdentity(PEER, "Bundesamt für Justiz", peer.url), keys, issued_at=utc_now()
    )
    body = {**json.loads(base64.b64decode(wire["document"])), "issued_at": issued_at, **extra}
    raw = canonical_json(body)
    return {
        "document": base64.b64encode(raw).decode(),
        "signature": base64.b64encode(sign(keys.signing, DOMAIN_IDENTITY, raw)).decode(),
    }


def _rotated_document(
    peer: HostilePeer, new: NodeKeys, *, rotated_at: str, issued_at: str
) -> dict[str, str]:
    """The peer's identity document after a rotation, validly signed, with the times given
    spelled as the protocol spells them (section 2.4), year 1 included."""
    old = make_rotation(
        authority_id=PEER,
        seq=1,
        old_signing=peer.keys.signing,
        old_encryption=peer.keys.encryption,
        new_signing=new.signing,
        new_encryption=new.encryption,
        rotated_at=utc_now(),
        accepted_until=utc_now(),
    )
    statement = {
        **json.loads(old.statement),
        "rotated_at": rotated_at,
        "old_encryption_accepted_until": "9999-12-31T23:59:59Z",
    }
    raw = canonical_json(statement)
    rotation = {
        "statement": base64.b64encode(raw).decode(),
        "signature": base64.b64encode(sign(peer.keys.signing, DOMAIN_ROTATION, raw)).decode(),
    }
    keys = NodeKeys(new.signing, new.encryption, peer.keys.log, rotations=())
    return _signed_document(peer, keys, issued_at, rotations=[rotation])


NOW = "now"  # _rotated_document's times: the peer's clock


@pytest.mark.parametrize(
    ("rotated_at", "issued_at", "says"),
    [
        (
            "9999-12-31T23:59:59Z",
            NOW,
            "rotation 1 is dated 9999-12-31T23:59:59Z, later than this node's clock allows",
        ),
        (  # from review: the keys it replaced ended before they were made
            "0001-01-01T00:00:00Z",
            NOW,
            "rotation 1 is dated 0001-01-01T00:00:00Z, earlier than any node made keys",
        ),
        (  # from review: pinned, every later document of the peer's looked stale beside it
            NOW,
            "9999-12-31T23:59:59Z",
            "identity document is dated 9999-12-31T23:59:59Z, later than this node's clock",
        ),
        (  # from review: pinned, the floor of the next rotation's date was none
            NOW,
            "0001-01-01T00:00:00Z",
            "identity document is dated 0001-01-01T00:00:00Z, earlier than any node issued one",
        ),
    ],
    ids=["rotated-9999", "rotated-0001", "issued-9999", "issued-0001"],
)
def test_a_rotation_with_implausible_times_is_not_followed(
    pair: tuple[LocalNode, HostilePeer], rotated_at: str, issued_at: str, says: str
) -> None:
    es, peer = pair
    new = NodeKeys(SigningKey.generate(), PrivateKey.generate(), peer.keys.log)
    genuine = peer.document
    now = format_time(utc_now())
    peer.document = _rotated_document(
        peer,
        new,
        rotated_at=now if rotated_at == NOW else rotated_at,
        issued_at=now if issued_at == NOW else issued_at,
    )
    peer.receipt_signer = new.signing
    refusals = len(audited(es, "peer.keys_changed"))
    try:
        request_id = submit(es)
        attempt = first_attempt(es, request_id)
        # This case's: a refresh of the case before may still be refused after its end,
        # with its own reason (the worker fetched its document before it was put back).
        refused = wait_for(
            "the refused rotation",
            lambda: [
                e
                for e in audited(es, "peer.keys_changed")[refusals:]
                if e["outcome"] != "ok" and says in e["details"].get("reason", "")
            ],
        )
        assert [e["outcome"] for e in refused] == ["rotation_refused"]
        assert attempt["outcome"] == "retry"
        assert attempt["details"]["error"].startswith("bad receipt: ")
        with es.client("admin") as http:
            peers = {p["authority_id"]: p for p in http.get("/api/v1/admin/peers").json()}
        assert peers[PEER]["signing_kid"] == peer.keys.signing_kid  # the pin did not move
        engine = make_engine(es.database_url)
        try:
            with engine.connect() as connection:
                ends = connection.scalars(select(PeerKey.superseded_at)).all()
        finally:
            engine.dispose()
        assert ends == [None, None]  # no key of the peer's ends in 9999, nor in year 1
        still_reads(es, request_id)
        # Nor when an operator pins the peer again with its new fingerprint.
        with es.client("admin") as http:
            repinned = http.post(
                "/api/v1/admin/peers",
                json={"url": peer.url, "fingerprint": format_fingerprint(new.fingerprint)},
            )
        assert (repinned.status_code, repinned.json()["error"]) == (
            400,
            "invalid_identity_document",
        ), repinned.text
        assert says in repinned.json()["detail"]
    finally:
        peer.document, peer.receipt_signer = genuine, None
    wait_delivered(es, request_id)


@pytest.mark.parametrize(
    ("issued_at", "says"),
    [
        (
            "9999-12-31T23:59:59Z",
            "identity document is dated 9999-12-31T23:59:59Z, later than this node's clock "
            "allows (the clock skew tolerated between nodes)",
        ),
        (
            "0001-01-01T00:00:00Z",
            "identity document is dated 0001-01-01T00:00:00Z, earlier than any node issued "
            "one (2000-01-01T00:00:00Z)",
        ),
        (
            "1999-12-31T23:59:59Z",
            "identity document is dated 1999-12-31T23:59:59Z, earlier than any node issued "
            "one (2000-01-01T00:00:00Z)",
        ),
    ],
    ids=["9999", "0001", "1999"],
)
def test_an_identity_document_dated_implausibly_is_not_pinned(
    pair: tuple[LocalNode, HostilePeer], issued_at: str, says: str
) -> None:
    """From review: pinned again with its own keys and a document dated 9999-12-31, the peer
    could no longer be pinned with a new encryption key (its genuine document, issued now,
    was refused as a stale copy, older than the one pinned), until it was removed. Dated
    year 1, the document pinned was the floor of its next rotation's date: no floor, and a
    day taken from it was no date (an OverflowError, a 500)."""
    es, peer = pair
    fingerprint = format_fingerprint(peer.keys.fingerprint)
    peer.document = _signed_document(peer, peer.keys, issued_at)
    with es.client("admin") as http:
        refused = http.post(
            "/api/v1/admin/peers", json={"url": peer.url, "fingerprint": fingerprint}
        )
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "invalid_identity_document",
    ), refused.text
    assert refused.json()["detail"] == says
    assert [e["outcome"] for e in audited(es, "peer.add")][-1:] == ["invalid_identity_document"]
    # Its genuine document with a new encryption key, issued now, is pinned.
    peer.keys = NodeKeys(peer.keys.signing, PrivateKey.generate(), peer.keys.log)
    peer.document = _signed_document(peer, peer.keys, format_time(utc_now()))
    with es.client("admin") as http:
        pinned = http.post(
            "/api/v1/admin/peers", json={"url": peer.url, "fingerprint": fingerprint}
        )
    assert pinned.status_code == 201, pinned.text
    assert pinned.json()["encryption_kid"] == peer.keys.encryption_kid
    wait_delivered(es, submit(es))

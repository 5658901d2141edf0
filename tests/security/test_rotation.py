"""Acceptance 5: `entraide keys rotate` on one node, with real node processes.

Three nodes: ES/MJ ↔ AR/MPF ↔ FR/DACG. Requests are exchanged, then AR rotates its keys and
restarts. Afterwards:

- ES → AR: ES still has AR's old keys pinned, so it seals to AR's old encryption key (accepted
  within the overlap period); AR's receipt is signed by its new key, so ES fetches AR's
  identity document, follows the signed rotation and re-pins (the sender's path).
- AR → ES: an answer signed by AR's new key is accepted.
- AR → FR: FR has not heard of the rotation; the envelope's unknown signing key makes FR fetch
  and verify the chain (the receiver's path).
- Every request from before the rotation still reads on every side, checked against the key
  that signed it then; the rotation and the re-pinning are audited.

And an in-test peer (keys made here, identity served by a loopback HTTP server) shows that a
forged rotation — new keys not signed by the pinned key — is refused and audited, while the
genuine one is followed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from sqlalchemy import select

from app.crypto.encoding import b64d, canonical_json, utc_now
from app.crypto.envelope import Attachment, Recipient, seal
from app.crypto.identity import build_identity_document, parse_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, format_fingerprint
from app.crypto.part_put import HEADER as PART_PUT_HEADER
from app.crypto.part_put import sign_part_put
from app.crypto.randomness import SystemRandomness
from app.crypto.rotation import Rotation, make_rotation
from app.crypto.signing import DOMAIN_IDENTITY, DOMAIN_ROTATION, sign
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry
from tests.e2e.conftest import EXAMPLE, read_request, wait_delivered, wait_for
from tests.security.conftest import new_node, prepare

FAST = {"ENTRAIDE_PEER_REFRESH_SECONDS": "0"}


def audit(node: LocalNode, action: str) -> list[tuple[str, dict[str, Any]]]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(AuditEntry.outcome, AuditEntry.entry)
                .where(AuditEntry.action == action)
                .order_by(AuditEntry.idx)
            )
            return [(outcome, json.loads(entry)["details"]) for outcome, entry in rows]
    finally:
        engine.dispose()


def submit(sender: LocalNode, to: str, text: str) -> str:
    body = json.loads(json.dumps(EXAMPLE))
    body["to"] = to
    body["document"]["requesting_authority"] = sender.authority_id
    body["document"]["requested_authority"] = to
    body["document"]["summary_of_facts"] = text
    with sender.client("officer") as http:
        response = http.post("/api/v1/requests", json=body)
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    return request_id


def answer(node: LocalNode, request_id: str, kind: str, text: str) -> None:
    with node.client("officer") as http:
        body = {"document": {"type": kind, "text": text}}
        response = http.post(f"/api/v1/requests/{request_id}/messages", json=body)
    assert response.status_code == 201, response.text


def identity(node: LocalNode) -> Any:
    document = httpx.get(node.url + "/.well-known/entraide/node", timeout=10).json()
    return parse_identity_document(document)


def header_of(message: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(b64d(message["header"]))
    return parsed


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalNode]]:
    base = tmp_path_factory.mktemp("rotation")
    nodes = {
        "es": new_node(base, "ES/MJ", **FAST),
        "ar": new_node(base, "AR/MPF", **FAST),
        "fr": new_node(base, "FR/DACG", **FAST),
    }
    try:
        prepare(list(nodes.values()))
        es, ar, fr = nodes["es"], nodes["ar"], nodes["fr"]
        for left, right in ((es, ar), (ar, es), (ar, fr), (fr, ar)):
            left.pin(right)
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


def test_rotation_keeps_both_directions_and_the_archive(trio: dict[str, LocalNode]) -> None:
    es, ar, fr = trio["es"], trio["ar"], trio["fr"]
    # Before: ES asks AR, AR acknowledges; AR asks FR.
    before = submit(es, "AR/MPF", "facts before the rotation")
    wait_delivered(es, before)
    answer(ar, before, "acknowledgement", "Registered before the rotation.")
    wait_delivered(ar, before)
    to_fr = submit(ar, "FR/DACG", "AR's request before the rotation")
    wait_delivered(ar, to_fr)
    old = identity(ar)

    ar.stop()
    rotated = ar.cli("keys", "rotate", "--overlap-days", "7")
    # AR is stopped: the command says so, instead of claiming the node follows.
    assert f"no running node answered at {ar.url}" in rotated.stdout
    assert "a node started later uses the new keys" in rotated.stdout
    ar.start()
    new = identity(ar)
    assert new.signing.kid != old.signing.kid
    assert new.encryption.kid != old.encryption.kid
    assert new.log.kid == old.log.kid  # witnesses keep verifying checkpoints
    assert [link.old.signing for link in new.rotations] == [old.signing.public_key]
    assert new.rotation_path(old.signing.public_key) == list(new.rotations)
    (entry,) = audit(ar, "key.rotated")
    assert entry[1]["old_signing_kid"] == old.signing.kid
    # What a custody proof made before the rotation names: published beside the current one.
    shown = ar.cli("keys", "show").stdout
    assert f"earlier signing:   {old.signing.kid} (until rotation 1," in shown
    assert entry[1]["new_signing_kid"] == new.signing.kid

    # ES → AR, ES still pinning AR's old keys: sealed to the old encryption key, accepted in
    # the overlap period; the receipt, signed by the new key, makes ES follow the rotation.
    after = submit(es, "AR/MPF", "facts after the rotation")
    sent = wait_delivered(es, after)
    assert header_of(sent["messages"][0])["to"]["enc_kid"] == old.encryption.kid
    assert json.loads(b64d(sent["messages"][0]["receipt"]["receipt"]))["signer_kid"] == (
        new.signing.kid
    )
    changes = audit(es, "peer.keys_changed")
    assert [outcome for outcome, _ in changes] == ["ok"]
    assert changes[0][1]["new_signing_kid"] == new.signing.kid

    # AR → ES: an answer signed by AR's new key; ES's pin already follows it.
    answer(ar, before, "note", "Signed with the new key.")
    wait_delivered(ar, before)
    history = wait_for(
        "the answer on ES",
        lambda: (d := read_request(es, before)) and len(d["messages"]) == 3 and d,
    )
    signers = [header_of(message)["from"]["sig_kid"] for message in history["messages"][1:]]
    assert signers == [old.signing.kid, new.signing.kid]  # both verified against AR's keys

    # AR → FR: FR never saw the rotation; the new signing key id makes it fetch the chain.
    third = submit(ar, "FR/DACG", "AR's request after the rotation")
    wait_delivered(ar, third)
    assert [outcome for outcome, _ in audit(fr, "peer.keys_changed")] == ["ok"]
    # ... and FR, now pinning the new keys, answers AR's older request.
    answer(fr, to_fr, "acknowledgement", "FR registered it.")
    acknowledged = wait_delivered(fr, to_fr)
    assert header_of(acknowledged["messages"][-1])["to"]["enc_kid"] == new.encryption.kid

    # The archive: every request from before still opens everywhere.
    for node, request_id in ((es, before), (ar, before), (ar, to_fr), (fr, to_fr), (es, after)):
        detail = read_request(node, request_id)
        assert detail["document"]["summary_of_facts"], (node.authority_id, request_id)
    assert read_request(ar, before)["messages"][0]["content"]["summary_of_facts"] == (
        "facts before the rotation"
    )
    assert read_request(fr, third)["document"]["summary_of_facts"] == (
        "AR's request after the rotation"
    )
    # AR opened its inbound archive with the retired encryption key, kept protected.
    retired = list((ar.keys_dir / "retired").glob("encryption-*.key"))
    assert [path.name for path in retired] == [f"encryption-{old.encryption.kid}.key"]
    assert retired[0].stat().st_mode & 0o077 == 0


# --- forged rotations -----------------------------------------------------------------------


class IdentityServer:
    """A peer's identity document on loopback, which the test swaps as it pleases."""

    def __init__(self) -> None:
        self.document: dict[str, str] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(outer.document).encode()
                self.send_response(200 if self.path == "/.well-known/entraide/node" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _document(keys: NodeKeys, url: str, authority: str = "IT/MG", **extra: Any) -> dict[str, str]:
    node = NodeIdentity(authority, "Ministero", url)
    wire = build_identity_document(node, keys, issued_at=utc_now())
    if not extra:
        return wire
    body = json.loads(base64.b64decode(wire["document"]))
    body.update(extra)
    raw = canonical_json(body)
    return {
        "document": base64.b64encode(raw).decode(),
        "signature": base64.b64encode(sign(keys.signing, DOMAIN_IDENTITY, raw)).decode(),
    }


def _envelope_from(
    keys: NodeKeys, recipient: LocalNode, authority: str = "IT/MG"
) -> dict[str, Any]:
    target = identity(recipient)
    document = json.loads(json.dumps(EXAMPLE["document"]))
    document["requesting_authority"], document["requested_authority"] = authority, "ES/MJ"
    return seal(
        sender_keys=keys,
        sender_authority=authority,
        recipient=Recipient("ES/MJ", target.encryption.public_key),
        content={"kind": "request", "document": document},
        attachments=[Attachment("letter.txt", "text/plain", b"letter")],
        conversation_id=None,
        in_reply_to=None,
        created_at=utc_now(),
        ttl=timedelta(days=1),
        randomness=SystemRandomness(),
    ).to_wire()


def _rotation(
    old: NodeKeys, new: NodeKeys, signer: SigningKey, seq: int = 1, authority: str = "IT/MG"
) -> Rotation:
    """A rotation statement from `old` to `new`, signed by `signer` (forged unless old's)."""
    genuine = make_rotation(
        authority_id=authority,
        seq=seq,
        old_signing=old.signing,
        old_encryption=old.encryption,
        new_signing=new.signing,
        new_encryption=new.encryption,
        rotated_at=utc_now(),
        accepted_until=utc_now() + timedelta(days=7),
    )
    if signer == old.signing:
        return genuine
    forged = sign(signer, DOMAIN_ROTATION, genuine.statement)
    return Rotation(**{**genuine.__dict__, "signature": forged})


def test_forged_rotation_is_refused_and_the_genuine_one_followed(
    trio: dict[str, LocalNode], tmp_path: Path
) -> None:
    es = trio["es"]
    server = IdentityServer()
    try:
        first = NodeKeys.generate()
        server.document = _document(first, server.url)
        with es.client("admin") as http:
            pinned = http.post(
                "/api/v1/admin/peers",
                json={"url": server.url, "fingerprint": format_fingerprint(first.fingerprint)},
            )
        assert pinned.status_code == 201, pinned.text

        second = NodeKeys(SigningKey.generate(), PrivateKey.generate(), first.log)
        attacker = SigningKey.generate()
        forgeries = {
            # new keys, no chain at all
            "no chain": _document(second, server.url),
            # a chain whose statement is signed by someone else's key
            "signed by another key": _document(
                second,
                server.url,
                rotations=[_rotation(first, second, attacker).to_wire()],
            ),
            # a genuine-looking chain that starts from a key we never pinned
            "not from the pin": _document(
                second,
                server.url,
                rotations=[_rotation(NodeKeys.generate(), second, attacker).to_wire()],
            ),
        }
        for reason, forged in forgeries.items():
            server.document = forged
            response = httpx.post(
                es.url + "/p2p/v1/envelopes", json=_envelope_from(second, es), timeout=30
            )
            assert (response.status_code, response.json()["error"]) == (403, "unknown_key"), reason
        refusals = [entry for entry in audit(es, "peer.keys_changed") if entry[0] != "ok"]
        assert [outcome for outcome, _ in refusals] == ["rotation_refused"] * len(forgeries)
        with es.client("admin") as http:
            peers = {peer["authority_id"]: peer for peer in http.get("/api/v1/admin/peers").json()}
        assert peers["IT/MG"]["signing_kid"] == first.signing_kid  # the pin did not move

        # The genuine rotation, signed by the pinned key: followed, and the envelope accepted.
        server.document = _document(
            NodeKeys(second.signing, second.encryption, first.log, rotations=()),
            server.url,
            rotations=[_rotation(first, second, first.signing).to_wire()],
        )
        response = httpx.post(
            es.url + "/p2p/v1/envelopes", json=_envelope_from(second, es), timeout=30
        )
        assert response.status_code == 201, response.text
        with es.client("admin") as http:
            peers = {peer["authority_id"]: peer for peer in http.get("/api/v1/admin/peers").json()}
        assert peers["IT/MG"]["signing_kid"] == second.signing_kid

        # A genuine rotation that also changes the log key, which §5.4 forbids: the signing
        # and encryption keys are followed, the pinned log key is kept (witnesses go on
        # checking the peer's checkpoints with it), and the audit entry says so.
        third = NodeKeys.generate()
        assert third.log_kid != first.log_kid
        server.document = _document(
            NodeKeys(third.signing, third.encryption, third.log, rotations=()),
            server.url,
            rotations=[
                _rotation(first, second, first.signing).to_wire(),
                _rotation(second, third, second.signing, seq=2).to_wire(),
            ],
        )
        response = httpx.post(
            es.url + "/p2p/v1/envelopes", json=_envelope_from(third, es), timeout=30
        )
        assert response.status_code == 201, response.text
        with es.client("admin") as http:
            peers = {peer["authority_id"]: peer for peer in http.get("/api/v1/admin/peers").json()}
        assert peers["IT/MG"]["signing_kid"] == third.signing_kid
        assert peers["IT/MG"]["log_kid"] == first.log_kid
        last = [entry for outcome, entry in audit(es, "peer.keys_changed") if outcome == "ok"][-1]
        assert last["log_key"].startswith("kept")
    finally:
        server.close()


def test_a_sender_rotated_mid_transfer_signs_its_parts_with_its_new_key(
    trio: dict[str, LocalNode],
) -> None:
    """A sender signs each part's PUT with the key it holds now (protocol.md section 8.5),
    not the one that sealed the envelope, which a rotation took away: the receiver follows
    the sender's signed rotation and takes the part (it was refused until the receiver saw
    an envelope signed with the new key, perhaps never on a one-way link)."""
    es, authority = trio["es"], "GR/YD"
    server = IdentityServer()
    try:
        first = NodeKeys.generate()
        server.document = _document(first, server.url, authority)
        with es.client("admin") as http:
            pinned = http.post(
                "/api/v1/admin/peers",
                json={"url": server.url, "fingerprint": format_fingerprint(first.fingerprint)},
            )
        assert pinned.status_code == 201, pinned.text
        wire = _envelope_from(first, es, authority)
        announced = httpx.post(
            es.url + "/p2p/v1/evidence/envelopes",
            json={**wire, "parts": wire["parts"][:1]},
            timeout=30,
        )
        assert announced.status_code == 202, announced.text
        header = b64d(wire["header"])
        envelope_hash = hashlib.sha256(header).hexdigest()
        url = f"{es.url}/p2p/v1/evidence/envelopes/{json.loads(header)['msg_id']}/parts/1"
        part = b64d(wire["parts"][1])

        def put(signer: SigningKey) -> httpx.Response:
            signature = sign_part_put(signer, envelope_hash, 1, 0)
            headers = {"upload-offset": "0", PART_PUT_HEADER: signature}
            return httpx.put(url, content=part, headers=headers, timeout=30)

        stranger = put(SigningKey.generate())  # the document fetched again: no rotation
        assert (stranger.status_code, stranger.json()["error"]) == (403, "bad_part_signature")
        second = NodeKeys(SigningKey.generate(), PrivateKey.generate(), first.log)
        server.document = _document(
            NodeKeys(second.signing, second.encryption, first.log, rotations=()),
            server.url,
            authority,
            rotations=[_rotation(first, second, first.signing, authority=authority).to_wire()],
        )
        rotated = put(second.signing)
        assert rotated.status_code == 201, rotated.text
        with es.client("admin") as http:
            peers = {peer["authority_id"]: peer for peer in http.get("/api/v1/admin/peers").json()}
        assert peers[authority]["signing_kid"] == second.signing_kid
    finally:
        server.close()


def test_a_compromised_key_is_replaced_and_never_verifies_again(
    trio: dict[str, LocalNode],
) -> None:
    """The threat model's answer to a stolen signing key (a rotation cannot answer it: the
    thief can sign one too): the peer's operator makes new keys and reads the new
    fingerprint out of band; `entraide peers replace-key` pins them and revokes the old."""
    es = trio["es"]
    server = IdentityServer()
    try:
        stolen = NodeKeys.generate()
        server.document = _document(stolen, server.url, "PT/PGR")
        with es.client("admin") as http:
            pinned = http.post(
                "/api/v1/admin/peers",
                json={"url": server.url, "fingerprint": format_fingerprint(stolen.fingerprint)},
            )
        assert pinned.status_code == 201, pinned.text
        before = _envelope_from(stolen, es, "PT/PGR")
        response = httpx.post(es.url + "/p2p/v1/envelopes", json=before, timeout=30)
        assert response.status_code == 201, response.text  # before anyone knew of the theft
        # And a streamed transfer the thief announced then: its parts need no signature.
        streamed = _envelope_from(stolen, es, "PT/PGR")
        announced = httpx.post(
            es.url + "/p2p/v1/evidence/envelopes",
            json={**streamed, "parts": streamed["parts"][:1]},
            timeout=30,
        )
        assert announced.status_code == 202, announced.text

        new = NodeKeys.generate()
        server.document = _document(new, server.url, "PT/PGR")
        # Without the out-of-band fingerprint, nothing moves.
        wrong = es.cli(
            "peers", "replace-key", server.url,
            "--fingerprint", format_fingerprint(stolen.fingerprint), check=False,
        )  # fmt: skip
        assert wrong.returncode != 0
        es.cli(
            "peers", "replace-key", server.url, "--fingerprint", format_fingerprint(new.fingerprint)
        )

        # The transfer announced under the stolen key is gone: its parts go nowhere.
        streamed_id = json.loads(b64d(streamed["header"]))["msg_id"]
        part = httpx.put(
            f"{es.url}/p2p/v1/evidence/envelopes/{streamed_id}/parts/1",
            content=b64d(streamed["parts"][1]),
            headers={"upload-offset": "0", "content-type": "application/octet-stream"},
            timeout=30,
        )
        assert (part.status_code, part.json()["error"]) == (404, "unknown_transfer")
        # The thief's envelopes, whenever they claim to be from: refused.
        for age in (timedelta(0), timedelta(days=20)):
            forged = _envelope_from(stolen, es, "PT/PGR")
            if age:  # back-dated, to before the replacement
                forged = seal(
                    # claiming the peer's new encryption key id: only the signing key is
                    # left to tell the thief apart
                    sender_keys=NodeKeys(stolen.signing, new.encryption, stolen.log, rotations=()),
                    sender_authority="PT/PGR",
                    recipient=Recipient("ES/MJ", identity(es).encryption.public_key),
                    content={"kind": "request", "document": _document_for("PT/PGR")},
                    attachments=[Attachment("letter.txt", "text/plain", b"letter")],
                    conversation_id=None,
                    in_reply_to=None,
                    created_at=utc_now() - age,
                    ttl=timedelta(days=25),
                    randomness=SystemRandomness(),
                ).to_wire()
            refused = httpx.post(es.url + "/p2p/v1/envelopes", json=forged, timeout=30)
            assert (refused.status_code, refused.json()["error"]) == (403, "unknown_key")
        # The peer's own, under its new keys: accepted.
        after = httpx.post(
            es.url + "/p2p/v1/envelopes", json=_envelope_from(new, es, "PT/PGR"), timeout=30
        )
        assert after.status_code == 201, after.text
        # What was received under the old key before the replacement still reads, verified.
        request_id = json.loads(b64d(before["header"]))["msg_id"]
        assert read_request(es, request_id)["document"]["summary_of_facts"]
        (entry,) = [details for _, details in audit(es, "peer.key_replaced")]
        assert entry["old_fingerprint"] == stolen.fingerprint
        assert entry["new_fingerprint"] == new.fingerprint
    finally:
        server.close()


def _document_for(authority: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(EXAMPLE["document"]))
    document["requesting_authority"], document["requested_authority"] = authority, "ES/MJ"
    return document

"""Tampered, misdirected, forwarded, expired and replayed envelopes against a real node.

Each envelope is built with the real sealing code and the sending node's real keys (read
from its keys directory, as an insider with disk access could), then altered and posted
to the receiving node's P2P API. Each must be refused with its own code, audited, and leave
nothing stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey
from sqlalchemy import func, select

from app.crypto.encoding import b64d, b64e, canonical_json, load_json_object, utc_now
from app.crypto.envelope import Attachment, Recipient, WireEnvelope, seal
from app.crypto.keys import NodeKeys, load_keys
from app.crypto.proof import verify_proof
from app.crypto.randomness import SystemRandomness
from app.crypto.signing import DOMAIN_ENVELOPE, sign
from app.localnodes import LocalNode
from app.models import InboundTransfer
from tests.crypto.forge import reseal_manifest
from tests.e2e.conftest import (
    EXAMPLE,
    Network,
    audit_outcomes,
    count_messages,
    post_envelope,
    read_request,
    recipient_of,
    submit_example,
    wait_delivered,
)


def _seal(
    sender: NodeKeys,
    sender_authority: str,
    recipient: Recipient,
    *,
    document_from: str = "ES/MJ",
    document_to: str = "AR/MPF",
    created_at_offset: timedelta = timedelta(0),
    ttl: timedelta = timedelta(days=1),
    attachment: bytes = b"letter of request",
) -> WireEnvelope:
    document = json.loads(json.dumps(EXAMPLE["document"]))
    document["requesting_authority"] = document_from
    document["requested_authority"] = document_to
    return seal(
        sender_keys=sender,
        sender_authority=sender_authority,
        recipient=recipient,
        content={"kind": "request", "document": document},
        attachments=[Attachment("letter.txt", "text/plain", attachment)],
        conversation_id=None,
        in_reply_to=None,
        created_at=utc_now() + created_at_offset,
        ttl=ttl,
        randomness=SystemRandomness(),
    )


def _resign(
    envelope: WireEnvelope, key: SigningKey, change: Callable[[dict[str, Any]], None]
) -> WireEnvelope:
    """Alter the header and sign it again: what a holder of a signing key could do."""
    header = load_json_object(envelope.header)
    change(header)
    data = canonical_json(header)
    return WireEnvelope(data, sign(key, DOMAIN_ENVELOPE, data), envelope.parts)


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def _refused(
    network: Network,
    wire: object,
    code: str,
    status: int,
    post: Callable[[LocalNode, object], httpx.Response] = post_envelope,
) -> None:
    before = count_messages(network, network.ar)
    refusals_before = audit_outcomes(network, network.ar, "envelope.refused")
    response = post(network.ar, wire)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert set(body) == {"error", "detail"}
    assert count_messages(network, network.ar) == before, "a refused envelope was stored"
    assert audit_outcomes(network, network.ar, "envelope.refused") == [*refusals_before, code]


def test_flipped_header_byte(network: Network, es_keys: NodeKeys, ar_recipient: Recipient) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)
    # The tens of the seconds of `created_at` (YYYY-MM-DDTHH:MM:SSZ): flipped, still 0 to 5, so
    # the header stays well formed whatever the date. It flipped the month's units: from
    # December on, month 13, refused as malformed before the signature was checked.
    value = envelope.header.index(b'"created_at":"') + len(b'"created_at":"')
    position = value + len("YYYY-MM-DDTHH:MM:")
    tampered = WireEnvelope(_flip(envelope.header, position), envelope.signature, envelope.parts)
    _refused(network, tampered.to_wire(), "bad_signature", 400)


def test_flipped_signature_byte(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)
    tampered = WireEnvelope(envelope.header, _flip(envelope.signature, 10), envelope.parts)
    _refused(network, tampered.to_wire(), "bad_signature", 400)


def test_flipped_key_wrap_byte(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)

    def flip_wrap(header: dict[str, Any]) -> None:
        wrap = header["wraps"][0]
        wrap["wrap"] = b64e(_flip(b64d(wrap["wrap"]), 40))

    # Unsigned alteration: the signature covers the wraps.
    unsigned = load_json_object(envelope.header)
    flip_wrap(unsigned)
    forged = WireEnvelope(canonical_json(unsigned), envelope.signature, envelope.parts)
    _refused(network, forged.to_wire(), "bad_signature", 400)
    # Re-signed by the sender's own key: the wrap itself must fail to open.
    _refused(network, _resign(envelope, es_keys.signing, flip_wrap).to_wire(), "bad_key_wrap", 400)


def test_altered_commitment(network: Network, es_keys: NodeKeys, ar_recipient: Recipient) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)

    def new_commitment(header: dict[str, Any]) -> None:
        header["commitment"] = b64e(bytes(32))

    _refused(
        network, _resign(envelope, es_keys.signing, new_commitment).to_wire(), "bad_commitment", 400
    )


def test_flipped_ciphertext_byte(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)
    parts = [envelope.parts[0], _flip(envelope.parts[1], 5)]
    tampered = WireEnvelope(envelope.header, envelope.signature, parts)
    _refused(network, tampered.to_wire(), "part_hash_mismatch", 400)


def test_truncated_part(network: Network, es_keys: NodeKeys, ar_recipient: Recipient) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)
    parts = [envelope.parts[0], envelope.parts[1][:-10]]
    tampered = WireEnvelope(envelope.header, envelope.signature, parts)
    _refused(network, tampered.to_wire(), "truncated_part", 400)


def test_envelope_for_another_authority(network: Network, es_keys: NodeKeys) -> None:
    fr = recipient_of(network.fr)
    envelope = _seal(es_keys, "ES/MJ", fr, document_to="FR/DACG")
    _refused(network, envelope.to_wire(), "not_addressed_to_us", 421)


def test_unknown_sender(network: Network, ar_recipient: Recipient) -> None:
    stranger = NodeKeys.generate()
    envelope = _seal(stranger, "DE/BMJ", ar_recipient, document_from="DE/BMJ")
    _refused(network, envelope.to_wire(), "unknown_sender", 403)


def test_sender_key_not_pinned(network: Network, ar_recipient: Recipient) -> None:
    impostor = NodeKeys.generate()  # claims to be ES/MJ with other keys
    envelope = _seal(impostor, "ES/MJ", ar_recipient)
    _refused(network, envelope.to_wire(), "unknown_key", 403)


def test_expired_envelope(network: Network, es_keys: NodeKeys, ar_recipient: Recipient) -> None:
    envelope = _seal(
        es_keys, "ES/MJ", ar_recipient, created_at_offset=-timedelta(days=2), ttl=timedelta(days=1)
    )
    _refused(network, envelope.to_wire(), "expired", 400)


def test_envelope_from_the_future(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient, created_at_offset=timedelta(hours=2))
    _refused(network, envelope.to_wire(), "not_yet_valid", 400)


def test_forwarded_by_a_third_pinned_node(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    """FR/DACG takes ES/MJ's ciphertext and re-signs the header as its own author."""
    fr_keys = load_keys(network.fr.keys_dir)
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)

    def claim(header: dict[str, Any]) -> None:
        header["from"] = {
            "authority": "FR/DACG",
            "sig_kid": fr_keys.signing_kid,
            "enc_kid": fr_keys.encryption_kid,
        }

    _refused(network, _resign(envelope, fr_keys.signing, claim).to_wire(), "manifest_mismatch", 400)


def test_replay_returns_the_same_receipt_and_stores_one_copy(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    envelope = _seal(es_keys, "ES/MJ", ar_recipient)
    before = count_messages(network, network.ar)
    first = post_envelope(network.ar, envelope.to_wire())
    assert first.status_code == 201, first.text
    again = post_envelope(network.ar, envelope.to_wire())
    assert again.status_code == 200
    assert again.json() == first.json()
    assert count_messages(network, network.ar) == before + 1

    # The same message id with other content is not a repeat: it is refused.
    other = _seal(es_keys, "ES/MJ", ar_recipient, attachment=b"other bytes")
    header = load_json_object(other.header)
    header["msg_id"] = load_json_object(envelope.header)["msg_id"]
    header["conversation_id"] = header["msg_id"]
    data = canonical_json(header)
    reused = WireEnvelope(data, sign(es_keys.signing, DOMAIN_ENVELOPE, data), other.parts)
    _refused(network, reused.to_wire(), "replayed", 409)


HIDDEN = "HIDDEN-ANNEX: also freeze account CBU 999"


def _announce(node: LocalNode, wire: object) -> httpx.Response:
    """The same envelope carried as large evidence is (docs/protocol.md §8.5): part 0 alone."""
    assert isinstance(wire, dict)
    body = {**wire, "parts": wire["parts"][:1]}
    return httpx.post(node.url + "/p2p/v1/evidence/envelopes", json=body, timeout=30.0)


def _request(es_keys: NodeKeys, ar_recipient: Recipient, **content: Any) -> WireEnvelope:
    document = json.loads(json.dumps(EXAMPLE["document"]))
    return seal(
        sender_keys=es_keys,
        sender_authority="ES/MJ",
        recipient=ar_recipient,
        content={"kind": "request", "document": document, **content},
        attachments=[],
        conversation_id=None,
        in_reply_to=None,
        created_at=utc_now(),
        ttl=timedelta(days=1),
        randomness=SystemRandomness(),
    )


def _hidden_manifest_member(manifest: dict[str, Any]) -> None:
    manifest["note"] = HIDDEN


def _no_in_reply_to(manifest: dict[str, Any]) -> None:
    del manifest["in_reply_to"]


@pytest.mark.parametrize("post", [post_envelope, _announce], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("forge", "code", "status"),
    [
        (lambda keys, to: _request(keys, to, annex=HIDDEN), "invalid_content", 422),
        (
            lambda keys, to: reseal_manifest(_request(keys, to), keys, _hidden_manifest_member),
            "manifest_mismatch",
            400,
        ),
        (
            lambda keys, to: reseal_manifest(_request(keys, to), keys, _no_in_reply_to),
            "manifest_mismatch",
            400,
        ),
    ],
    ids=["content-member", "manifest-member", "manifest-without-in_reply_to"],
)
def test_members_no_schema_defines_are_refused(
    network: Network,
    es_keys: NodeKeys,
    ar_recipient: Recipient,
    forge: Callable[[NodeKeys, Recipient], WireEnvelope],
    code: str,
    status: int,
    post: Callable[[LocalNode, object], httpx.Response],
) -> None:
    """A pinned peer's validly signed envelope whose manifest or content carries a member no
    schema defines: it would be receipted, and attested by a custody proof, yet never shown
    to the receiving officer (from review). Refused, audited, nothing stored, whether posted
    whole or announced as streamed evidence; the refusal does not echo the member."""
    wire = forge(es_keys, ar_recipient).to_wire()
    transfers_before = _transfers(network)
    _refused(network, wire, code, status, post)
    assert _transfers(network) == transfers_before
    response = post(network.ar, wire)  # the same, again: still refused, still not echoed
    assert response.json()["error"] == code
    assert "HIDDEN" not in response.text
    # The very same request without the member is accepted: it was the member refused.
    accepted = post(network.ar, _request(es_keys, ar_recipient).to_wire())
    assert accepted.status_code == 201, accepted.text


def _transfers(network: Network) -> int:
    engine = network.engine(network.ar)
    try:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(InboundTransfer)) or 0)
    finally:
        engine.dispose()


def test_a_message_with_a_member_beside_its_document_is_refused(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    """The same for a message in a conversation; our own node's request and message, and
    the custody proofs of both on both sides, still pass every member check."""
    request_id = submit_example(network.es)
    wait_delivered(network.es, request_id)

    def message(**content: Any) -> WireEnvelope:
        return seal(
            sender_keys=es_keys,
            sender_authority="ES/MJ",
            recipient=ar_recipient,
            content={
                "kind": "message",
                "document": {"type": "note", "text": "For the file."},
                **content,
            },
            attachments=[Attachment("annex.txt", "text/plain", b"an annex, listed")],
            conversation_id=request_id,
            in_reply_to=request_id,
            created_at=utc_now(),
            ttl=timedelta(days=1),
            randomness=SystemRandomness(),
        )

    # Our own node's request, and a message in its conversation, answered by AR/MPF.
    with network.ar.client("officer") as http:
        sent = http.post(
            f"/api/v1/requests/{request_id}/messages",
            json={"document": {"type": "acknowledgement", "text": "Registered."}},
        )
    assert sent.status_code == 201, sent.text
    wait_delivered(network.ar, request_id)
    for node in (network.es, network.ar):
        messages = read_request(node, request_id)["messages"]
        assert len(messages) == 2
        with node.client("officer") as http:
            for item in messages:
                proof = http.get(f"/api/v1/requests/{request_id}/messages/{item['msg_id']}/proof")
                assert proof.status_code == 200, proof.text
                assert verify_proof(proof.json()).msg_id == item["msg_id"]

    _refused(network, message(annex=HIDDEN).to_wire(), "invalid_content", 422)
    assert len(read_request(network.ar, request_id)["messages"]) == 2
    response = post_envelope(network.ar, message().to_wire())
    assert response.status_code == 201, response.text


# A version 1 header with none of the other fields ({"type":"entraide.envelope","v":1}).
EMPTY_HEADER = (
    b'{"v": 1, "header": "eyJ0eXBlIjoiZW50cmFpZGUuZW52ZWxvcGUiLCJ2IjoxfQ==", "signature": "'
    + b"A" * 86
    + b'==", "parts": ["AA=="]}'
)


@pytest.mark.parametrize(
    ("body", "code", "status"),
    [
        (b"not json", "malformed_envelope", 400),
        (b"[]", "malformed_envelope", 400),
        (b'{"v": 1}', "malformed_envelope", 400),
        (b'{"v": 2, "header": "", "signature": "", "parts": [""]}', "unsupported_version", 400),
        (
            b'{"v": 1, "header": "!!", "signature": "", "parts": ["AA=="]}',
            "malformed_envelope",
            400,
        ),
        (EMPTY_HEADER, "malformed_header", 400),
        (
            EMPTY_HEADER.replace(b"eyJ0eXBlIjoiZW50cmFpZGUuZW52ZWxvcGUiLCJ2IjoxfQ==", b"e30="),
            "unsupported_version",
            400,
        ),
    ],
)
def test_malformed_bodies(network: Network, body: bytes, code: str, status: int) -> None:
    before = count_messages(network, network.ar)
    response = httpx.post(
        network.ar.url + "/p2p/v1/envelopes",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert count_messages(network, network.ar) == before


def test_too_many_parts_and_oversized_body(network: Network) -> None:
    wire = {"v": 1, "header": "e30=", "signature": "A" * 86 + "==", "parts": ["AA=="] * 1000}
    response = post_envelope(network.ar, wire)
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    huge = b'{"v": 1, "parts": ["' + b"A" * (33 * 1024 * 1024) + b'"]}'
    response = httpx.post(
        network.ar.url + "/p2p/v1/envelopes",
        content=huge,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"

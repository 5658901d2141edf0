"""Acceptance 3: random and mutated bytes against every parser of what a peer sends us.

Envelopes (the whole receiver pipeline of docs/protocol.md §9), receipts, identity documents
with their rotation chains, rotation statements and key files: whatever the input, the only
thing that may come out is the parser's documented error (with, for envelopes, one of the
documented refusal codes), never another exception. Mutations are applied both on the wire
(where the signature then fails) and by a sender that re-signs what it mutated (which is how
an input reaches the deeper checks).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.crypto import envelope as env
from app.crypto.encoding import b64d, b64e, canonical_json
from app.crypto.identity import IdentityError, build_identity_document, parse_identity_document
from app.crypto.keyfile import KeyFileError, decode_key_file, encode_key_file
from app.crypto.keys import NodeIdentity, NodeKeys
from app.crypto.randomness import SystemRandomness
from app.crypto.receipts import ReceiptError, SignedReceipt, decode_receipt, verify_receipt
from app.crypto.rotation import RotationError, make_rotation, parse_rotation
from app.crypto.signing import (
    DOMAIN_ENVELOPE,
    DOMAIN_IDENTITY,
    DOMAIN_RECEIPT,
    DOMAIN_ROTATION,
    sign,
)

ENVELOPE_CODES = {
    "malformed_envelope",
    "unsupported_version",
    "too_large",
    "malformed_header",
    "bad_signature",
    "bad_key_wrap",
    "bad_commitment",
    "truncated_part",
    "part_hash_mismatch",
    "decrypt_failed",
    "manifest_mismatch",
}
NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


def _keys(seed: int) -> NodeKeys:
    return NodeKeys(
        signing=SigningKey(bytes([seed]) * 32),
        encryption=PrivateKey(bytes([seed + 1]) * 32),
        log=SigningKey(bytes([seed + 2]) * 32),
    )


SENDER, RECEIVER = _keys(1), _keys(11)


@cache
def sealed() -> env.WireEnvelope:
    return env.seal(
        sender_keys=SENDER,
        sender_authority="FR/MJ",
        recipient=env.Recipient("DE/BFJ", RECEIVER.encryption_public),
        content={"kind": "request", "summary": "relevés"},
        attachments=[env.Attachment("a.txt", "text/plain", b"evidence" * 40)],
        conversation_id=None,
        in_reply_to=None,
        created_at=NOW,
        ttl=timedelta(days=7),
        randomness=SystemRandomness(),
    )


def receive(wire: object) -> str:
    """Run the receiver's checks; the refusal code, or 'accepted'."""
    try:
        envelope = env.decode_wire(wire, max_parts=64, max_header_bytes=64 * 1024)
        header = env.parse_header(envelope.header, len(envelope.parts))
        env.verify_header_signature(envelope, SENDER.signing_public)
        key = env.unwrap_content_key(header, RECEIVER, kid=header.to_enc_kid)
        env.check_commitment(header, key)
        env.check_parts(header, envelope.parts)
        env.check_manifest(header, env.decrypt_parts(header, envelope.parts, key))
    except env.EnvelopeError as error:
        return error.code  # the callers check it is a documented one
    return "accepted"


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """Flip, insert, delete or truncate a few bytes."""
    blob = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(blob) - 1, 0)))
        if action == "flip" and blob:
            blob[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            blob[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and blob:
            del blob[position : position + draw(st.integers(1, 8))]
        else:
            del blob[position:]
    return bytes(blob)


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    return mutate(data, draw)


# --- envelopes ------------------------------------------------------------------------------


@FUZZ
@given(wire=JSON)
def test_random_json_is_refused_with_a_documented_code(wire: object) -> None:
    assert receive(wire) in ENVELOPE_CODES


@FUZZ
@given(
    header=st.binary(max_size=300),
    signature=st.binary(max_size=70),
    parts=st.lists(st.binary(max_size=60), max_size=4),
)
def test_random_bytes_in_every_member(header: bytes, signature: bytes, parts: list[bytes]) -> None:
    wire = {"v": 1, "header": b64e(header), "signature": b64e(signature)}
    wire["parts"] = [b64e(part) for part in parts]  # type: ignore[assignment]
    assert receive(wire) in ENVELOPE_CODES


@FUZZ
@given(data=st.data(), target=st.sampled_from(["header", "signature", "part0", "part1"]))
def test_mutated_wire_bytes_are_refused(data: st.DataObject, target: str) -> None:
    envelope = sealed()
    header, signature, parts = envelope.header, envelope.signature, list(envelope.parts)
    if target == "header":
        header = data.draw(mutated_bytes(header))
    elif target == "signature":
        signature = data.draw(mutated_bytes(signature))
    else:
        index = int(target[-1])
        parts[index] = data.draw(mutated_bytes(parts[index]))
    mutated = env.WireEnvelope(header, signature, parts)
    assume(mutated != envelope)  # two edits can cancel out
    assert receive(mutated.to_wire()) in ENVELOPE_CODES  # every mutation is caught


@FUZZ
@given(data=st.data(), part=st.integers(0, 1))
def test_mutated_header_or_parts_resigned_by_the_sender(data: st.DataObject, part: int) -> None:
    """The sender itself sends garbage: only its signature is right."""
    envelope = sealed()
    header = data.draw(mutated_bytes(envelope.header))
    parts = list(envelope.parts)
    if data.draw(st.booleans()):
        parts[part] = data.draw(mutated_bytes(parts[part]))
    wire = env.WireEnvelope(header, sign(SENDER.signing, DOMAIN_ENVELOPE, header), parts)
    assert receive(wire.to_wire()) in ENVELOPE_CODES | {"accepted"}


@FUZZ
@given(data=st.data())
def test_any_header_field_replaced_and_resigned(data: st.DataObject) -> None:
    body: dict[str, Any] = json.loads(sealed().header)
    field = data.draw(st.sampled_from(sorted(body)))
    if isinstance(body[field], dict) and data.draw(st.booleans()):
        body[field][data.draw(st.sampled_from(sorted(body[field]) or ["x"]))] = data.draw(JSON)
    elif isinstance(body[field], list) and body[field] and data.draw(st.booleans()):
        body[field][0] = data.draw(JSON)
    else:
        body[field] = data.draw(JSON)
    header = canonical_json(body)
    wire = env.WireEnvelope(header, sign(SENDER.signing, DOMAIN_ENVELOPE, header), sealed().parts)
    assert receive(wire.to_wire()) in ENVELOPE_CODES | {"accepted"}


# --- receipts -------------------------------------------------------------------------------


def _receipt_body() -> dict[str, Any]:
    return {
        "v": 1,
        "type": "entraide.receipt",
        "msg_id": "ab" * 16,
        "envelope_hash": "cd" * 32,
        "from": "FR/MJ",
        "to": "DE/BFJ",
        "received_at": "2025-03-14T09:27:05Z",
        "status": "accepted",
        "signer_kid": RECEIVER.signing_kid,
        "checkpoint": None,
    }


def verify(signed: SignedReceipt) -> None:
    verify_receipt(
        signed,
        signer_public=RECEIVER.signing_public,
        signer_kid=RECEIVER.signing_kid,
        msg_id="ab" * 16,
        envelope_hash="cd" * 32,
        from_authority="FR/MJ",
        to_authority="DE/BFJ",
    )


@FUZZ
@given(wire=JSON)
def test_random_receipt_wire(wire: object) -> None:
    try:
        verify(decode_receipt(wire))
    except ReceiptError:
        pass


@FUZZ
@given(data=st.data())
def test_mutated_receipt_body_signed_by_the_receiver(data: st.DataObject) -> None:
    body = canonical_json(_receipt_body())
    if data.draw(st.booleans()):
        body = data.draw(mutated_bytes(body))
    else:
        edited = _receipt_body()
        edited[data.draw(st.sampled_from(sorted(edited)))] = data.draw(JSON)
        body = canonical_json(edited)
    signed = SignedReceipt(body, sign(RECEIVER.signing, DOMAIN_RECEIPT, body))
    wire = json.loads(json.dumps(signed.to_wire()))
    try:
        verify(decode_receipt(wire))
    except ReceiptError:
        pass


# --- identity documents and rotations -------------------------------------------------------


@cache
def rotated_identity() -> tuple[dict[str, str], NodeKeys]:
    """A node that rotated once: its document carries a one-link chain."""
    old = SENDER
    new_signing, new_encryption = SigningKey(b"\x05" * 32), PrivateKey(b"\x06" * 32)
    rotation = make_rotation(
        authority_id="FR/MJ",
        seq=1,
        old_signing=old.signing,
        old_encryption=old.encryption,
        new_signing=new_signing,
        new_encryption=new_encryption,
        rotated_at=NOW,
        accepted_until=NOW + timedelta(days=30),
    )
    keys = NodeKeys(new_signing, new_encryption, old.log, rotations=(rotation,))
    identity = NodeIdentity("FR/MJ", "Ministère", "https://fr.example")
    return build_identity_document(identity, keys, issued_at=NOW), keys


@FUZZ
@given(wire=JSON)
def test_random_identity_wire(wire: object) -> None:
    try:
        parse_identity_document(wire)
    except IdentityError:
        pass


@FUZZ
@given(data=st.data())
def test_mutated_identity_document_resigned(data: st.DataObject) -> None:
    wire, keys = rotated_identity()
    document = data.draw(mutated_bytes(json.loads(json.dumps(wire))["document"].encode()))
    try:
        raw = b64d(document.decode("ascii", errors="replace"))
    except ValueError:
        raw = document
    signed = {"document": b64e(raw), "signature": b64e(sign(keys.signing, DOMAIN_IDENTITY, raw))}
    try:
        parse_identity_document(signed)
    except IdentityError:
        pass


@FUZZ
@given(data=st.data())
def test_rotation_fields_replaced_and_resigned(data: st.DataObject) -> None:
    wire, keys = rotated_identity()
    rotation = keys.rotations[0]
    body: dict[str, Any] = json.loads(rotation.statement)
    body[data.draw(st.sampled_from(sorted(body)))] = data.draw(JSON)
    statement = canonical_json(body)
    signed = {
        "statement": b64e(statement),
        "signature": b64e(sign(SENDER.signing, DOMAIN_ROTATION, statement)),
    }
    try:
        parse_rotation(signed)
    except RotationError:
        pass
    document: dict[str, Any] = json.loads(b64d(wire["document"]))
    document["rotations"] = [signed]
    raw = canonical_json(document)
    try:
        parse_identity_document(
            {"document": b64e(raw), "signature": b64e(sign(keys.signing, DOMAIN_IDENTITY, raw))}
        )
    except IdentityError:
        pass


# --- key files ------------------------------------------------------------------------------


@cache
def protected_key_file() -> bytes:
    return encode_key_file("signing", bytes(32), passphrase=b"fuzz passphrase")


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_mutated_key_files_raise_only_key_file_errors(data: st.DataObject) -> None:
    source = data.draw(
        st.sampled_from([protected_key_file(), encode_key_file("log", bytes(32), passphrase=None)])
    )
    blob = data.draw(mutated_bytes(source)) if data.draw(st.booleans()) else data.draw(st.binary())
    try:
        decode_key_file(blob, kind="signing", passphrase=b"fuzz passphrase")
    except KeyFileError:
        pass


def test_a_refusal_of_bad_json_names_the_problem_not_the_interpreters_internals() -> None:
    """What a peer sent is refused in the protocol's words: the details go back to the
    sender and into the audit trail for good, and said which Python function failed."""
    from app.crypto.encoding import DecodeError, load_canonical_object

    cases = {
        b'{"\xff":1}': "not UTF-8 (byte 2)",
        b'{"v":' + b"1" * 5000 + b"}": "a number too long",
        b"[" * 30000: "nested too deeply",
        b'{"v":}': "not JSON (Expecting value at character 5)",
        b'{"a":1,"a":1}': "duplicate key",
    }
    for data, words in cases.items():
        try:
            load_canonical_object(data)
        except DecodeError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"{data[:20]!r} was accepted")
        assert words in message
        for internal in ("codec", "sys.", "recursion", "Exceeds the limit"):
            assert internal not in message

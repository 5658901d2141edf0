"""Seal/open, receipts and identity documents: every refusal has its own code.

`receive` below runs the receiver's cryptographic checks in the order docs/protocol.md §9
fixes; the P2P service adds its database checks (known sender, addressee, time, replay)
between them. Tampered envelopes are built the way an attacker would: bytes flipped on the
wire, or a header edited and re-signed by whichever key the scenario allows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey

from app.crypto import envelope as env
from app.crypto.encoding import b64d, b64e, canonical_json, sha256_hex
from app.crypto.identity import IdentityError, build_identity_document, parse_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, fingerprints_match, format_fingerprint
from app.crypto.randomness import SystemRandomness
from app.crypto.receipts import (
    ReceiptError,
    SignedReceipt,
    decode_receipt,
    issue_receipt,
    verify_receipt,
)
from app.crypto.signing import DOMAIN_ENVELOPE, DOMAIN_IDENTITY, DOMAIN_RECEIPT, sign
from tests.crypto.forge import reseal_manifest

CHUNK = env.CHUNK_BYTES
LIMITS = {"max_parts": 64, "max_header_bytes": 64 * 1024}
NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
HEADER_CODES = {"malformed_header", "unsupported_version"}


@dataclass(frozen=True)
class Node:
    authority: str
    keys: NodeKeys

    @property
    def recipient(self) -> env.Recipient:
        return env.Recipient(self.authority, self.keys.encryption_public)


def _node(authority: str, seed: int) -> Node:
    keys = NodeKeys(
        signing=SigningKey(bytes([seed]) * 32),
        encryption=PrivateKey(bytes([seed + 1]) * 32),
        log=SigningKey(bytes([seed + 2]) * 32),
    )
    return Node(authority, keys)


@cache
def fr() -> Node:
    return _node("FR/MJ", 1)


@cache
def de() -> Node:
    return _node("DE/BFJ", 11)


@cache
def it() -> Node:
    return _node("IT/MG", 21)


def data(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def seal(
    sender: Node | None = None,
    recipient: Node | None = None,
    attachments: list[bytes] | None = None,
    **overrides: Any,
) -> env.WireEnvelope:
    sender, recipient = sender or fr(), recipient or de()
    arguments: dict[str, Any] = {
        "sender_keys": sender.keys,
        "sender_authority": sender.authority,
        "recipient": recipient.recipient,
        "content": {"kind": "request", "summary": "relevés bancaires"},
        "attachments": [
            env.Attachment(f"file-{number}.bin", "application/octet-stream", item)
            for number, item in enumerate([b"evidence"] if attachments is None else attachments)
        ],
        "conversation_id": None,
        "in_reply_to": None,
        "created_at": NOW,
        "ttl": timedelta(days=7),
        "randomness": SystemRandomness(),
    }
    arguments.update(overrides)
    return env.seal(**arguments)


def receive(wire: object, receiver: Node, sender_public: bytes) -> tuple[env.Header, env.Opened]:
    envelope = env.decode_wire(wire, **LIMITS)
    header = env.parse_header(envelope.header, len(envelope.parts))
    env.verify_header_signature(envelope, sender_public)
    content_key = env.unwrap_content_key(header, receiver.keys, kid=header.to_enc_kid)
    env.check_commitment(header, content_key)
    env.check_parts(header, envelope.parts)
    plaintexts = env.decrypt_parts(header, envelope.parts, content_key)
    return header, env.check_manifest(header, plaintexts)


def refusal(
    envelope: env.WireEnvelope | object,
    receiver: Node | None = None,
    sender: Node | None = None,
) -> str:
    wire = envelope.to_wire() if isinstance(envelope, env.WireEnvelope) else envelope
    with pytest.raises(env.EnvelopeError) as caught:
        receive(wire, receiver or de(), (sender or fr()).keys.signing_public)
    return caught.value.code


def resign(
    envelope: env.WireEnvelope,
    edit: Callable[[dict[str, Any]], None],
    *,
    signer: Node | None = None,
    parts: list[bytes] | None = None,
) -> env.WireEnvelope:
    """The header as a sender would re-emit it after `edit`, signed by `signer`."""
    body = json.loads(envelope.header)
    edit(body)
    header = canonical_json(body)
    signature = sign((signer or fr()).keys.signing, DOMAIN_ENVELOPE, header)
    return env.WireEnvelope(header, signature, envelope.parts if parts is None else parts)


def describe(body: dict[str, Any], index: int, cipher: bytes) -> None:
    body["parts"][index]["length"] = len(cipher)
    body["parts"][index]["sha256"] = sha256_hex(cipher)


def flip(blob: bytes, position: int, mask: int = 0x01) -> bytes:
    return blob[:position] + bytes([blob[position] ^ mask]) + blob[position + 1 :]


def content_key_of(envelope: env.WireEnvelope, reader: Node) -> bytes:
    header = env.parse_header(envelope.header, len(envelope.parts))
    return env.unwrap_content_key(header, reader.keys, kid=reader.keys.encryption_kid)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1], ids=str)
def test_round_trip_at_chunk_boundaries(size: int) -> None:
    attachment = data(size)
    sealed = seal(attachments=[attachment])
    header, opened = receive(sealed.to_wire(), de(), fr().keys.signing_public)
    assert opened.attachments == [attachment]
    assert header.parts[1].length == env.ciphertext_length(size) == len(sealed.parts[1])
    chunks = max(1, -(-size // CHUNK))
    assert len(sealed.parts[1]) == size + chunks * env.ABYTES
    entry = opened.manifest["attachments"][0]
    assert (entry["index"], entry["size"], entry["sha256"]) == (1, size, sha256_hex(attachment))


def test_round_trip_carries_every_field() -> None:
    sealed = seal(
        attachments=[b"one", b"", b"three"],
        conversation_id="ab" * 16,
        in_reply_to="cd" * 16,
        content={"kind": "reply", "note": "é\n\u2028\U0001d53c"},
    )
    wire = json.loads(json.dumps(sealed.to_wire()))
    header, opened = receive(wire, de(), fr().keys.signing_public)
    assert (header.from_authority, header.to_authority) == ("FR/MJ", "DE/BFJ")
    assert header.from_sig_kid == fr().keys.signing_kid
    assert header.from_enc_kid == fr().keys.encryption_kid
    assert header.to_enc_kid == de().keys.encryption_kid
    assert (header.conversation_id, header.in_reply_to) == ("ab" * 16, "cd" * 16)
    assert (header.created_at, header.expires_at) == (NOW, NOW + timedelta(days=7))
    assert opened.attachments == [b"one", b"", b"three"]
    assert opened.manifest["content"] == {"kind": "reply", "note": "é\n\u2028\U0001d53c"}
    assert sealed.envelope_hash == sha256_hex(sealed.header)


def test_a_new_conversation_is_named_after_its_first_message() -> None:
    header, _ = receive(seal().to_wire(), de(), fr().keys.signing_public)
    assert header.conversation_id == header.msg_id


def test_envelope_without_attachments() -> None:
    sealed = seal(attachments=[])
    _, opened = receive(sealed.to_wire(), de(), fr().keys.signing_public)
    assert (opened.attachments, opened.manifest["attachments"]) == ([], [])


def test_sender_can_open_its_own_copy() -> None:
    sealed = seal(attachments=[b"evidence", data(CHUNK + 1)])
    header, opened = env.open_envelope(sealed, fr().keys)
    assert opened.attachments == [b"evidence", data(CHUNK + 1)]
    assert set(header.wraps) == {de().keys.encryption_kid, fr().keys.encryption_kid}


def test_a_third_node_cannot_open() -> None:
    with pytest.raises(env.EnvelopeError) as caught:
        env.open_envelope(seal(), it().keys)
    assert caught.value.code == "bad_key_wrap"


def test_each_seal_draws_fresh_randomness() -> None:
    first, second = seal(), seal()
    assert json.loads(first.header)["msg_id"] != json.loads(second.header)["msg_id"]
    assert first.parts[0] != second.parts[0]


# --- the header and its signature -------------------------------------------------------------


def test_flipped_header_byte_is_bad_signature() -> None:
    sealed = seal()
    position = sealed.header.index(b'"created_at":"2025') + len(b'"created_at":"202')
    tampered = env.WireEnvelope(flip(sealed.header, position), sealed.signature, sealed.parts)
    assert b'"created_at":"2024' in tampered.header
    assert refusal(tampered) == "bad_signature"


def test_every_header_bit_flip_is_refused_before_any_decryption() -> None:
    sealed = seal()
    codes = set()
    for position in range(len(sealed.header)):
        tampered = env.WireEnvelope(flip(sealed.header, position), sealed.signature, sealed.parts)
        codes.add(refusal(tampered))
    assert codes <= HEADER_CODES | {"bad_signature"}
    assert "bad_signature" in codes


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_flipped_signature_byte_is_bad_signature(position: int) -> None:
    sealed = seal()
    tampered = env.WireEnvelope(sealed.header, flip(sealed.signature, position), sealed.parts)
    assert refusal(tampered) == "bad_signature"


def test_signature_by_another_key_is_bad_signature() -> None:
    sealed = seal()
    forged = env.WireEnvelope(
        sealed.header, sign(it().keys.signing, DOMAIN_ENVELOPE, sealed.header), sealed.parts
    )
    assert refusal(forged) == "bad_signature"


def test_signature_from_another_domain_is_bad_signature() -> None:
    sealed = seal()
    crossed = env.WireEnvelope(
        sealed.header, sign(fr().keys.signing, DOMAIN_RECEIPT, sealed.header), sealed.parts
    )
    assert refusal(crossed) == "bad_signature"


# --- key wraps and commitment -----------------------------------------------------------------


def _recipient_wrap(body: dict[str, Any]) -> dict[str, Any]:
    wrap: dict[str, Any] = next(w for w in body["wraps"] if w["kid"] == de().keys.encryption_kid)
    return wrap


def test_replaced_wrap_resigned_by_sender_is_bad_key_wrap() -> None:
    def garbage_wrap(body: dict[str, Any]) -> None:
        stranger = PrivateKey.generate().public_key
        _recipient_wrap(body)["wrap"] = b64e(SealedBox(stranger).encrypt(bytes(32)))

    assert refusal(resign(seal(), garbage_wrap)) == "bad_key_wrap"


def test_missing_wrap_for_the_recipient_is_bad_key_wrap() -> None:
    def drop(body: dict[str, Any]) -> None:
        body["wraps"] = [w for w in body["wraps"] if w["kid"] != de().keys.encryption_kid]

    assert refusal(resign(seal(), drop)) == "bad_key_wrap"


def test_wrap_of_another_content_key_is_bad_commitment() -> None:
    def other_key(body: dict[str, Any]) -> None:
        recipient = PublicKey(de().keys.encryption_public)
        _recipient_wrap(body)["wrap"] = b64e(SealedBox(recipient).encrypt(bytes(32)))

    assert refusal(resign(seal(), other_key)) == "bad_commitment"


def test_altered_commitment_resigned_is_bad_commitment() -> None:
    def alter(body: dict[str, Any]) -> None:
        body["commitment"] = b64e(flip(b64d(body["commitment"]), 0))

    assert refusal(resign(seal(), alter)) == "bad_commitment"


def test_changed_msg_id_resigned_is_bad_commitment() -> None:
    # The commitment binds msg_id, so a sender cannot reuse a content key under a new id.
    def renumber(body: dict[str, Any]) -> None:
        body["msg_id"] = "00" * 16

    assert refusal(resign(seal(), renumber)) == "bad_commitment"


# --- parts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("position", [0, 1, -17, -1])
def test_flipped_ciphertext_byte_is_part_hash_mismatch(index: int, position: int) -> None:
    sealed = seal()
    parts = list(sealed.parts)
    parts[index] = flip(parts[index], position % len(parts[index]))
    tampered = env.WireEnvelope(sealed.header, sealed.signature, parts)
    assert refusal(tampered) == "part_hash_mismatch"


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("position", [0, 1, -17, -1])
def test_flipped_ciphertext_with_resigned_hash_is_decrypt_failed(index: int, position: int) -> None:
    sealed = seal()
    parts = list(sealed.parts)
    parts[index] = flip(parts[index], position % len(parts[index]))
    tampered = resign(sealed, lambda body: describe(body, index, parts[index]), parts=parts)
    assert refusal(tampered) == "decrypt_failed"


def test_raw_truncation_is_truncated_part() -> None:
    sealed = seal(attachments=[data(CHUNK + 1)])
    parts = [sealed.parts[0], sealed.parts[1][: CHUNK + env.ABYTES]]
    tampered = env.WireEnvelope(sealed.header, sealed.signature, parts)
    assert refusal(tampered) == "truncated_part"


@pytest.mark.parametrize(
    ("keep", "code"),
    [
        (CHUNK + env.ABYTES, "truncated_part"),  # at the chunk boundary: TAG_FINAL is missing
        (CHUNK + env.ABYTES + 5, "truncated_part"),  # less than a chunk's overhead left
        (CHUNK, "decrypt_failed"),  # inside the first chunk: its MAC fails
    ],
    ids=["chunk-boundary", "short-tail", "mid-chunk"],
)
def test_truncation_with_resigned_length_and_hash(keep: int, code: str) -> None:
    sealed = seal(attachments=[data(CHUNK + 1)])
    cut = sealed.parts[1][:keep]
    tampered = resign(sealed, lambda body: describe(body, 1, cut), parts=[sealed.parts[0], cut])
    assert refusal(tampered) == code


def test_part_longer_than_declared_is_malformed_envelope() -> None:
    sealed = seal()
    tampered = env.WireEnvelope(sealed.header, sealed.signature, [*sealed.parts[:1], b"x" * 99])
    assert refusal(tampered) == "malformed_envelope"


def test_data_after_the_final_chunk_is_decrypt_failed() -> None:
    sealed = seal(attachments=[data(CHUNK)])
    longer = sealed.parts[1] + sealed.parts[1][-env.ABYTES :]
    tampered = resign(
        sealed, lambda body: describe(body, 1, longer), parts=[sealed.parts[0], longer]
    )
    assert refusal(tampered) == "decrypt_failed"


def test_swapped_parts_are_refused_even_when_resigned() -> None:
    sealed = seal(attachments=[b"first", b"fifth"])
    swapped = [sealed.parts[0], sealed.parts[2], sealed.parts[1]]
    assert refusal(env.WireEnvelope(sealed.header, sealed.signature, swapped)) == (
        "part_hash_mismatch"
    )

    def swap(body: dict[str, Any]) -> None:
        body["parts"][1], body["parts"][2] = body["parts"][2], body["parts"][1]
        body["parts"][1]["index"], body["parts"][2]["index"] = 1, 2

    # Each part's key and associated data carry its index.
    assert refusal(resign(sealed, swap, parts=swapped)) == "decrypt_failed"


# --- the inner manifest -----------------------------------------------------------------------


def test_header_resigned_by_a_third_node_is_manifest_mismatch() -> None:
    def claim(body: dict[str, Any]) -> None:
        body["from"] = {
            "authority": it().authority,
            "sig_kid": it().keys.signing_kid,
            "enc_kid": it().keys.encryption_kid,
        }

    hijacked = resign(seal(), claim, signer=it())
    assert refusal(hijacked, sender=it()) == "manifest_mismatch"


def test_recipient_forwarding_as_author_is_manifest_mismatch() -> None:
    sealed = seal()
    content_key = content_key_of(sealed, de())

    def forward(body: dict[str, Any]) -> None:
        body["from"] = {
            "authority": de().authority,
            "sig_kid": de().keys.signing_kid,
            "enc_kid": de().keys.encryption_kid,
        }
        body["to"] = {"authority": it().authority, "enc_kid": it().keys.encryption_kid}
        body["wraps"] = [
            {
                "kid": it().keys.encryption_kid,
                "wrap": b64e(
                    SealedBox(PublicKey(it().keys.encryption_public)).encrypt(content_key)
                ),
            }
        ]

    forwarded = resign(sealed, forward, signer=de())
    assert refusal(forwarded, receiver=it(), sender=de()) == "manifest_mismatch"


# --- malformed wire ---------------------------------------------------------------------------


_DROP = object()  # as a value in `_wire` or `_set`: remove the field


def _wire(**changes: object) -> dict[str, object]:
    wire: dict[str, object] = {**seal().to_wire(), **changes}
    return {key: value for key, value in wire.items() if value is not _DROP}


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: [], "malformed_envelope"),
        (lambda: "envelope", "malformed_envelope"),
        (lambda: None, "malformed_envelope"),
        (lambda: _wire(v=_DROP), "malformed_envelope"),
        (lambda: _wire(header=_DROP), "malformed_envelope"),
        (lambda: _wire(signature=_DROP), "malformed_envelope"),
        (lambda: _wire(parts=_DROP), "malformed_envelope"),
        (lambda: _wire(extra=1), "malformed_envelope"),
        (lambda: _wire(v=2), "unsupported_version"),
        (lambda: _wire(v="1"), "unsupported_version"),
        (lambda: _wire(v=None), "unsupported_version"),
        (lambda: _wire(parts=[]), "malformed_envelope"),
        (lambda: _wire(parts="AAAA"), "malformed_envelope"),
        (lambda: _wire(parts={"0": "AAAA"}), "malformed_envelope"),
        (lambda: _wire(parts=[1]), "malformed_envelope"),
        (lambda: _wire(parts=["not base64!"]), "malformed_envelope"),
        (lambda: _wire(parts=["AAA"]), "malformed_envelope"),
        (lambda: _wire(parts=["AAAA"] * 65), "too_large"),
        (lambda: _wire(header="A" * (64 * 1024 * 2)), "too_large"),
        (lambda: _wire(header="e30"), "malformed_envelope"),
        (lambda: _wire(header="e30=\n"), "malformed_envelope"),
        (lambda: _wire(header="ééé="), "malformed_envelope"),
        (lambda: _wire(signature=None), "malformed_envelope"),
        (lambda: _wire(signature=b64e(bytes(63))), "malformed_envelope"),
        (lambda: _wire(signature=b64e(bytes(65))), "malformed_envelope"),
        (lambda: _wire(signature="#" * 88), "malformed_envelope"),
    ],
)
def test_malformed_wire(build: Callable[[], object], code: str) -> None:
    assert refusal(build()) == code


def test_an_unknown_version_is_refused_without_echoing_it() -> None:
    for version in (2, "Juan Pérez, IBAN ES91 2100 0418 4502 0005 1332", ["x" * 1000]):
        with pytest.raises(env.EnvelopeError) as caught:
            env.decode_wire(_wire(v=version), **LIMITS)
        assert caught.value.code == "unsupported_version"
        assert str(version) not in caught.value.detail


def test_non_string_header_is_malformed_envelope() -> None:
    assert refusal(_wire(header=5)) == "malformed_envelope"


def _header_body() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(seal().header)
    return body


def _edited(edit: Callable[[dict[str, Any]], object]) -> bytes:
    body = _header_body()
    edit(body)
    return canonical_json(body)


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = body
        for step in parents:
            target = target[int(step)] if step.isdigit() else target[step]
        if value is _DROP:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return edit


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (lambda: b"not json", "malformed_header"),
        (lambda: b"\xff\xfe{}", "malformed_header"),
        (lambda: b"[]", "malformed_header"),
        (lambda: b"[" * 100_000, "malformed_header"),
        (lambda: _edited(_set("wraps", _DROP)), "malformed_header"),
        (lambda: _edited(_set("extra", 1)), "malformed_header"),
        (lambda: _edited(_set("v", 2)), "unsupported_version"),
        (lambda: _edited(_set("type", "entraide.receipt")), "unsupported_version"),
        (lambda: _edited(_set("chunk_bytes", 65536)), "malformed_header"),
        (lambda: _edited(_set("msg_id", "AB" * 16)), "malformed_header"),
        (lambda: _edited(_set("msg_id", "ab" * 15)), "malformed_header"),
        (lambda: _edited(_set("msg_id", 7)), "malformed_header"),
        (lambda: _edited(_set("conversation_id", None)), "malformed_header"),
        (lambda: _edited(_set("in_reply_to", 5)), "malformed_header"),
        (lambda: _edited(_set("in_reply_to", "x")), "malformed_header"),
        (lambda: _edited(_set("created_at", "2025-03-14 09:26:53")), "malformed_header"),
        (lambda: _edited(_set("expires_at", 1741944413)), "malformed_header"),
        (lambda: _edited(_set("from", "FR/MJ")), "malformed_header"),
        (lambda: _edited(_set("from.sig_kid", _DROP)), "malformed_header"),
        (lambda: _edited(_set("to.enc_kid", "zz" * 16)), "malformed_header"),
        (lambda: _edited(_set("to.authority", None)), "malformed_header"),
        (lambda: _edited(_set("to.authority", "de/bfj")), "malformed_header"),
        (lambda: _edited(_set("from.authority", "FR/MJ\n")), "malformed_header"),
        (lambda: _edited(_set("wraps", {})), "malformed_header"),
        (lambda: _edited(_set("wraps.0.kid", _DROP)), "malformed_header"),
        (lambda: _edited(_set("wraps.0.wrap", b64e(bytes(79)))), "malformed_header"),
        (lambda: _edited(_set("wraps.0.wrap", 80)), "malformed_header"),
        (lambda: _edited(_set("wraps.0", [])), "malformed_header"),
        (lambda: _edited(_set("commitment", b64e(bytes(31)))), "malformed_header"),
        (lambda: _edited(_set("parts", None)), "malformed_header"),
        (lambda: _edited(lambda body: body["parts"].pop()), "malformed_header"),
        (lambda: _edited(_set("parts.1.index", 2)), "malformed_header"),
        (lambda: _edited(_set("parts.1.length", 16)), "malformed_header"),
        (lambda: _edited(_set("parts.1.length", "59")), "malformed_header"),
        (lambda: _edited(_set("parts.1.sha256", "AB" * 32)), "malformed_header"),
        (lambda: _edited(_set("parts.1.stream_header", b64e(bytes(23)))), "malformed_header"),
        (lambda: _edited(_set("parts.1.extra", 0)), "malformed_header"),
    ],
)
def test_malformed_header(header: Callable[[], bytes], code: str) -> None:
    with pytest.raises(env.EnvelopeError) as caught:
        env.parse_header(header(), 2)
    assert caught.value.code == code


def test_huge_number_in_header_is_malformed_header() -> None:
    # Python's int() refuses more than 4300 digits with a bare ValueError.
    header = _edited(_set("chunk_bytes", 0)).replace(
        b'"chunk_bytes":0', b'"chunk_bytes":' + b"9" * 5000
    )
    with pytest.raises(env.EnvelopeError) as caught:
        env.parse_header(header, 2)
    assert caught.value.code == "malformed_header"


def test_hex_id_with_trailing_newline_is_malformed_header() -> None:
    # re.match with "$" would accept it, and bytes.fromhex ignores the newline.
    body = _header_body()
    with pytest.raises(env.EnvelopeError) as caught:
        env.parse_header(_edited(_set("msg_id", body["msg_id"] + "\n")), 2)
    assert caught.value.code == "malformed_header"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
HEADER_PATHS = [
    *sorted(env.HEADER_FIELDS),
    "from.authority",
    "from.sig_kid",
    "from.enc_kid",
    "to.authority",
    "to.enc_kid",
    "wraps.0",
    "wraps.0.kid",
    "wraps.0.wrap",
    "parts.0",
    "parts.1.index",
    "parts.1.stream_header",
    "parts.1.length",
    "parts.1.sha256",
]


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(path=st.sampled_from(HEADER_PATHS), value=JSON_VALUES)
def test_any_field_replaced_parses_or_is_a_header_refusal(path: str, value: object) -> None:
    assert _parse_outcome(canonical_json(_edit_cached(path, value))) in HEADER_CODES | {"parsed"}


def _parse_outcome(header: bytes) -> str:
    try:
        env.parse_header(header, 2)
    except env.EnvelopeError as error:
        return error.code
    return "parsed"


@cache
def _cached_body() -> str:
    return seal().header.decode()


def _edit_cached(path: str, value: object) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(_cached_body())
    _set(path, value)(body)
    return body


# --- receipts ---------------------------------------------------------------------------------

RECEIVED = datetime(2025, 3, 14, 9, 27, 5, tzinfo=UTC)


def _receipt(**overrides: Any) -> tuple[env.WireEnvelope, dict[str, Any]]:
    sealed = seal()
    header = env.parse_header(sealed.header, len(sealed.parts))
    arguments: dict[str, Any] = {
        "signer_kid": de().keys.signing_kid,
        "msg_id": header.msg_id,
        "envelope_hash": sealed.envelope_hash,
        "from_authority": fr().authority,
        "to_authority": de().authority,
        "received_at": RECEIVED,
        "checkpoint": "de.example/audit\n1\nAAAA\n\n— de.example sig\n",
    }
    arguments.update(overrides)
    return sealed, arguments


def _expectation(sealed: env.WireEnvelope, **overrides: Any) -> dict[str, Any]:
    expected: dict[str, Any] = {
        "signer_public": de().keys.signing_public,
        "msg_id": json.loads(sealed.header)["msg_id"],
        "envelope_hash": sealed.envelope_hash,
        "from_authority": fr().authority,
        "to_authority": de().authority,
    }
    expected.update(overrides)
    return expected


def test_receipt_round_trip() -> None:
    sealed, arguments = _receipt()
    signed = issue_receipt(de().keys.signing, **arguments)
    wire = json.loads(json.dumps(signed.to_wire()))
    receipt = verify_receipt(decode_receipt(wire), **_expectation(sealed))
    assert receipt.envelope_hash == sealed.envelope_hash
    assert receipt.received_at == RECEIVED
    assert (receipt.status, receipt.signer_kid) == ("accepted", de().keys.signing_kid)
    assert receipt.checkpoint == arguments["checkpoint"]


@pytest.mark.parametrize(
    "override",
    [
        {"signer_public": it().keys.signing_public},
        {"signer_public": fr().keys.signing_public},
        {"msg_id": "00" * 16},
        {"envelope_hash": "00" * 32},
        {"from_authority": it().authority},
        {"to_authority": it().authority},
    ],
    ids=["third-node", "sender-itself", "msg_id", "envelope_hash", "from", "to"],
)
def test_receipt_for_something_else_is_refused(override: dict[str, Any]) -> None:
    sealed, arguments = _receipt()
    signed = issue_receipt(de().keys.signing, **arguments)
    with pytest.raises(ReceiptError):
        verify_receipt(signed, **_expectation(sealed, **override))


def test_tampered_receipt_is_refused() -> None:
    sealed, arguments = _receipt()
    signed = issue_receipt(de().keys.signing, **arguments)
    body = signed.body.replace(b'"status":"accepted"', b'"status":"accepted" ')
    with pytest.raises(ReceiptError):
        verify_receipt(SignedReceipt(body, signed.signature), **_expectation(sealed))


def test_receipt_signed_for_another_domain_is_refused() -> None:
    sealed, arguments = _receipt()
    signed = issue_receipt(de().keys.signing, **arguments)
    crossed = SignedReceipt(signed.body, sign(de().keys.signing, DOMAIN_ENVELOPE, signed.body))
    with pytest.raises(ReceiptError):
        verify_receipt(crossed, **_expectation(sealed))


@pytest.mark.parametrize(
    "edit",
    [
        _set("status", "rejected"),
        _set("v", 2),
        _set("type", "entraide.envelope"),
        _set("extra", True),
        _set("checkpoint", _DROP),
        _set("received_at", "yesterday"),
    ],
    ids=["status", "version", "type", "extra-field", "missing-field", "time"],
)
def test_validly_signed_but_malformed_receipt_is_refused(
    edit: Callable[[dict[str, Any]], None],
) -> None:
    sealed, arguments = _receipt()
    body = json.loads(issue_receipt(de().keys.signing, **arguments).body)
    edit(body)
    raw = canonical_json(body)
    signed = SignedReceipt(raw, sign(de().keys.signing, DOMAIN_RECEIPT, raw))
    with pytest.raises(ReceiptError):
        verify_receipt(signed, **_expectation(sealed))


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        {"receipt": "e30="},
        {"receipt": "e30=", "signature": b64e(bytes(64)), "extra": 1},
        {"receipt": "e30", "signature": b64e(bytes(64))},
        {"receipt": "e30=", "signature": b64e(bytes(63))},
        {"receipt": 1, "signature": b64e(bytes(64))},
        {"receipt": b64e(b"{}" * 9000), "signature": b64e(bytes(64))},
    ],
)
def test_malformed_receipt_wire(wire: object) -> None:
    with pytest.raises(ReceiptError):
        decode_receipt(wire)


# --- identity documents -----------------------------------------------------------------------

ISSUED = datetime(2025, 1, 1, tzinfo=UTC)


def _identity(node: Node) -> dict[str, str]:
    identity = NodeIdentity(node.authority, "Ministère", "https://node.example")
    return build_identity_document(identity, node.keys, issued_at=ISSUED)


def _signed_identity(body: dict[str, Any], signer: Node) -> dict[str, str]:
    document = canonical_json(body)
    return {
        "document": b64e(document),
        "signature": b64e(sign(signer.keys.signing, DOMAIN_IDENTITY, document)),
    }


def _identity_body(node: Node) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(b64d(_identity(node)["document"]))
    return body


def test_identity_document_verifies_and_matches_the_pin() -> None:
    peer = parse_identity_document(json.loads(json.dumps(_identity(fr()))))
    assert (peer.authority_id, peer.name, peer.public_url) == (
        "FR/MJ",
        "Ministère",
        "https://node.example",
    )
    assert peer.issued_at == ISSUED
    assert peer.signing.public_key == fr().keys.signing_public
    assert peer.encryption.kid == fr().keys.encryption_kid
    assert peer.log.public_key == fr().keys.log_public
    read_out = format_fingerprint(fr().keys.fingerprint)
    assert fingerprints_match(read_out, peer.fingerprint)
    assert fingerprints_match(read_out.lower().replace(" ", ":"), peer.fingerprint)


def test_another_nodes_valid_document_does_not_match_the_pin() -> None:
    impostor = parse_identity_document(_identity(it()))
    assert not fingerprints_match(format_fingerprint(fr().keys.fingerprint), impostor.fingerprint)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "Evil\r\nAR/MPF\tactive"),  # forges a line of `peers list`
        ("name", "Evil\x1b[31m"),  # a terminal escape
        ("name", "Evil\x00Name"),
        ("name", "Evil \u202eNAM"),  # shown in another order than it is stored
        ("name", "\x85next line"),  # a C1 control
        ("name", "Evil\u2028AR/MPF"),  # a line separator: `splitlines` breaks on it
        ("name", "Evil\u200fName"),  # a right-to-left mark
        ("name", ""),
        ("name", "x" * 201),
        ("public_url", "https://node.example\n"),
        ("public_url", "https://node.example/" + "x" * 500),
    ],
)
def test_an_identity_whose_name_or_url_is_not_one_plain_line_is_refused(
    field: str, value: str
) -> None:
    # Signed by the peer's own key: the fingerprint matches, and the text is still refused.
    body = {**_identity_body(fr()), field: value}
    with pytest.raises(IdentityError, match="one"):
        parse_identity_document(_signed_identity(body, fr()))


def test_tampered_identity_document_is_refused() -> None:
    wire = _identity(fr())
    document = b64d(wire["document"]).replace(b"https://node.example", b"https://evil.example")
    with pytest.raises(IdentityError):
        parse_identity_document({"document": b64e(document), "signature": wire["signature"]})


def test_tampered_identity_signature_is_refused() -> None:
    wire = _identity(fr())
    signature = b64e(flip(b64d(wire["signature"]), 10))
    with pytest.raises(IdentityError):
        parse_identity_document({"document": wire["document"], "signature": signature})


def test_identity_signed_by_another_key_is_refused() -> None:
    with pytest.raises(IdentityError):
        parse_identity_document(_signed_identity(_identity_body(fr()), it()))


def test_identity_signed_for_another_domain_is_refused() -> None:
    wire = _identity(fr())
    document = b64d(wire["document"])
    crossed = b64e(sign(fr().keys.signing, DOMAIN_RECEIPT, document))
    with pytest.raises(IdentityError):
        parse_identity_document({"document": wire["document"], "signature": crossed})


@pytest.mark.parametrize("purpose", ["signing", "encryption", "log"])
def test_identity_with_mismatching_key_id_is_refused(purpose: str) -> None:
    body = _identity_body(fr())
    body["keys"][purpose]["kid"] = it().keys.signing_kid
    with pytest.raises(IdentityError, match="key id"):
        parse_identity_document(_signed_identity(body, fr()))


@pytest.mark.parametrize(
    "edit",
    [
        _set("v", 2),
        _set("type", "entraide.receipt"),
        _set("authority_id", "france"),
        _set("authority_id", "FR/MJ\n"),
        _set("authority_id", None),
        _set("name", None),
        _set("issued_at", "2025-01-01"),
        _set("keys", []),
        _set("keys.log", _DROP),
        _set("keys.encryption.public_key", "AAAA"),
    ],
)
def test_validly_signed_but_malformed_identity_is_refused(
    edit: Callable[[dict[str, Any]], None],
) -> None:
    body = _identity_body(fr())
    edit(body)
    with pytest.raises(IdentityError):
        parse_identity_document(_signed_identity(body, fr()))


@pytest.mark.parametrize(
    "wire",
    [
        None,
        "document",
        {"document": "e30="},
        {"document": "e30=", "signature": b64e(bytes(64)), "extra": ""},
        {"document": "%%%", "signature": b64e(bytes(64))},
        {"document": "e30=", "signature": b64e(bytes(12))},
        {"document": b64e(b" " * 20_000), "signature": b64e(bytes(64))},
        {"document": b64e(b"[1]"), "signature": b64e(bytes(64))},
    ],
)
def test_malformed_identity_wire(wire: object) -> None:
    with pytest.raises(IdentityError):
        parse_identity_document(wire)


@pytest.mark.parametrize(
    ("sha256", "valid"),
    [("ab" * 32, True), ("AB" * 32, False), ("ab" * 31, False), ("é" * 64, False)],
)
def test_a_manifest_entry_spells_its_hash_in_lowercase_hex(sha256: str, valid: bool) -> None:
    """A streamed part's plaintext hash is compared with hmac.compare_digest, which raises
    (a 500) on text that is not ASCII: the manifest is refused at announcement instead."""
    from app.crypto.envelope import _valid_attachment_entry

    entry = {"index": 1, "name": "a.txt", "media_type": "text/plain", "size": 1, "sha256": sha256}
    assert _valid_attachment_entry(entry, 1) is valid


# --- the manifest's member set (§6.2, §9 step 29) ------------------------------------------


def _with(**members: Any) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: manifest.update(members)


def _without(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: manifest.pop(name)


@pytest.mark.parametrize(
    "change",
    [
        _with(note="HIDDEN-NOTE"),  # a member no reader is shown, yet receipted (from review)
        _with(Content={"kind": "request"}),
        _without("in_reply_to"),  # read as null before: the manifest must say it
        _without("content"),
        _without("attachments"),
        _without("v"),
    ],
    ids=["extra", "extra-capitalised", "no-in_reply_to", "no-content", "no-attachments", "no-v"],
)
def test_a_manifest_with_other_members_than_v1s_is_manifest_mismatch(
    change: Callable[[dict[str, Any]], None],
) -> None:
    forged = reseal_manifest(seal(), fr().keys, change)
    assert refusal(forged) == "manifest_mismatch"
    header = env.parse_header(forged.header, len(forged.parts))
    content_key = content_key_of(forged, de())
    with pytest.raises(env.EnvelopeError) as caught:  # a streamed envelope's part 0 alone
        env.open_manifest_part(header, forged.parts[0], content_key)
    assert caught.value.code == "manifest_mismatch"
    assert "HIDDEN" not in caught.value.detail


def test_a_resealed_manifest_with_v1s_members_is_received() -> None:
    """The forgery helper itself changes nothing else: the refusals above are the members'."""
    forged = reseal_manifest(seal(), fr().keys, _with(in_reply_to=None))
    _, opened = receive(forged.to_wire(), de(), fr().keys.signing_public)
    assert opened.manifest.keys() == env.MANIFEST_FIELDS


def test_a_stored_envelope_is_reopened_whatever_its_manifests_members() -> None:
    """One a receiver accepted before it checked the member set stays readable to its
    officer: reported as storage altered, it would be lost (env.bind_manifest)."""
    forged = reseal_manifest(seal(), fr().keys, _with(note="accepted earlier"))
    _, opened = env.open_envelope(forged, de().keys)
    assert opened.manifest["note"] == "accepted earlier"
    header = env.parse_header(forged.header, len(forged.parts))
    content_key = content_key_of(forged, de())
    manifest = env.open_manifest_part(header, forged.parts[0], content_key, stored=True)
    assert manifest["note"] == "accepted earlier"

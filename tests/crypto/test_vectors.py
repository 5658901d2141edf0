"""Protocol v1 test vectors (tests/vectors/envelope-v1.json, docs/protocol.md §12).

Two halves. The first shows that app.crypto reproduces every vector byte for byte. The second
opens the vectors with raw libsodium calls (nacl.bindings, nacl.hash) and constants copied
from docs/protocol.md, never through app.crypto, to show the document is enough to build a
compatible node. It also rebuilds secretstream from ChaCha20 and Poly1305, the way
docs/protocol.md §6.4 describes it, for implementers whose library lacks it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import re
import struct
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.bindings as sodium
import pytest
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey

from app.crypto import envelope as env
from app.crypto.encoding import b64d
from app.crypto.identity import build_identity_document, parse_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, format_fingerprint
from app.crypto.part_put import sign_part_put
from app.crypto.randomness import SeededRandomness
from app.crypto.receipts import decode_receipt, issue_receipt, verify_receipt

ROOT = Path(__file__).parents[2]
VECTORS_FILE = ROOT / "tests" / "vectors" / "envelope-v1.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
NODES: dict[str, Any] = VECTORS["nodes"]
CASES: list[dict[str, Any]] = VECTORS["cases"]

# Constants as docs/protocol.md spells them, deliberately not imported from app.crypto.
DOMAIN_ENVELOPE = b"entraide/v1/envelope-header\x00"
DOMAIN_RECEIPT = b"entraide/v1/receipt\x00"
DOMAIN_IDENTITY = b"entraide/v1/node-identity\x00"
DOMAIN_PART_PUT = b"entraide/v1/part-put\x00"
PERSON_PART_KEY = b"entraide:part:v1"
PERSON_COMMITMENT = b"entraide:comm:v1"
PERSON_RANDOMNESS = b"entraide:rand:v1"
COMMITMENT_LABEL = b"entraide/v1/key-commitment"
CHUNK_BYTES = 1048576
ABYTES = 17
TAG_MESSAGE = 0
TAG_FINAL = 3


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def plaintext_of(described: dict[str, Any]) -> bytes:
    if "b64" in described:
        data = b64(described["b64"])
    else:
        assert described["generator"] == "bytes(i % 251 for i in range(size))"
        data = (bytes(range(251)) * (described["size"] // 251 + 1))[: described["size"]]
    assert len(data) == described["size"]
    assert hashlib.sha256(data).hexdigest() == described["sha256_hex"]
    return data


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def keys_of(name: str) -> NodeKeys:
    node = NODES[name]
    return NodeKeys(
        signing=SigningKey(bytes.fromhex(node["signing"]["seed_hex"])),
        encryption=PrivateKey(bytes.fromhex(node["encryption"]["secret_key_hex"])),
        log=SigningKey(bytes.fromhex(node["log"]["seed_hex"])),
    )


@pytest.fixture(params=CASES, ids=[case["name"] for case in CASES])
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    value: dict[str, Any] = request.param
    return value


@pytest.fixture(params=sorted(NODES))
def node_name(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def test_constants_are_those_of_the_document() -> None:
    constants = VECTORS["constants"]
    assert bytes.fromhex(constants["domain_envelope_hex"]) == DOMAIN_ENVELOPE
    assert bytes.fromhex(constants["domain_receipt_hex"]) == DOMAIN_RECEIPT
    assert bytes.fromhex(constants["domain_identity_hex"]) == DOMAIN_IDENTITY
    assert bytes.fromhex(constants["domain_part_put_hex"]) == DOMAIN_PART_PUT
    assert bytes.fromhex(constants["person_part_key_hex"]) == PERSON_PART_KEY
    assert bytes.fromhex(constants["person_commitment_hex"]) == PERSON_COMMITMENT
    assert bytes.fromhex(constants["person_randomness_hex"]) == PERSON_RANDOMNESS
    assert bytes.fromhex(constants["commitment_label_hex"]) == COMMITMENT_LABEL
    assert constants["chunk_bytes"] == CHUNK_BYTES == env.CHUNK_BYTES
    assert constants["secretstream_abytes"] == ABYTES == env.ABYTES
    assert (constants["tag_message"], constants["tag_final"]) == (TAG_MESSAGE, TAG_FINAL)
    assert constants["wrap_bytes"] == 80


def test_vectors_file_is_what_the_generator_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    path = VECTORS_FILE.with_name("generate.py")
    spec = importlib.util.spec_from_file_location("vectors_generate", path)
    assert spec is not None
    assert spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    # Its dataclasses resolve their annotations through sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, generate)
    spec.loader.exec_module(generate)
    assert generate.build_vectors() == VECTORS


def test_a_part_puts_signature_is_built_from_the_document(case: dict[str, Any]) -> None:
    """Section 8.5: what the sender of a streamed part signs, and the code signs the same
    (Ed25519 signatures are deterministic)."""
    sender = case["inputs"]["sender"]
    public = bytes.fromhex(NODES[sender]["signing"]["public_key_hex"])
    puts = case["part_puts"]
    assert [put["index"] for put in puts] == [part["index"] for part in case["parts"][1:]]
    for put in puts:
        data = f"{case['envelope_hash_hex']}/{put['index']}/{put['offset']}".encode("ascii")
        assert data.decode("ascii") == put["data_text"]
        message = DOMAIN_PART_PUT + sha256(data)
        assert message.hex() == put["signature_message_hex"]
        sodium.crypto_sign_open(b64(put["signature_b64"]) + message, public)
        made = sign_part_put(
            keys_of(sender).signing, case["envelope_hash_hex"], put["index"], put["offset"]
        )
        assert made == put["signature_b64"]


def test_values_quoted_in_the_document_are_those_of_the_vectors() -> None:
    document = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    vectors = VECTORS_FILE.read_text(encoding="utf-8")
    quoted = re.findall(r"\b[0-9a-f]{32,}\b", document)
    quoted += re.findall(r'"([A-Za-z0-9+/]{16,}={0,2})"', document)
    assert len(quoted) > 10
    assert [value for value in quoted if value not in vectors] == []


# --- the code reproduces the vectors ----------------------------------------------------------


def test_code_reproduces_node_keys(node_name: str) -> None:
    node, keys = NODES[node_name], keys_of(node_name)
    assert keys.signing_public.hex() == node["signing"]["public_key_hex"]
    assert keys.encryption_public.hex() == node["encryption"]["public_key_hex"]
    assert keys.log_public.hex() == node["log"]["public_key_hex"]
    assert keys.signing_kid == node["signing"]["kid"]
    assert keys.encryption_kid == node["encryption"]["kid"]
    assert keys.log_kid == node["log"]["kid"]
    assert keys.fingerprint == node["fingerprint_hex"]
    assert format_fingerprint(keys.fingerprint) == node["fingerprint_display"]


def test_code_reproduces_identity_document(node_name: str) -> None:
    node = NODES[node_name]
    identity = NodeIdentity(node["authority_id"], node["name"], node["public_url"])
    wire = build_identity_document(
        identity, keys_of(node_name), issued_at=parse_time(node["identity"]["issued_at"])
    )
    assert wire == node["identity"]["wire"]
    assert b64d(wire["document"]) == node["identity"]["document_text"].encode("utf-8")
    parsed = parse_identity_document(wire)
    assert parsed.authority_id == node["authority_id"]
    assert parsed.fingerprint == node["fingerprint_hex"]


def test_code_reproduces_seeded_randomness(case: dict[str, Any]) -> None:
    randomness = SeededRandomness(bytes.fromhex(case["inputs"]["randomness_seed_hex"]))
    for draw in case["randomness_draws"]:
        if draw["method"] == "token":
            assert randomness.token(draw["size"]).hex() == draw["output_hex"]
        elif draw["method"] == "stream_header":
            assert (randomness.stream_header() or b"").hex() == draw["output_hex"]
        else:
            key = randomness.ephemeral_key()
            assert key is not None
            assert key == PrivateKey.from_seed(bytes.fromhex(draw["output_hex"]))


def seal_case(case: dict[str, Any]) -> env.WireEnvelope:
    inputs = case["inputs"]
    recipient = NODES[inputs["recipient"]]
    return env.seal(
        sender_keys=keys_of(inputs["sender"]),
        sender_authority=NODES[inputs["sender"]]["authority_id"],
        recipient=env.Recipient(
            recipient["authority_id"], bytes.fromhex(recipient["encryption"]["public_key_hex"])
        ),
        content=inputs["content"],
        attachments=[
            env.Attachment(item["name"], item["media_type"], plaintext_of(item))
            for item in inputs["attachments"]
        ],
        conversation_id=inputs["conversation_id"],
        in_reply_to=inputs["in_reply_to"],
        created_at=parse_time(inputs["created_at"]),
        ttl=timedelta(seconds=inputs["ttl_seconds"]),
        randomness=SeededRandomness(bytes.fromhex(inputs["randomness_seed_hex"])),
    )


def test_code_reproduces_envelope(case: dict[str, Any]) -> None:
    sealed = seal_case(case)
    assert sealed.header == b64(case["header_b64"]) == case["header_text"].encode("utf-8")
    assert sealed.signature == b64(case["signature_b64"])
    assert sealed.envelope_hash == case["envelope_hash_hex"]
    assert len(sealed.parts) == len(case["parts"])
    for cipher, part in zip(sealed.parts, case["parts"], strict=True):
        assert len(cipher) == part["length"]
        assert hashlib.sha256(cipher).hexdigest() == part["sha256_hex"]
        if "ciphertext_b64" in part:
            assert cipher == b64(part["ciphertext_b64"])
    if case["wire"] is not None:
        assert sealed.to_wire() == case["wire"]


def test_code_opens_vector_for_both_wraps(case: dict[str, Any]) -> None:
    sealed = seal_case(case)
    inputs = case["inputs"]
    for reader in (inputs["recipient"], inputs["sender"]):
        header, opened = env.open_envelope(sealed, keys_of(reader))
        assert header.msg_id == case["msg_id"]
        assert canonical_bytes(opened.manifest) == case["manifest_text"].encode("utf-8")
        expected = [plaintext_of(item) for item in inputs["attachments"]]
        assert opened.attachments == expected


def canonical_bytes(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_code_reproduces_receipt(case: dict[str, Any]) -> None:
    vector = case["receipt"]
    signer = keys_of(vector["signer"])
    inputs = case["inputs"]
    sender, recipient = NODES[inputs["sender"]], NODES[inputs["recipient"]]
    signed = issue_receipt(
        signer.signing,
        signer_kid=signer.signing_kid,
        msg_id=case["msg_id"],
        envelope_hash=case["envelope_hash_hex"],
        from_authority=sender["authority_id"],
        to_authority=recipient["authority_id"],
        received_at=parse_time(vector["received_at"]),
        checkpoint=vector["checkpoint"],
    )
    assert signed.to_wire() == vector["wire"]
    assert signed.body == vector["body_text"].encode("utf-8")
    receipt = verify_receipt(
        decode_receipt(vector["wire"]),
        signer_public=signer.signing_public,
        msg_id=case["msg_id"],
        envelope_hash=case["envelope_hash_hex"],
        from_authority=sender["authority_id"],
        to_authority=recipient["authority_id"],
    )
    assert receipt.checkpoint == vector["checkpoint"]


# --- raw libsodium, from the document alone ---------------------------------------------------


def test_raw_node_keys_and_ids(node_name: str) -> None:
    node = NODES[node_name]
    signing_public, _ = sodium.crypto_sign_seed_keypair(bytes.fromhex(node["signing"]["seed_hex"]))
    log_public, _ = sodium.crypto_sign_seed_keypair(bytes.fromhex(node["log"]["seed_hex"]))
    encryption_public = sodium.crypto_scalarmult_base(
        bytes.fromhex(node["encryption"]["secret_key_hex"])
    )
    for purpose, public in (
        ("signing", signing_public),
        ("encryption", encryption_public),
        ("log", log_public),
    ):
        assert public.hex() == node[purpose]["public_key_hex"]
        assert sha256(public)[:16].hex() == node[purpose]["kid"]
    fingerprint = sha256(signing_public).hex()
    assert fingerprint == node["fingerprint_hex"]
    groups = [fingerprint[i : i + 4].upper() for i in range(0, 64, 4)]
    assert " ".join(groups) == node["fingerprint_display"]


def test_raw_identity_document(node_name: str) -> None:
    node = NODES[node_name]
    wire = node["identity"]["wire"]
    assert set(wire) == {"document", "signature"}
    document, signature = b64(wire["document"]), b64(wire["signature"])
    body = json.loads(document)
    assert canonical_bytes(body) == document
    assert (body["v"], body["type"]) == (1, "entraide.node-identity")
    assert set(body) == {"v", "type", "authority_id", "name", "public_url", "issued_at", "keys"}
    signing_public = b64(body["keys"]["signing"]["public_key"])
    message = DOMAIN_IDENTITY + sha256(document)
    assert message.hex() == node["identity"]["signature_message_hex"]
    assert sodium.crypto_sign_open(signature + message, signing_public) == message
    assert sha256(signing_public).hex() == node["fingerprint_hex"]  # the pin
    for purpose in ("signing", "encryption", "log"):
        entry = body["keys"][purpose]
        assert entry["kid"] == sha256(b64(entry["public_key"]))[:16].hex()


def test_raw_seeded_randomness(case: dict[str, Any]) -> None:
    seed = bytes.fromhex(case["inputs"]["randomness_seed_hex"])
    assert seed == case["inputs"]["randomness_seed_text"].encode("ascii")
    for number, draw in enumerate(case["randomness_draws"], start=1):
        assert draw["counter"] == number
        output = blake2b(
            number.to_bytes(8, "big"),
            digest_size=draw["size"],
            key=seed,
            person=PERSON_RANDOMNESS,
            encoder=RawEncoder,
        )
        assert output.hex() == draw["output_hex"]


def test_raw_key_wraps(case: dict[str, Any]) -> None:
    content_key = bytes.fromhex(case["content_key_hex"])
    header = json.loads(b64(case["header_b64"]))
    assert [wrap["wrap_b64"] for wrap in case["wraps"]] == [w["wrap"] for w in header["wraps"]]
    for wrap in case["wraps"]:
        wrapped = b64(wrap["wrap_b64"])
        assert len(wrapped) == 80
        ephemeral_secret = hashlib.sha512(bytes.fromhex(wrap["ephemeral_seed_hex"])).digest()[:32]
        assert ephemeral_secret.hex() == wrap["ephemeral_secret_hex"]
        epk = sodium.crypto_scalarmult_base(ephemeral_secret)
        assert epk.hex() == wrap["ephemeral_public_hex"] == wrapped[:32].hex()
        public = bytes.fromhex(wrap["public_key_hex"])
        assert sha256(public)[:16].hex() == wrap["kid"]
        nonce = blake2b(epk + public, digest_size=24, encoder=RawEncoder)
        assert nonce.hex() == wrap["nonce_hex"]
        # crypto_box_seal = epk || crypto_box_easy(K, nonce, pk, esk); PyNaCl's crypto_box
        # returns the same MAC || ciphertext layout as crypto_box_easy.
        assert sodium.crypto_box(content_key, nonce, public, ephemeral_secret) == wrapped[32:]
    recipient, sender = case["inputs"]["recipient"], case["inputs"]["sender"]
    for reader, wrap in zip((recipient, sender), case["wraps"], strict=True):
        secret = bytes.fromhex(NODES[reader]["encryption"]["secret_key_hex"])
        wrapped = b64(wrap["wrap_b64"])
        assert bytes(SealedBox(PrivateKey(secret)).decrypt(wrapped)) == content_key
        nonce = bytes.fromhex(wrap["nonce_hex"])
        opened = sodium.crypto_box_open(wrapped[32:], nonce, wrapped[:32], secret)
        assert opened == content_key


def raw_secretstream_pull(ciphertext: bytes, key: bytes, ad: bytes, stream_header: bytes) -> bytes:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, stream_header, key)
    out, offset = [], 0
    while True:
        chunk = ciphertext[offset : offset + CHUNK_BYTES + ABYTES]
        assert len(chunk) >= ABYTES, "truncated_part"
        offset += len(chunk)
        message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, chunk, ad)
        out.append(message)
        if tag == TAG_FINAL:
            assert offset == len(ciphertext), "decrypt_failed: data after the final chunk"
            return b"".join(out)
        assert tag == TAG_MESSAGE, "decrypt_failed: unexpected tag"
        assert offset < len(ciphertext), "truncated_part"


def receive_raw(case: dict[str, Any], reader: str) -> list[bytes]:
    """Every receiver step of docs/protocol.md §9, with raw libsodium, for one vector."""
    inputs = case["inputs"]
    sender, me = NODES[inputs["sender"]], NODES[reader]
    wire = case["wire"]
    if wire is None:  # large vectors store parts by hash only: rebuild them from the code
        wire = seal_case(case).to_wire()
    assert set(wire) == {"v", "header", "signature", "parts"}
    assert wire["v"] == 1
    header_bytes, signature = b64(wire["header"]), b64(wire["signature"])
    parts = [b64(part) for part in wire["parts"]]
    header = json.loads(header_bytes)
    # The signature covers the received bytes: nothing is re-serialised to verify it...
    assert header["from"]["sig_kid"] == sender["signing"]["kid"]
    message = DOMAIN_ENVELOPE + sha256(header_bytes)
    assert message.hex() == case["signature_message_hex"]
    sodium.crypto_sign_open(signature + message, bytes.fromhex(sender["signing"]["public_key_hex"]))
    # ...but a conforming sender produces canonical JSON, which a verifier may rely on.
    assert canonical_bytes(header) == header_bytes
    assert hashlib.sha256(header_bytes).hexdigest() == case["envelope_hash_hex"]
    msg_id = bytes.fromhex(header["msg_id"])
    # Unwrap the content key from this reader's wrap.
    wrap = next(w for w in header["wraps"] if w["kid"] == me["encryption"]["kid"])
    secret = bytes.fromhex(me["encryption"]["secret_key_hex"])
    content_key = sodium.crypto_box_seal_open(
        b64(wrap["wrap"]), sodium.crypto_scalarmult_base(secret), secret
    )
    assert content_key.hex() == case["content_key_hex"]
    commitment = blake2b(
        COMMITMENT_LABEL + msg_id,
        digest_size=32,
        key=content_key,
        person=PERSON_COMMITMENT,
        encoder=RawEncoder,
    )
    assert commitment == b64(header["commitment"])
    plaintexts = []
    for index, (info, data) in enumerate(zip(header["parts"], parts, strict=True)):
        assert info["index"] == index
        assert len(data) == info["length"]
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        ad = msg_id + struct.pack(">I", index)
        part_key = blake2b(
            ad, digest_size=32, key=content_key, person=PERSON_PART_KEY, encoder=RawEncoder
        )
        assert part_key.hex() == case["parts"][index]["key_hex"]
        assert ad.hex() == case["parts"][index]["ad_hex"]
        plaintexts.append(raw_secretstream_pull(data, part_key, ad, b64(info["stream_header"])))
    manifest = json.loads(plaintexts[0])
    assert plaintexts[0] == case["manifest_text"].encode("utf-8")
    assert (manifest["v"], manifest["type"]) == (1, "entraide.manifest")
    assert manifest["msg_id"] == header["msg_id"]
    assert manifest["from"] == header["from"]["authority"] == sender["authority_id"]
    assert manifest["to"] == header["to"]["authority"]
    assert manifest["conversation_id"] == header["conversation_id"]
    assert manifest["in_reply_to"] == header["in_reply_to"]
    assert len(manifest["attachments"]) == len(plaintexts) - 1
    for number, (entry, data) in enumerate(
        zip(manifest["attachments"], plaintexts[1:], strict=True), 1
    ):
        assert entry["index"] == number
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    return plaintexts


def test_raw_receiver_opens_vector(case: dict[str, Any]) -> None:
    inputs = case["inputs"]
    expected = [plaintext_of(item) for item in inputs["attachments"]]
    for reader in (inputs["recipient"], inputs["sender"]):
        plaintexts = receive_raw(case, reader)
        assert plaintexts[1:] == expected


def test_raw_header_layout(case: dict[str, Any]) -> None:
    header = json.loads(b64(case["header_b64"]))
    inputs = case["inputs"]
    sender, recipient = NODES[inputs["sender"]], NODES[inputs["recipient"]]
    assert header["v"] == 1
    assert header["type"] == "entraide.envelope"
    assert header["msg_id"] == case["msg_id"] == case["randomness_draws"][0]["output_hex"]
    assert header["created_at"] == inputs["created_at"]
    expires = parse_time(inputs["created_at"]) + timedelta(seconds=inputs["ttl_seconds"])
    assert header["expires_at"] == expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert header["from"] == {
        "authority": sender["authority_id"],
        "sig_kid": sender["signing"]["kid"],
        "enc_kid": sender["encryption"]["kid"],
    }
    assert header["to"] == {
        "authority": recipient["authority_id"],
        "enc_kid": recipient["encryption"]["kid"],
    }
    assert header["conversation_id"] == (inputs["conversation_id"] or case["msg_id"])
    assert header["in_reply_to"] == inputs["in_reply_to"]
    assert [wrap["kid"] for wrap in header["wraps"]] == [
        recipient["encryption"]["kid"],
        sender["encryption"]["kid"],
    ]
    assert header["chunk_bytes"] == CHUNK_BYTES
    assert len(header["parts"]) == len(inputs["attachments"]) + 1
    for info, part in zip(header["parts"], case["parts"], strict=True):
        assert info["stream_header"] == part["stream_header_b64"]
        assert (
            info["length"] == part["length"] == sum(c["ciphertext_length"] for c in part["chunks"])
        )
        plain = part["plaintext"]["size"]
        assert info["length"] == plain + ABYTES * max(1, -(-plain // CHUNK_BYTES))
    draws = case["randomness_draws"]
    assert draws[1]["output_hex"] == case["content_key_hex"]
    for index, part in enumerate(case["parts"]):
        assert draws[2 + index]["output_hex"] == b64(part["stream_header_b64"]).hex()


def test_raw_receipt(case: dict[str, Any]) -> None:
    vector = case["receipt"]
    signer = NODES[vector["signer"]]
    wire = vector["wire"]
    assert set(wire) == {"receipt", "signature"}
    body_bytes, signature = b64(wire["receipt"]), b64(wire["signature"])
    message = DOMAIN_RECEIPT + sha256(body_bytes)
    assert message.hex() == vector["signature_message_hex"]
    public = bytes.fromhex(signer["signing"]["public_key_hex"])
    sodium.crypto_sign_open(signature + message, public)
    body = json.loads(body_bytes)
    assert canonical_bytes(body) == body_bytes == vector["body_text"].encode("utf-8")
    inputs = case["inputs"]
    assert body == {
        "v": 1,
        "type": "entraide.receipt",
        "msg_id": case["msg_id"],
        "envelope_hash": case["envelope_hash_hex"],
        "from": NODES[inputs["sender"]]["authority_id"],
        "to": NODES[inputs["recipient"]]["authority_id"],
        "received_at": vector["received_at"],
        "status": "accepted",
        "signer_kid": signer["signing"]["kid"],
        "checkpoint": vector["checkpoint"],
    }
    assert vector["signer"] == inputs["recipient"]
    if vector["checkpoint"] is not None:
        check_checkpoint_note(vector["checkpoint"], signer)


def check_checkpoint_note(note: str, signer: dict[str, Any]) -> None:
    """A c2sp.org/tlog-checkpoint in a c2sp.org/signed-note, signed with the log key."""
    text, _, signatures = note.partition("\n\n")
    text += "\n"
    origin, size, root = text.splitlines()
    assert origin == f"entraide.log/{signer['authority_id']}"
    assert (size, b64(root)) == ("0", sha256(b""))  # the RFC 6962 root of an empty tree
    [line] = signatures.splitlines()
    prefix, name, blob_b64 = line.split(" ")
    assert (prefix, name) == ("\u2014", origin)
    blob = b64(blob_b64)
    log_public = bytes.fromhex(signer["log"]["public_key_hex"])
    assert blob[:4] == sha256(name.encode() + b"\n\x01" + log_public)[:4]
    sodium.crypto_sign_open(blob[4:] + text.encode(), log_public)


# --- secretstream from ChaCha20 and Poly1305 (docs/protocol.md §6.4) ----------------------

MASK = 0xFFFFFFFF
SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)


def _rotl(value: int, count: int) -> int:
    return ((value << count) & MASK) | (value >> (32 - count))


def _quarter_round(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & MASK
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & MASK
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotl(s[b] ^ s[c], 7)


def _rounds(state: list[int]) -> list[int]:
    working = list(state)
    for _ in range(10):
        _quarter_round(working, 0, 4, 8, 12)
        _quarter_round(working, 1, 5, 9, 13)
        _quarter_round(working, 2, 6, 10, 14)
        _quarter_round(working, 3, 7, 11, 15)
        _quarter_round(working, 0, 5, 10, 15)
        _quarter_round(working, 1, 6, 11, 12)
        _quarter_round(working, 2, 7, 8, 13)
        _quarter_round(working, 3, 4, 9, 14)
    return working


def hchacha20(key: bytes, nonce: bytes) -> bytes:
    working = _rounds([*SIGMA, *struct.unpack("<8I", key), *struct.unpack("<4I", nonce)])
    return struct.pack("<8I", *working[0:4], *working[12:16])


def chacha20_ietf_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    """RFC 8439 §2.3: one 64-byte ChaCha20 block (32-bit counter, 96-bit nonce)."""
    state = [*SIGMA, *struct.unpack("<8I", key), counter, *struct.unpack("<3I", nonce)]
    working = _rounds(state)
    return struct.pack("<16I", *((w + s) & MASK for w, s in zip(working, state, strict=True)))


def poly1305(key: bytes, message: bytes) -> bytes:
    """RFC 8439 §2.5."""
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    p = (1 << 130) - 5
    acc = 0
    for offset in range(0, len(message), 16):
        block = message[offset : offset + 16] + b"\x01"
        acc = ((acc + int.from_bytes(block, "little")) * r) % p
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def xor(left: bytes, right: bytes) -> bytes:
    return (int.from_bytes(left, "big") ^ int.from_bytes(right, "big")).to_bytes(len(left), "big")


class PrimitiveStream:
    """crypto_secretstream_xchacha20poly1305 rebuilt as docs/protocol.md §6.4 describes it."""

    def __init__(self, key: bytes, stream_header: bytes) -> None:
        self.key = hchacha20(key, stream_header[:16])
        self.counter = 1
        self.inonce = stream_header[16:24]

    def _seal(self, tag: int, ad: bytes, keystream: bytes, cipher: bytes) -> tuple[bytes, bytes]:
        nonce = struct.pack("<I", self.counter) + self.inonce
        poly_key = chacha20_ietf_block(self.key, 0, nonce)[:32]
        block = xor(bytes([tag]) + bytes(63), keystream[:64])
        size = len(cipher)
        mac = poly1305(
            poly_key,
            ad
            + bytes(-len(ad) % 16)
            + block
            + cipher
            + bytes(size % 16)  # libsodium's quirk: (16 - 64 + size) & 15, not -size % 16
            + struct.pack("<QQ", len(ad), 64 + size),
        )
        return block[:1] + cipher + mac, mac

    def _keystream(self, size: int) -> bytes:
        # ChaCha20 blocks 1, 2, ...: what the IETF AEAD XORs with its plaintext.
        nonce = struct.pack("<I", self.counter) + self.inonce
        stream = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            bytes(64 + size), None, nonce, self.key
        )[:-16]
        assert stream[:64] == chacha20_ietf_block(self.key, 1, nonce)
        return stream

    def _advance(self, mac: bytes) -> None:
        self.inonce = xor(self.inonce, mac[:8])
        self.counter += 1  # a tag with the REKEY bit (FINAL has it) rekeys after the chunk

    def push(self, message: bytes, ad: bytes, tag: int) -> bytes:
        keystream = self._keystream(len(message))
        chunk, mac = self._seal(tag, ad, keystream, xor(message, keystream[64:]))
        self._advance(mac)
        return chunk

    def pull(self, chunk: bytes, ad: bytes) -> tuple[bytes, int]:
        cipher = chunk[1:-16]
        keystream = self._keystream(len(cipher))
        tag = chunk[0] ^ keystream[0]
        expected, mac = self._seal(tag, ad, keystream, cipher)
        assert hmac.compare_digest(expected, chunk), "decrypt_failed"
        self._advance(mac)
        return xor(cipher, keystream[64:]), tag


def test_hchacha20_matches_the_xchacha_draft() -> None:
    # draft-irtf-cfrg-xchacha-03 §2.2.1.
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert hchacha20(key, nonce).hex() == expected


def test_secretstream_from_primitives(case: dict[str, Any]) -> None:
    sealed = seal_case(case) if case["wire"] is None else None
    for index, part in enumerate(case["parts"]):
        key, ad = bytes.fromhex(part["key_hex"]), bytes.fromhex(part["ad_hex"])
        stream_header = b64(part["stream_header_b64"])
        plain = plaintext_of(part["plaintext"])
        cipher = b64(part["ciphertext_b64"]) if sealed is None else sealed.parts[index]
        pusher, puller = PrimitiveStream(key, stream_header), PrimitiveStream(key, stream_header)
        for chunk in part["chunks"]:
            start = chunk["plaintext_offset"]
            message = plain[start : start + chunk["plaintext_length"]]
            produced = pusher.push(message, ad, chunk["tag"])
            offset = chunk["ciphertext_offset"]
            assert produced == cipher[offset : offset + chunk["ciphertext_length"]]
            assert hashlib.sha256(produced).hexdigest() == chunk["ciphertext_sha256_hex"]
            assert produced[:1].hex() == chunk["encrypted_tag_hex"]
            assert produced[-16:] == b64(chunk["mac_b64"])
            if "ciphertext_b64" in chunk:
                assert produced == b64(chunk["ciphertext_b64"])
            assert puller.pull(produced, ad) == (message, chunk["tag"])

"""Generate tests/vectors/envelope-v1.json, the protocol v1 test vectors (docs/protocol.md §12).

Run from the repository root:

    .venv/bin/python tests/vectors/generate.py

Everything is fixed: node keys are constant byte strings, the envelope's randomness comes
from `SeededRandomness`, and every time is a constant. Running the script twice writes the
same file; `tests/crypto/test_vectors.py` checks that the code still reproduces it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.audit.checkpoints import log_origin
from app.audit.note import Checkpoint, sign_note
from app.crypto import envelope as env
from app.crypto.encoding import b64d, b64e, format_time, sha256, sha256_hex
from app.crypto.identity import build_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, format_fingerprint
from app.crypto.part_put import part_put_data, sign_part_put
from app.crypto.randomness import SeededRandomness
from app.crypto.receipts import issue_receipt
from app.crypto.rotation import make_rotation
from app.crypto.signing import (
    DOMAIN_ENVELOPE,
    DOMAIN_IDENTITY,
    DOMAIN_PART_PUT,
    DOMAIN_RECEIPT,
    DOMAIN_ROTATION,
)

OUTPUT = Path(__file__).with_name("envelope-v1.json")

# Parts up to this size are stored in full; larger ones by SHA-256 and a generator.
INLINE_LIMIT = 4096
GENERATOR = "bytes(i % 251 for i in range(size))"

NODES: dict[str, dict[str, Any]] = {
    "FR": {
        "authority_id": "FR/MJ-BEPI",
        "name": "Ministère de la Justice — Bureau de l'entraide pénale internationale",
        "public_url": "https://fr.entraide.example",
        "signing_seed": bytes(range(0, 32)),
        "encryption_secret": bytes(range(32, 64)),
        "log_seed": bytes(range(64, 96)),
        "issued_at": datetime(2025, 1, 1, tzinfo=UTC),
    },
    "DE": {
        "authority_id": "DE/BFJ",
        "name": "Bundesamt für Justiz",
        "public_url": "https://de.entraide.example",
        "signing_seed": bytes(range(96, 128)),
        "encryption_secret": bytes(range(128, 160)),
        "log_seed": bytes(range(160, 192)),
        "issued_at": datetime(2025, 1, 2, tzinfo=UTC),
    },
}


def generated(size: int) -> bytes:
    """`bytes(i % 251 for i in range(size))`, built without a million-step loop."""
    block = bytes(range(251))
    return (block * (size // 251 + 1))[:size]


def node_keys(name: str) -> NodeKeys:
    node = NODES[name]
    return NodeKeys(
        signing=SigningKey(node["signing_seed"]),
        encryption=PrivateKey(node["encryption_secret"]),
        log=SigningKey(node["log_seed"]),
    )


def empty_log_checkpoint(name: str) -> str:
    """A checkpoint of an empty audit log, signed with the node's log key (a signed note)."""
    origin = log_origin(NODES[name]["authority_id"])
    body = Checkpoint(origin=origin, size=0, root_hash=sha256(b"")).format()
    return sign_note(body, origin, node_keys(name).log)


def node_identity(name: str) -> NodeIdentity:
    node = NODES[name]
    return NodeIdentity(node["authority_id"], node["name"], node["public_url"])


@dataclass
class Draw:
    counter: int
    size: int
    method: str
    output: bytes


class RecordingRandomness:
    """SeededRandomness, plus a record of each draw recomputed as docs/protocol.md says."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.inner = SeededRandomness(seed)
        self.draws: list[Draw] = []

    def _expected(self, size: int, method: str) -> bytes:
        counter = len(self.draws) + 1
        output = blake2b(
            counter.to_bytes(8, "big"),
            digest_size=size,
            key=self.seed,
            person=b"entraide:rand:v1",
            encoder=RawEncoder,
        )
        self.draws.append(Draw(counter, size, method, output))
        return output

    def token(self, size: int) -> bytes:
        value = self.inner.token(size)
        if value != self._expected(size, "token"):
            raise AssertionError("SeededRandomness.token differs from the documented PRF")
        return value

    def stream_header(self) -> bytes | None:
        value = self.inner.stream_header()
        if value != self._expected(24, "stream_header"):
            raise AssertionError("SeededRandomness.stream_header differs from the documented PRF")
        return value

    def ephemeral_key(self) -> PrivateKey | None:
        value = self.inner.ephemeral_key()
        seed = self._expected(32, "ephemeral_key")
        if value is None or bytes(value) != hashlib.sha512(seed).digest()[:32]:
            raise AssertionError("SeededRandomness.ephemeral_key differs from the documented PRF")
        return value


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    sender: str
    recipient: str
    seed: bytes
    created_at: datetime
    ttl: timedelta
    received_at: datetime
    content: dict[str, Any]
    attachments: list[env.Attachment]
    conversation_id: str | None = None
    in_reply_to: str | None = None
    checkpoint: str | None = None


def describe_node(name: str) -> dict[str, Any]:
    node, keys = NODES[name], node_keys(name)
    identity = build_identity_document(node_identity(name), keys, issued_at=node["issued_at"])
    document = b64d(identity["document"])
    return {
        "authority_id": node["authority_id"],
        "name": node["name"],
        "public_url": node["public_url"],
        "signing": {
            "seed_hex": node["signing_seed"].hex(),
            "public_key_hex": keys.signing_public.hex(),
            "kid": keys.signing_kid,
        },
        "encryption": {
            "secret_key_hex": node["encryption_secret"].hex(),
            "public_key_hex": keys.encryption_public.hex(),
            "kid": keys.encryption_kid,
        },
        "log": {
            "seed_hex": node["log_seed"].hex(),
            "public_key_hex": keys.log_public.hex(),
            "kid": keys.log_kid,
        },
        "fingerprint_hex": keys.fingerprint,
        "fingerprint_display": format_fingerprint(keys.fingerprint),
        "identity": {
            "issued_at": format_time(node["issued_at"]),
            "document_text": document.decode(),
            "document_sha256_hex": sha256_hex(document),
            "signature_message_hex": (DOMAIN_IDENTITY + sha256(document)).hex(),
            "wire": identity,
        },
    }


# FR's rotation (docs/protocol.md §5.4): new signing seed c0…df, new encryption secret e0…ff.
ROTATION = {
    "signing_seed": bytes(range(192, 224)),
    "encryption_secret": bytes(range(224, 256)),
    "rotated_at": datetime(2025, 6, 1, tzinfo=UTC),
    "accepted_until": datetime(2025, 7, 1, tzinfo=UTC),
}


def describe_rotation() -> dict[str, Any]:
    old = node_keys("FR")
    new_signing = SigningKey(ROTATION["signing_seed"])
    new_encryption = PrivateKey(ROTATION["encryption_secret"])
    rotation = make_rotation(
        authority_id=NODES["FR"]["authority_id"],
        seq=1,
        old_signing=old.signing,
        old_encryption=old.encryption,
        new_signing=new_signing,
        new_encryption=new_encryption,
        rotated_at=ROTATION["rotated_at"],
        accepted_until=ROTATION["accepted_until"],
    )
    keys = NodeKeys(new_signing, new_encryption, old.log, rotations=(rotation,))
    identity = build_identity_document(node_identity("FR"), keys, issued_at=ROTATION["rotated_at"])
    return {
        "node": "FR",
        "new_signing": {
            "seed_hex": ROTATION["signing_seed"].hex(),
            "public_key_hex": keys.signing_public.hex(),
            "kid": keys.signing_kid,
        },
        "new_encryption": {
            "secret_key_hex": ROTATION["encryption_secret"].hex(),
            "public_key_hex": keys.encryption_public.hex(),
            "kid": keys.encryption_kid,
        },
        "rotated_at": format_time(ROTATION["rotated_at"]),
        "old_encryption_accepted_until": format_time(ROTATION["accepted_until"]),
        "statement_text": rotation.statement.decode(),
        "signature_message_hex": (DOMAIN_ROTATION + sha256(rotation.statement)).hex(),
        "wire": rotation.to_wire(),
        "identity": {
            "issued_at": format_time(ROTATION["rotated_at"]),
            "document_text": b64d(identity["document"]).decode(),
            "wire": identity,
        },
    }


def describe_plaintext(data: bytes, *, generator: bool) -> dict[str, Any]:
    described: dict[str, Any] = {"size": len(data), "sha256_hex": sha256_hex(data)}
    if generator:
        described["generator"] = GENERATOR
    else:
        described["b64"] = b64e(data)
    return described


def describe_chunks(ciphertext: bytes, plaintext_size: int) -> list[dict[str, Any]]:
    """Where each chunk lies; a chunk's bytes are inlined only when its part's are not."""
    chunks = []
    count = max(1, -(-plaintext_size // env.CHUNK_BYTES))
    offset = 0
    for number in range(count):
        plain_length = min(env.CHUNK_BYTES, plaintext_size - number * env.CHUNK_BYTES)
        chunk = ciphertext[offset : offset + plain_length + env.ABYTES]
        entry: dict[str, Any] = {
            "plaintext_offset": number * env.CHUNK_BYTES,
            "plaintext_length": plain_length,
            "tag": env.TAG_FINAL if number == count - 1 else env.TAG_MESSAGE,
            "ciphertext_offset": offset,
            "ciphertext_length": len(chunk),
            "ciphertext_sha256_hex": sha256_hex(chunk),
            "encrypted_tag_hex": chunk[:1].hex(),
            "mac_b64": b64e(chunk[-16:]),
        }
        if len(chunk) <= INLINE_LIMIT < len(ciphertext):
            entry["ciphertext_b64"] = b64e(chunk)
        chunks.append(entry)
        offset += len(chunk)
    if offset != len(ciphertext):
        raise AssertionError("chunk layout does not cover the ciphertext")
    return chunks


def describe_part_put(key: SigningKey, envelope_hash: str, index: int) -> dict[str, Any]:
    """The signature the sender's first PUT of part `index` carries (section 8.5)."""
    data = part_put_data(envelope_hash, index, 0)
    return {
        "index": index,
        "offset": 0,
        "data_text": data.decode("ascii"),
        "signature_message_hex": (DOMAIN_PART_PUT + sha256(data)).hex(),
        "signature_b64": sign_part_put(key, envelope_hash, index, 0),
    }


def build_case(case: Case) -> dict[str, Any]:
    sender, recipient = node_keys(case.sender), node_keys(case.recipient)
    randomness = RecordingRandomness(case.seed)
    envelope = env.seal(
        sender_keys=sender,
        sender_authority=NODES[case.sender]["authority_id"],
        recipient=env.Recipient(NODES[case.recipient]["authority_id"], recipient.encryption_public),
        content=case.content,
        attachments=case.attachments,
        conversation_id=case.conversation_id,
        in_reply_to=case.in_reply_to,
        created_at=case.created_at,
        ttl=case.ttl,
        randomness=randomness,
    )
    header = env.parse_header(envelope.header, len(envelope.parts))
    part_count = len(envelope.parts)
    draws = randomness.draws
    uses = ["msg_id", "content_key"]
    uses += [f"stream_header of part {index}" for index in range(part_count)]
    uses += ["ephemeral key seed of wrap 0 (recipient)", "ephemeral key seed of wrap 1 (sender)"]
    if len(draws) != len(uses):
        raise AssertionError("seal drew randomness in an unexpected order")
    msg_id_raw, content_key = draws[0].output, draws[1].output
    if msg_id_raw.hex() != header.msg_id:
        raise AssertionError("msg_id is not the first draw")
    plaintexts = env.decrypt_parts(header, envelope.parts, content_key)

    wraps = []
    header_body = json.loads(envelope.header)
    publics = [recipient.encryption_public, sender.encryption_public]
    for number, (entry, public) in enumerate(zip(header_body["wraps"], publics, strict=True)):
        seed = draws[2 + part_count + number].output
        ephemeral = PrivateKey.from_seed(seed)
        epk = bytes(ephemeral.public_key)
        wraps.append(
            {
                "for": "recipient" if number == 0 else "sender",
                "kid": entry["kid"],
                "public_key_hex": public.hex(),
                "ephemeral_seed_hex": seed.hex(),
                "ephemeral_secret_hex": bytes(ephemeral).hex(),
                "ephemeral_public_hex": epk.hex(),
                "nonce_hex": blake2b(epk + public, digest_size=24, encoder=RawEncoder).hex(),
                "wrap_b64": entry["wrap"],
            }
        )

    parts = []
    for info, cipher, plain in zip(header.parts, envelope.parts, plaintexts, strict=True):
        large = len(plain) > INLINE_LIMIT
        part: dict[str, Any] = {
            "index": info.index,
            "key_hex": env.part_key(content_key, msg_id_raw, info.index).hex(),
            "ad_hex": env.part_ad(msg_id_raw, info.index).hex(),
            "stream_header_b64": b64e(info.stream_header),
            "plaintext": describe_plaintext(plain, generator=large),
            "length": info.length,
            "sha256_hex": info.sha256,
            "chunks": describe_chunks(cipher, len(plain)),
        }
        if not large:
            part["ciphertext_b64"] = b64e(cipher)
        parts.append(part)

    receipt = issue_receipt(
        recipient.signing,
        signer_kid=recipient.signing_kid,
        msg_id=header.msg_id,
        envelope_hash=envelope.envelope_hash,
        from_authority=header.from_authority,
        to_authority=header.to_authority,
        received_at=case.received_at,
        checkpoint=case.checkpoint,
    )
    small = all(len(plain) <= INLINE_LIMIT for plain in plaintexts)
    attachments = [
        {
            "name": item.name,
            "media_type": item.media_type,
            **describe_plaintext(item.data, generator=len(item.data) > INLINE_LIMIT),
        }
        for item in case.attachments
    ]
    return {
        "name": case.name,
        "description": case.description,
        "inputs": {
            "sender": case.sender,
            "recipient": case.recipient,
            "randomness_seed_hex": case.seed.hex(),
            "randomness_seed_text": case.seed.decode("ascii"),
            "created_at": format_time(case.created_at),
            "ttl_seconds": int(case.ttl.total_seconds()),
            "conversation_id": case.conversation_id,
            "in_reply_to": case.in_reply_to,
            "content": case.content,
            "attachments": attachments,
        },
        "randomness_draws": [
            {
                "counter": draw.counter,
                "size": draw.size,
                "method": draw.method,
                "use": use,
                "output_hex": draw.output.hex(),
            }
            for draw, use in zip(draws, uses, strict=True)
        ],
        "msg_id": header.msg_id,
        "content_key_hex": content_key.hex(),
        "commitment": {
            "message_hex": (env.COMMITMENT_LABEL + msg_id_raw).hex(),
            "value_b64": b64e(header.commitment),
        },
        "wraps": wraps,
        "manifest_text": plaintexts[0].decode("utf-8"),
        "parts": parts,
        "header_text": envelope.header.decode("utf-8"),
        "header_b64": b64e(envelope.header),
        "envelope_hash_hex": envelope.envelope_hash,
        "signature_message_hex": (DOMAIN_ENVELOPE + sha256(envelope.header)).hex(),
        "signature_b64": b64e(envelope.signature),
        "part_puts": [
            describe_part_put(sender.signing, envelope.envelope_hash, info.index)
            for info in header.parts[1:]
        ],
        "wire": envelope.to_wire() if small else None,
        "receipt": {
            "signer": case.recipient,
            "received_at": format_time(case.received_at),
            "checkpoint": case.checkpoint,
            "body_text": receipt.body.decode("utf-8"),
            "signature_message_hex": (DOMAIN_RECEIPT + sha256(receipt.body)).hex(),
            "wire": receipt.to_wire(),
        },
    }


def cases() -> list[Case]:
    basic = Case(
        name="basic",
        description="FR seals a request with one small attachment for DE; a new conversation.",
        sender="FR",
        recipient="DE",
        seed=b"entraide/v1/test-vectors/basic",
        created_at=datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC),
        ttl=timedelta(days=7),
        received_at=datetime(2025, 3, 14, 9, 27, 5, tzinfo=UTC),
        content={
            "kind": "request",
            "document": {
                "legal_basis": "UNTOC_18",
                "reference": "BEPI/2025/0042",
                "summary": "Relevés bancaires (période 2023-2024).\nVoir pièce jointe.",
            },
        },
        attachments=[
            env.Attachment(
                name="demande.txt",
                media_type="text/plain; charset=utf-8",
                data="Demande d'entraide pénale internationale\n".encode(),
            )
        ],
    )
    basic_msg_id = SeededRandomness(basic.seed).token(env.MSG_ID_BYTES).hex()
    reply = Case(
        name="reply_empty_attachment",
        description="DE answers FR in the same conversation; the attachment is empty.",
        sender="DE",
        recipient="FR",
        seed=b"entraide/v1/test-vectors/reply-empty-attachment",
        created_at=datetime(2025, 3, 17, 14, 2, 11, tzinfo=UTC),
        ttl=timedelta(days=2),
        received_at=datetime(2025, 3, 17, 14, 2, 12, tzinfo=UTC),
        content={
            "kind": "message",
            "document": {
                "type": "acknowledgement",
                "reference": "BfJ-II-2025-117",
                "text": "Eingang bestätigt; Prüfung läuft.",
            },
        },
        attachments=[env.Attachment("leer.bin", "application/octet-stream", b"")],
        conversation_id=basic_msg_id,
        in_reply_to=basic_msg_id,
        checkpoint=empty_log_checkpoint("FR"),
    )
    large = Case(
        name="chunk_boundaries",
        description=(
            "FR sends DE two generated attachments: exactly CHUNK_BYTES (one full chunk) and "
            "CHUNK_BYTES + 1 (a full chunk, then a final chunk of one byte)."
        ),
        sender="FR",
        recipient="DE",
        seed=b"entraide/v1/test-vectors/chunk-boundaries",
        created_at=datetime(2025, 3, 18, 8, 0, 0, tzinfo=UTC),
        ttl=timedelta(days=7),
        received_at=datetime(2025, 3, 18, 8, 0, 30, tzinfo=UTC),
        content={
            "kind": "message",
            "document": {"type": "additional_information", "text": "Annexes 1 et 2."},
        },
        attachments=[
            env.Attachment("exact-chunk.bin", "application/octet-stream", generated(1 << 20)),
            env.Attachment("two-chunks.bin", "application/octet-stream", generated((1 << 20) + 1)),
        ],
        conversation_id=basic_msg_id,
    )
    return [basic, reply, large]


def build_vectors() -> dict[str, Any]:
    return {
        "description": (
            "Entraide protocol v1 test vectors. docs/protocol.md §12 describes every field. "
            "Generated by tests/vectors/generate.py; do not edit by hand."
        ),
        "protocol_version": env.VERSION,
        "constants": {
            "chunk_bytes": env.CHUNK_BYTES,
            "secretstream_abytes": env.ABYTES,
            "secretstream_header_bytes": env.STREAM_HEADER_BYTES,
            "tag_message": env.TAG_MESSAGE,
            "tag_final": env.TAG_FINAL,
            "wrap_bytes": env.WRAP_BYTES,
            "domain_envelope_hex": DOMAIN_ENVELOPE.hex(),
            "domain_receipt_hex": DOMAIN_RECEIPT.hex(),
            "domain_identity_hex": DOMAIN_IDENTITY.hex(),
            "domain_rotation_hex": DOMAIN_ROTATION.hex(),
            "domain_part_put_hex": DOMAIN_PART_PUT.hex(),
            "person_part_key_hex": env.PERSON_PART_KEY.hex(),
            "person_commitment_hex": env.PERSON_COMMITMENT.hex(),
            "person_randomness_hex": b"entraide:rand:v1".hex(),
            "commitment_label_hex": env.COMMITMENT_LABEL.hex(),
            "generator": GENERATOR,
        },
        "nodes": {name: describe_node(name) for name in NODES},
        "rotation": describe_rotation(),
        "cases": [build_case(case) for case in cases()],
    }


def main() -> None:
    text = json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n"
    OUTPUT.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

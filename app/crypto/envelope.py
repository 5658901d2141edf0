"""Envelope seal and open (protocol v1, docs/protocol.md is normative).

The receiver's checks are separate functions so the P2P service can run them in the order
the protocol fixes, cheapest first, with its own database checks (known sender, replay) in
between: `decode_wire` → `parse_header` → `verify_header_signature` → (addressee, time,
replay: the service) → `unwrap_content_key` → `check_commitment` → `check_parts` →
`decrypt_parts` → `check_manifest`.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import nacl.bindings as sodium
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b
from nacl.public import Box, PrivateKey, PublicKey, SealedBox

from app.config import AUTHORITY_ID_PATTERN
from app.crypto.encoding import (
    DecodeError,
    b64d,
    b64e,
    canonical_json,
    format_time,
    is_int,
    load_canonical_object,
    parse_time,
    sha256_hex,
)
from app.crypto.keys import NodeKeys, key_id
from app.crypto.randomness import Randomness
from app.crypto.signing import DOMAIN_ENVELOPE, sign, verify
from app.jsonvalues import MAX_JSON_VALUES, json_values_exceed

VERSION = 1
ENVELOPE_TYPE = "entraide.envelope"
MANIFEST_TYPE = "entraide.manifest"
CHUNK_BYTES = 1 << 20
ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
STREAM_HEADER_BYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
KEY_BYTES = 32
MSG_ID_BYTES = 16
WRAP_BYTES = 32 + 32 + 16  # ephemeral public key, content key, Poly1305 tag
MAX_WRAPS = 8
PERSON_PART_KEY = b"entraide:part:v1"
PERSON_COMMITMENT = b"entraide:comm:v1"
COMMITMENT_LABEL = b"entraide/v1/key-commitment"
HEX_ID = re.compile(r"[0-9a-f]{32}")  # always used with fullmatch
HEX_HASH = re.compile(r"[0-9a-f]{64}")
AUTHORITY = re.compile(AUTHORITY_ID_PATTERN)


class EnvelopeError(Exception):
    """A check failed. `code` is the protocol's refusal code (docs/protocol.md)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Attachment:
    name: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class Recipient:
    authority_id: str
    encryption_public: bytes

    @property
    def enc_kid(self) -> str:
        return key_id(self.encryption_public)


@dataclass(frozen=True)
class WireEnvelope:
    header: bytes
    signature: bytes
    parts: list[bytes]

    @property
    def envelope_hash(self) -> str:
        return sha256_hex(self.header)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "header": b64e(self.header),
            "signature": b64e(self.signature),
            "parts": [b64e(part) for part in self.parts],
        }


@dataclass(frozen=True)
class PartInfo:
    index: int
    stream_header: bytes
    length: int
    sha256: str


@dataclass(frozen=True)
class Header:
    msg_id: str
    created_at: datetime
    expires_at: datetime
    from_authority: str
    from_sig_kid: str
    from_enc_kid: str
    to_authority: str
    to_enc_kid: str
    conversation_id: str
    in_reply_to: str | None
    wraps: dict[str, bytes]
    commitment: bytes
    parts: list[PartInfo]

    @property
    def msg_id_bytes(self) -> bytes:
        return bytes.fromhex(self.msg_id)


@dataclass(frozen=True)
class Opened:
    """An envelope's plaintext: the inner manifest and the attachments' bytes."""

    manifest: dict[str, Any]
    attachments: list[bytes]


# --- key schedule -------------------------------------------------------------------------


def part_key(content_key: bytes, msg_id: bytes, index: int) -> bytes:
    return bytes(
        blake2b(
            msg_id + index.to_bytes(4, "big"),
            digest_size=KEY_BYTES,
            key=content_key,
            person=PERSON_PART_KEY,
            encoder=RawEncoder,
        )
    )


def key_commitment(content_key: bytes, msg_id: bytes) -> bytes:
    return bytes(
        blake2b(
            COMMITMENT_LABEL + msg_id,
            digest_size=KEY_BYTES,
            key=content_key,
            person=PERSON_COMMITMENT,
            encoder=RawEncoder,
        )
    )


def part_ad(msg_id: bytes, index: int) -> bytes:
    return msg_id + index.to_bytes(4, "big")


def wrap_content_key(
    content_key: bytes, recipient_public: bytes, ephemeral: PrivateKey | None
) -> bytes:
    """libsodium's sealed box; with a given ephemeral key, the same bytes deterministically."""
    public = PublicKey(recipient_public)
    if ephemeral is None:
        return bytes(SealedBox(public).encrypt(content_key))
    # crypto_box_seal: nonce = BLAKE2b-192(epk || pk), output = epk || crypto_box(m).
    epk = bytes(ephemeral.public_key)
    nonce = blake2b(epk + recipient_public, digest_size=24, encoder=RawEncoder)
    return epk + bytes(Box(ephemeral, public).encrypt(content_key, nonce).ciphertext)


# --- streaming encryption -----------------------------------------------------------------


def encrypt_part(
    plaintext: bytes, key: bytes, ad: bytes, stream_header: bytes | None
) -> tuple[bytes, bytes]:
    """Encrypt one part in CHUNK_BYTES chunks, the last tagged FINAL. Returns (header, ct)."""
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    if stream_header is None:
        stream_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    else:
        # init_pull derives exactly the state init_push derives from that header; it lets
        # test vectors fix the header that libsodium would otherwise draw at random.
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, stream_header, key)
    chunks = []
    offsets = range(0, max(len(plaintext), 1), CHUNK_BYTES)
    for number, offset in enumerate(offsets):
        tag = TAG_FINAL if number == len(offsets) - 1 else TAG_MESSAGE
        chunk = plaintext[offset : offset + CHUNK_BYTES]
        chunks.append(sodium.crypto_secretstream_xchacha20poly1305_push(state, chunk, ad, tag))
    return bytes(stream_header), b"".join(chunks)


def ciphertext_length(plaintext_length: int) -> int:
    chunks = max(1, -(-plaintext_length // CHUNK_BYTES))
    return plaintext_length + chunks * ABYTES


def decrypt_part(ciphertext: bytes, key: bytes, ad: bytes, stream_header: bytes) -> bytes:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    try:
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, stream_header, key)
    except (CryptoError, ValueError) as exc:
        raise EnvelopeError("decrypt_failed", "invalid secretstream header") from exc
    out = []
    step = CHUNK_BYTES + ABYTES
    offset = 0
    while True:
        chunk = ciphertext[offset : offset + step]
        offset += len(chunk)
        if len(chunk) < ABYTES:
            raise EnvelopeError("truncated_part", "part ends before its final chunk")
        try:
            message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, chunk, ad)
        except (CryptoError, ValueError) as exc:
            raise EnvelopeError("decrypt_failed", "a part chunk failed authentication") from exc
        out.append(message)
        if tag == TAG_FINAL:
            if offset != len(ciphertext):
                raise EnvelopeError("decrypt_failed", "data after a part's final chunk")
            return b"".join(out)
        if tag != TAG_MESSAGE:
            raise EnvelopeError("decrypt_failed", "a part chunk carries an unexpected tag")
        if offset >= len(ciphertext):
            # Without TAG_FINAL a cut at a chunk boundary would pass as a shorter file.
            raise EnvelopeError("truncated_part", "part ends without a final chunk")


# --- sender -------------------------------------------------------------------------------


def build_manifest(
    *,
    msg_id: str,
    from_authority: str,
    to_authority: str,
    conversation_id: str,
    in_reply_to: str | None,
    content: dict[str, Any],
    attachments: Sequence[Attachment],
) -> bytes:
    return canonical_json(
        {
            "v": VERSION,
            "type": MANIFEST_TYPE,
            "msg_id": msg_id,
            "from": from_authority,
            "to": to_authority,
            "conversation_id": conversation_id,
            "in_reply_to": in_reply_to,
            "content": content,
            "attachments": [
                {
                    "index": number + 1,
                    "name": item.name,
                    "media_type": item.media_type,
                    "size": len(item.data),
                    "sha256": sha256_hex(item.data),
                }
                for number, item in enumerate(attachments)
            ],
        }
    )


def seal(
    *,
    sender_keys: NodeKeys,
    sender_authority: str,
    recipient: Recipient,
    content: dict[str, Any],
    attachments: Sequence[Attachment],
    conversation_id: str | None,
    in_reply_to: str | None,
    created_at: datetime,
    ttl: timedelta,
    randomness: Randomness,
) -> WireEnvelope:
    msg_id_raw = randomness.token(MSG_ID_BYTES)
    msg_id = msg_id_raw.hex()
    conversation = conversation_id or msg_id
    content_key = randomness.token(KEY_BYTES)
    manifest = build_manifest(
        msg_id=msg_id,
        from_authority=sender_authority,
        to_authority=recipient.authority_id,
        conversation_id=conversation,
        in_reply_to=in_reply_to,
        content=content,
        attachments=attachments,
    )
    parts_plain = [manifest, *(item.data for item in attachments)]
    parts_info: list[dict[str, Any]] = []
    parts_cipher: list[bytes] = []
    for index, plain in enumerate(parts_plain):
        stream_header, cipher = encrypt_part(
            plain,
            part_key(content_key, msg_id_raw, index),
            part_ad(msg_id_raw, index),
            randomness.stream_header(),
        )
        parts_cipher.append(cipher)
        parts_info.append(
            {
                "index": index,
                "stream_header": b64e(stream_header),
                "length": len(cipher),
                "sha256": sha256_hex(cipher),
            }
        )
    wraps = [
        {
            "kid": recipient.enc_kid,
            "wrap": b64e(
                wrap_content_key(
                    content_key, recipient.encryption_public, randomness.ephemeral_key()
                )
            ),
        },
        {
            "kid": sender_keys.encryption_kid,
            "wrap": b64e(
                wrap_content_key(
                    content_key, sender_keys.encryption_public, randomness.ephemeral_key()
                )
            ),
        },
    ]
    header = canonical_json(
        {
            "v": VERSION,
            "type": ENVELOPE_TYPE,
            "msg_id": msg_id,
            "created_at": format_time(created_at),
            "expires_at": format_time(created_at + ttl),
            "from": {
                "authority": sender_authority,
                "sig_kid": sender_keys.signing_kid,
                "enc_kid": sender_keys.encryption_kid,
            },
            "to": {"authority": recipient.authority_id, "enc_kid": recipient.enc_kid},
            "conversation_id": conversation,
            "in_reply_to": in_reply_to,
            "wraps": wraps,
            "commitment": b64e(key_commitment(content_key, msg_id_raw)),
            "chunk_bytes": CHUNK_BYTES,
            "parts": parts_info,
        }
    )
    signature = sign(sender_keys.signing, DOMAIN_ENVELOPE, header)
    return WireEnvelope(header=header, signature=signature, parts=parts_cipher)


# --- receiver -----------------------------------------------------------------------------


def decode_wire(wire: object, *, max_parts: int, max_header_bytes: int) -> WireEnvelope:
    """Shape and size checks only: no cryptography before these pass."""
    if not isinstance(wire, dict) or set(wire) != {"v", "header", "signature", "parts"}:
        raise EnvelopeError("malformed_envelope", "expected exactly v, header, signature, parts")
    if not is_int(wire["v"]) or wire["v"] != VERSION:
        # The value is not echoed: anyone may post one, as long as the body limit allows.
        raise EnvelopeError("unsupported_version", f"unknown protocol version; this is {VERSION}")
    parts = wire["parts"]
    if not isinstance(parts, list) or not parts:
        raise EnvelopeError("malformed_envelope", "parts must be a non-empty list")
    if len(parts) > max_parts:
        raise EnvelopeError("too_large", f"more than {max_parts} parts")
    header_text = wire["header"]
    if not isinstance(header_text, str):
        raise EnvelopeError("malformed_envelope", "the header must be a base64 string")
    if len(header_text) > (max_header_bytes * 4) // 3 + 4:
        raise EnvelopeError("too_large", f"header larger than {max_header_bytes} bytes")
    try:
        return WireEnvelope(
            header=b64d(header_text),
            signature=b64d(wire["signature"], length=64),
            parts=[b64d(part) for part in parts],
        )
    except DecodeError as exc:
        raise EnvelopeError("malformed_envelope", str(exc)) from exc


def _text(body: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = body.get(key)
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise EnvelopeError("malformed_header", f"header field {key!r} is missing or invalid")
    return value


def _object(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if not isinstance(value, dict):
        raise EnvelopeError("malformed_header", f"header field {key!r} must be an object")
    return value


HEADER_FIELDS = {
    "v",
    "type",
    "msg_id",
    "created_at",
    "expires_at",
    "from",
    "to",
    "conversation_id",
    "in_reply_to",
    "wraps",
    "commitment",
    "chunk_bytes",
    "parts",
}


def parse_header(header: bytes, part_count: int) -> Header:
    try:
        body = load_canonical_object(header)
    except DecodeError as exc:
        raise EnvelopeError("malformed_header", str(exc)) from exc
    version = body.get("v")
    if not is_int(version) or version != VERSION or body.get("type") != ENVELOPE_TYPE:
        raise EnvelopeError("unsupported_version", "not a version 1 Entraide envelope")
    if set(body) != HEADER_FIELDS:
        raise EnvelopeError("malformed_header", "header fields are not those of version 1")
    if not is_int(body["chunk_bytes"]) or body["chunk_bytes"] != CHUNK_BYTES:
        raise EnvelopeError("malformed_header", "unsupported chunk size")
    sender, addressee = _object(body, "from"), _object(body, "to")
    if set(sender) != {"authority", "sig_kid", "enc_kid"} or set(addressee) != {
        "authority",
        "enc_kid",
    }:
        raise EnvelopeError("malformed_header", "'from' or 'to' has other fields than v1's")
    in_reply_to = body["in_reply_to"]
    if in_reply_to is not None and not (
        isinstance(in_reply_to, str) and HEX_ID.fullmatch(in_reply_to)
    ):
        raise EnvelopeError("malformed_header", "in_reply_to must be a message id or null")
    try:
        wraps_list = body["wraps"]
        parts_list = body["parts"]
        if not isinstance(wraps_list, list) or not isinstance(parts_list, list):
            raise EnvelopeError("malformed_header", "wraps and parts must be lists")
        if len(parts_list) != part_count:
            raise EnvelopeError("malformed_header", "header and body disagree on part count")
        if not 1 <= len(wraps_list) <= MAX_WRAPS:
            raise EnvelopeError("malformed_header", f"between 1 and {MAX_WRAPS} key wraps")
        wraps: dict[str, bytes] = {}
        for wrap in wraps_list:
            if not isinstance(wrap, dict) or set(wrap) != {"kid", "wrap"}:
                raise EnvelopeError("malformed_header", "a key wrap is malformed")
            kid = _text(wrap, "kid", HEX_ID)
            if kid in wraps:
                raise EnvelopeError("malformed_header", "two key wraps for one key")
            wraps[kid] = b64d(wrap["wrap"], length=WRAP_BYTES)
        parts: list[PartInfo] = []
        for index, part in enumerate(parts_list):
            if not isinstance(part, dict) or set(part) != {
                "index",
                "stream_header",
                "length",
                "sha256",
            }:
                raise EnvelopeError("malformed_header", "a part description is malformed")
            length = part["length"]
            if not is_int(part["index"]) or part["index"] != index:
                raise EnvelopeError("malformed_header", "a part's index is invalid")
            if not is_int(length) or length < ABYTES:
                raise EnvelopeError("malformed_header", "a part's index or length is invalid")
            parts.append(
                PartInfo(
                    index=index,
                    stream_header=b64d(part["stream_header"], length=STREAM_HEADER_BYTES),
                    length=length,
                    sha256=_text(part, "sha256", HEX_HASH),
                )
            )
        return Header(
            msg_id=_text(body, "msg_id", HEX_ID),
            created_at=parse_time(body["created_at"]),
            expires_at=parse_time(body["expires_at"]),
            from_authority=_text(sender, "authority", AUTHORITY),
            from_sig_kid=_text(sender, "sig_kid", HEX_ID),
            from_enc_kid=_text(sender, "enc_kid", HEX_ID),
            to_authority=_text(addressee, "authority", AUTHORITY),
            to_enc_kid=_text(addressee, "enc_kid", HEX_ID),
            conversation_id=_text(body, "conversation_id", HEX_ID),
            in_reply_to=in_reply_to,
            wraps=wraps,
            commitment=b64d(body["commitment"], length=KEY_BYTES),
            parts=parts,
        )
    except DecodeError as exc:
        raise EnvelopeError("malformed_header", str(exc)) from exc


def verify_header_signature(envelope: WireEnvelope, signing_public: bytes) -> None:
    if not verify(signing_public, DOMAIN_ENVELOPE, envelope.header, envelope.signature):
        raise EnvelopeError("bad_signature", "the header signature does not verify")


def unwrap_content_key(header: Header, keys: NodeKeys, *, kid: str) -> bytes:
    """Open the wrap made for `kid`: the addressee's key (receiver) or our own (sender)."""
    private = keys.encryption_key_for(kid)
    wrap = header.wraps.get(kid)
    if private is None or wrap is None:
        raise EnvelopeError("bad_key_wrap", "no content key is wrapped for this node's key")
    try:
        content_key = bytes(SealedBox(private).decrypt(wrap))
    except CryptoError as exc:
        raise EnvelopeError("bad_key_wrap", "the content key wrap does not open") from exc
    if len(content_key) != KEY_BYTES:
        raise EnvelopeError("bad_key_wrap", "the wrapped content key has the wrong size")
    return content_key


def check_commitment(header: Header, content_key: bytes) -> None:
    expected = key_commitment(content_key, header.msg_id_bytes)
    if not hmac.compare_digest(expected, header.commitment):
        raise EnvelopeError("bad_commitment", "the key commitment does not match")


def check_parts(header: Header, parts: Sequence[bytes]) -> None:
    for info, data in zip(header.parts, parts, strict=True):
        if len(data) < info.length:
            raise EnvelopeError("truncated_part", f"part {info.index} is shorter than declared")
        if len(data) > info.length:
            raise EnvelopeError("malformed_envelope", f"part {info.index} is longer than declared")
        if not hmac.compare_digest(sha256_hex(data), info.sha256):
            raise EnvelopeError("part_hash_mismatch", f"part {info.index} hash does not match")


def decrypt_parts(header: Header, parts: Sequence[bytes], content_key: bytes) -> list[bytes]:
    msg_id = header.msg_id_bytes
    return [
        decrypt_part(
            data,
            part_key(content_key, msg_id, info.index),
            part_ad(msg_id, info.index),
            info.stream_header,
        )
        for info, data in zip(header.parts, parts, strict=True)
    ]


def check_manifest(header: Header, plaintexts: Sequence[bytes], *, stored: bool = False) -> Opened:
    """The inner manifest must name the same sender, addressee and message as the header.
    `stored`: reopening an envelope this node accepted earlier (bind_manifest)."""
    manifest = bind_manifest(header, plaintexts[0], stored=stored)
    listed = manifest["attachments"]
    if len(listed) != len(plaintexts) - 1:
        raise EnvelopeError("manifest_mismatch", "the manifest lists other attachments")
    for entry, data in zip(listed, plaintexts[1:], strict=True):
        if entry["size"] != len(data) or entry["sha256"] != sha256_hex(data):
            raise EnvelopeError("manifest_mismatch", "an attachment differs from the manifest")
    return Opened(manifest=manifest, attachments=list(plaintexts[1:]))


def open_manifest_part(
    header: Header, part: bytes, content_key: bytes, *, stored: bool = False
) -> dict[str, Any]:
    """Part 0 checked against the header (length, SHA-256: step 26's codes), opened, and its
    manifest bound to the header, without the attachments' parts (a streamed envelope's, or
    a custody proof's). `stored`: as for bind_manifest."""
    info = header.parts[0]
    if len(part) < info.length:
        raise EnvelopeError("truncated_part", "part 0 is shorter than its declared length")
    if len(part) > info.length:
        raise EnvelopeError("malformed_envelope", "part 0 is longer than its declared length")
    if not hmac.compare_digest(sha256_hex(part), info.sha256):
        raise EnvelopeError("part_hash_mismatch", "part 0 hash does not match")
    msg_id = header.msg_id_bytes
    key = part_key(content_key, msg_id, 0)
    plaintext = decrypt_part(part, key, part_ad(msg_id, 0), info.stream_header)
    return bind_manifest(header, plaintext, stored=stored)


# The inner manifest's members (docs/protocol.md §6.2), and those of its `content`
# (docs/domain.md): a member no schema defines would travel unseen, never shown to the
# receiving officer yet covered by the receipt and a custody proof (from review). The
# envelope layer checks the manifest's; the receiver checks the content's after step 30
# (app/p2p/service.py), and a custody proof's reader both (app/crypto/proof.py).
MANIFEST_FIELDS = frozenset(
    {
        "v",
        "type",
        "msg_id",
        "from",
        "to",
        "conversation_id",
        "in_reply_to",
        "content",
        "attachments",
    }
)
CONTENT_FIELDS = frozenset({"kind", "document"})


def bind_manifest(header: Header, plaintext: bytes, *, stored: bool = False) -> dict[str, Any]:
    """The opened manifest (part 0), bound to its header: exactly the members of version 1,
    the same message, sender, addressee and conversation, one well-formed entry per
    attachment part. Not the attachments themselves (check_manifest, or a custody proof's
    reader with the file in hand).

    `stored`: an envelope this node accepted earlier, reopened for a reader; its member set
    is not checked again, so that one accepted before receivers checked it stays readable
    (reported as storage altered, it would be lost to its officer)."""
    if not stored and json_values_exceed(plaintext, MAX_JSON_VALUES):
        # Step 27a: counted before it is parsed, as a body is at step 1, which saw only its
        # ciphertext (from review: 7 million empty lists, 28 MB, cost 690 MiB and 8 s).
        raise EnvelopeError(
            "too_large", f"the inner manifest holds more than {MAX_JSON_VALUES} JSON values"
        )
    try:
        manifest = load_canonical_object(plaintext)
    except DecodeError as exc:
        raise EnvelopeError("manifest_mismatch", "the inner manifest is not JSON") from exc
    if not stored and manifest.keys() != MANIFEST_FIELDS:
        # Said without the members' names: they are the sender's, decrypted.
        raise EnvelopeError("manifest_mismatch", "the inner manifest has other members than v1's")
    bound = (
        manifest.get("type") == MANIFEST_TYPE
        and is_int(manifest.get("v"))
        and manifest.get("v") == VERSION
        and manifest.get("msg_id") == header.msg_id
        and manifest.get("from") == header.from_authority
        and manifest.get("to") == header.to_authority
        and manifest.get("conversation_id") == header.conversation_id
        and manifest.get("in_reply_to") == header.in_reply_to
    )
    if not bound:
        raise EnvelopeError("manifest_mismatch", "the inner manifest does not match the header")
    listed = manifest.get("attachments")
    if not isinstance(listed, list) or len(listed) != len(header.parts) - 1:
        raise EnvelopeError("manifest_mismatch", "the manifest lists other attachments")
    for number, entry in enumerate(listed, 1):
        if not _valid_attachment_entry(entry, number):
            raise EnvelopeError("manifest_mismatch", f"attachment {number} is described badly")
    return manifest


ATTACHMENT_FIELDS = {"index", "name", "media_type", "size", "sha256"}
FILE_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,255}")
MEDIA_TYPE = re.compile(
    r"[a-z0-9!#$&^_.+-]{1,63}/[a-z0-9!#$&^_.+-]{1,63}"
    r"(?:; ?[a-z0-9!#$&^_.+-]{1,63}=[A-Za-z0-9!#$&^_.+-]{1,63}){0,4}"
)


def _valid_attachment_entry(entry: object, number: int) -> bool:
    """The same rules the local API applies to names and media types, for a peer's manifest."""
    return (
        isinstance(entry, dict)
        and set(entry) == ATTACHMENT_FIELDS
        and is_int(entry["index"])
        and entry["index"] == number
        and isinstance(entry["name"], str)
        and FILE_NAME.fullmatch(entry["name"]) is not None
        and isinstance(entry["media_type"], str)
        and MEDIA_TYPE.fullmatch(entry["media_type"]) is not None
        and is_int(entry["size"])
        and isinstance(entry["sha256"], str)
        # Lowercase hex, as hex(SHA-256) is spelt: compared in constant time later, which
        # hmac refuses (TypeError) for text that is not ASCII.
        and HEX_HASH.fullmatch(entry["sha256"]) is not None
    )


def open_envelope(envelope: WireEnvelope, keys: NodeKeys) -> tuple[Header, Opened]:
    """Open a stored envelope, as addressee or as sender, for an authorised reader."""
    header = parse_header(envelope.header, len(envelope.parts))
    # Ours is the addressee's or the sender's wrap, sealed to our current key or to one a
    # rotation retired (NodeKeys keeps those, so archives stay readable).
    kid = next(
        (k for k in (header.to_enc_kid, header.from_enc_kid) if keys.encryption_key_for(k)),
        header.to_enc_kid,
    )
    content_key = unwrap_content_key(header, keys, kid=kid)
    check_commitment(header, content_key)
    check_parts(header, envelope.parts)
    plaintexts = decrypt_parts(header, envelope.parts, content_key)
    return header, check_manifest(header, plaintexts, stored=True)

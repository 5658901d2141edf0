"""Sealing an envelope whose attachments were already streamed into the blob store.

The protocol does not change for large evidence: the header, the manifest and every part are
exactly what `app.crypto.envelope.seal` produces for the same plaintext and randomness (a test
checks byte equality). Only the order of work differs: the message id, content key and each
attachment's stream header are fixed when the draft is created, each attachment is encrypted
as it arrives (`app.evidence.stream.PartWriter`), and sealing, at submission, encrypts the
manifest (part 0, in memory: it is small) and signs a header that lists every part's stream
header, ciphertext length and ciphertext SHA-256.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nacl.public import PrivateKey

from app.crypto.encoding import b64e, canonical_json, format_time, sha256_hex
from app.crypto.envelope import (
    CHUNK_BYTES,
    ENVELOPE_TYPE,
    MANIFEST_TYPE,
    VERSION,
    Recipient,
    encrypt_part,
    key_commitment,
    part_ad,
    part_key,
    wrap_content_key,
)
from app.crypto.keys import NodeKeys
from app.crypto.signing import DOMAIN_ENVELOPE, sign
from app.evidence.stream import FinishedPart


@dataclass(frozen=True)
class StreamedAttachment:
    name: str
    media_type: str
    stream_header: bytes
    part: FinishedPart


@dataclass(frozen=True)
class SealedHead:
    """Everything of the envelope but the attachments' ciphertext, which stays in blobs."""

    header: bytes
    signature: bytes
    manifest_part: bytes

    @property
    def envelope_hash(self) -> str:
        return sha256_hex(self.header)


def seal_streamed(
    *,
    sender_keys: NodeKeys,
    sender_authority: str,
    recipient: Recipient,
    msg_id: bytes,
    content_key: bytes,
    content: dict[str, Any],
    attachments: Sequence[StreamedAttachment],
    conversation_id: str | None,
    in_reply_to: str | None,
    created_at: datetime,
    ttl: timedelta,
    manifest_stream_header: bytes | None,
    ephemeral_keys: tuple[PrivateKey | None, PrivateKey | None] = (None, None),
) -> SealedHead:
    msg_id_hex = msg_id.hex()
    conversation = conversation_id or msg_id_hex
    manifest = canonical_json(
        {
            "v": VERSION,
            "type": MANIFEST_TYPE,
            "msg_id": msg_id_hex,
            "from": sender_authority,
            "to": recipient.authority_id,
            "conversation_id": conversation,
            "in_reply_to": in_reply_to,
            "content": content,
            "attachments": [
                {
                    "index": number,
                    "name": item.name,
                    "media_type": item.media_type,
                    "size": item.part.plaintext_size,
                    "sha256": item.part.plaintext_sha256,
                }
                for number, item in enumerate(attachments, 1)
            ],
        }
    )
    manifest_header, manifest_cipher = encrypt_part(
        manifest,
        part_key(content_key, msg_id, 0),
        part_ad(msg_id, 0),
        manifest_stream_header,
    )
    parts_info: list[dict[str, Any]] = [
        {
            "index": 0,
            "stream_header": b64e(manifest_header),
            "length": len(manifest_cipher),
            "sha256": sha256_hex(manifest_cipher),
        },
        *(
            {
                "index": number,
                "stream_header": b64e(item.stream_header),
                "length": item.part.length,
                "sha256": item.part.digest,
            }
            for number, item in enumerate(attachments, 1)
        ),
    ]
    wraps = [
        {
            "kid": recipient.enc_kid,
            "wrap": b64e(
                wrap_content_key(content_key, recipient.encryption_public, ephemeral_keys[0])
            ),
        },
        {
            "kid": sender_keys.encryption_kid,
            "wrap": b64e(
                wrap_content_key(content_key, sender_keys.encryption_public, ephemeral_keys[1])
            ),
        },
    ]
    header = canonical_json(
        {
            "v": VERSION,
            "type": ENVELOPE_TYPE,
            "msg_id": msg_id_hex,
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
            "commitment": b64e(key_commitment(content_key, msg_id)),
            "chunk_bytes": CHUNK_BYTES,
            "parts": parts_info,
        }
    )
    signature = sign(sender_keys.signing, DOMAIN_ENVELOPE, header)
    return SealedHead(header=header, signature=signature, manifest_part=manifest_cipher)

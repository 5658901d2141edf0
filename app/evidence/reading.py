"""Reading a stored envelope whose attachments are in the blob store, and downloading them.

Reading a conversation opens only the header and the manifest (part 0, in the database),
with the same checks as for inline envelopes. Downloading an attachment checks the blob's
length and ciphertext SHA-256 against the signed header before any plaintext leaves, then
decrypts it chunk by chunk (final tag required) while it is sent, and checks the plaintext
size and SHA-256 against the manifest at the end. A fault found before the first byte is a
500 `stored_envelope_corrupt` with an audit entry; a fault found while streaming aborts the
response (the client sees a broken transfer, never a complete shorter file) and is audited.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.log import record, record_alone
from app.crypto import envelope as env
from app.crypto.encoding import sha256_hex
from app.crypto.signing import DOMAIN_ENVELOPE, verify
from app.errors import EntraideError, NotFound
from app.evidence.blobstore import BlobError, BlobStore
from app.evidence.inbound import _declared_parts, _manifest
from app.evidence.stream import check_blob, decrypt_stream, read_blob
from app.models import BlobPart, Message
from app.node import Node
from app.peers.keys import stored_envelope_signer
from app.requests.store import load_envelope

log = logging.getLogger(__name__)


class StoredEvidenceCorrupt(EntraideError):
    """A stored envelope or blob no longer checks out: storage was altered or damaged."""

    status_code = 500
    code = "stored_envelope_corrupt"


def has_blob_parts(session: Session, message: Message) -> bool:
    return (
        session.scalar(select(BlobPart.id).where(BlobPart.message_id == message.id).limit(1))
        is not None
    )


def _content_key(node: Node, header: env.Header) -> bytes:
    kid = next(
        (k for k in (header.to_enc_kid, header.from_enc_kid) if node.keys.encryption_key_for(k)),
        header.to_enc_kid,
    )
    content_key = env.unwrap_content_key(header, node.keys, kid=kid)
    env.check_commitment(header, content_key)
    return content_key


def open_stored_head(
    session: Session, node: Node, message: Message
) -> tuple[env.Header, env.Opened, bytes]:
    """Header, manifest and content key of a stored streamed envelope, re-checked."""
    head = load_envelope(session, message)  # the header, signature and part 0
    problem: str | None = None
    if sha256_hex(head.header) != message.envelope_hash:
        problem = "its header does not hash to the recorded envelope hash"
    else:
        try:
            count = _declared_parts(head.header)
            signer = stored_envelope_signer(
                session,
                node.keys,
                outbound=message.direction == "outbound",
                sender=message.sender_authority,
                header=head.header,
                parts=count,
            )
            if not verify(signer or b"", DOMAIN_ENVELOPE, head.header, head.signature):
                problem = "its signature does not verify"
            else:
                header = env.parse_header(head.header, count)
                content_key = _content_key(node, header)
                opened = _manifest(header, head.parts[0], content_key)
                return header, opened, content_key
        except env.EnvelopeError as exc:
            problem = f"it does not open ({exc.code})"
    raise StoredEvidenceCorrupt(
        f"stored envelope {message.msg_id}: {problem}; storage was altered or damaged"
    )


@dataclass(frozen=True)
class StreamedDownload:
    name: str
    media_type: str
    size: int
    sha256: str
    chunks: Iterator[bytes]


def _refuse(session: Session, message: Message, index: int, actor: str, detail: str) -> NoReturn:
    # In the route's own transaction: the caller answers without raising, so it commits.
    record(
        session,
        actor=actor,
        action="attachment.downloaded",
        outcome="stored_envelope_corrupt",
        request_id=message.request_id,
        msg_id=message.msg_id,
        details={"index": index, "detail": detail[:200]},
    )
    raise StoredEvidenceCorrupt(f"attachment {index} of {message.msg_id}: {detail}")


def streamed_download(
    session: Session,
    node: Node,
    store: BlobStore,
    *,
    message: Message,
    index: int,
    actor: str,
) -> StreamedDownload:
    header, opened, content_key = open_stored_head(session, node, message)
    listed = opened.manifest["attachments"]
    if not 1 <= index <= len(listed):
        raise NotFound("no such attachment", code="unknown_attachment")
    entry, info = listed[index - 1], header.parts[index]
    # The whole blob is checked against the signed header before the first plaintext byte.
    try:
        with store.open(info.sha256) as blob:
            check_blob(blob, length=info.length, sha256=info.sha256)
    except BlobError:
        _refuse(session, message, index, actor, "the blob is missing")
    except env.EnvelopeError as exc:
        _refuse(session, message, index, actor, f"the blob fails its check ({exc.code})")
    record(
        session,
        actor=actor,
        action="attachment.downloaded",
        request_id=message.request_id,
        msg_id=message.msg_id,
        peer=message.sender_authority
        if message.direction == "inbound"
        else message.recipient_authority,
        details={"index": index, "sha256": entry["sha256"], "streamed": True},
    )
    msg_id = header.msg_id_bytes
    key = env.part_key(content_key, msg_id, index)

    def chunks() -> Iterator[bytes]:
        try:
            with store.open(info.sha256) as blob:
                yield from decrypt_stream(
                    read_blob(blob),
                    key=key,
                    ad=env.part_ad(msg_id, index),
                    stream_header=info.stream_header,
                    plaintext_size=int(entry["size"]),
                    plaintext_sha256=str(entry["sha256"]),
                )
        except (env.EnvelopeError, BlobError) as exc:
            # Altered after the check: abort the response; the client sees a broken transfer.
            log.error("download of %s/%s aborted: %s", message.msg_id, index, exc)
            record_alone(
                node.sessions,
                actor=actor,
                action="attachment.downloaded",
                outcome="stored_envelope_corrupt",
                request_id=message.request_id,
                msg_id=message.msg_id,
                details={"index": index, "detail": "aborted while streaming"},
            )
            raise

    return StreamedDownload(
        name=str(entry["name"]),
        media_type=str(entry["media_type"]),
        size=int(entry["size"]),
        sha256=str(entry["sha256"]),
        chunks=chunks(),
    )

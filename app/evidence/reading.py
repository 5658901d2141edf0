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

import errno
import logging
from collections.abc import Generator
from dataclasses import dataclass, field

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
from app.requests.store import load_envelope, row_disagrees

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
                problem = row_disagrees(message, header)
                if problem is None:
                    content_key = _content_key(node, header)
                    opened = _manifest(header, head.parts[0], content_key, stored=True)
                    return header, opened, content_key
        except env.EnvelopeError as exc:
            problem = f"it does not open ({exc.code})"
    raise StoredEvidenceCorrupt(
        f"stored envelope {message.msg_id}: {problem}; storage was altered or damaged"
    )


@dataclass(frozen=True)
class PlannedDownload:
    """What downloading an attachment needs once the transaction that read it is over: the
    blob check and the streaming hold no database lock (a blob may be tens of GiB)."""

    request_id: str
    msg_id: str
    peer: str
    index: int
    name: str
    media_type: str
    size: int  # plaintext, as the manifest states
    sha256: str  # plaintext, as the manifest states
    part: env.PartInfo  # the signed header's length, ciphertext hash, stream header
    key: bytes = field(repr=False)  # never in a log line or a traceback's locals
    ad: bytes


def plan_download(session: Session, node: Node, *, message: Message, index: int) -> PlannedDownload:
    header, opened, content_key = open_stored_head(session, node, message)
    listed = opened.manifest["attachments"]
    if not 1 <= index <= len(listed):
        raise NotFound("no such attachment", code="unknown_attachment")
    entry = listed[index - 1]
    msg_id = header.msg_id_bytes
    return PlannedDownload(
        request_id=message.request_id,
        msg_id=message.msg_id,
        peer=message.sender_authority
        if message.direction == "inbound"
        else message.recipient_authority,
        index=index,
        name=str(entry["name"]),
        media_type=str(entry["media_type"]),
        size=int(entry["size"]),
        sha256=str(entry["sha256"]),
        part=header.parts[index],
        key=env.part_key(content_key, msg_id, index),
        ad=env.part_ad(msg_id, index),
    )


def check_download(store: BlobStore, plan: PlannedDownload) -> str | None:
    """The whole blob against the signed header, before the first plaintext byte: None, or
    what is wrong with it. Outside any transaction."""
    try:
        with store.open(plan.part.sha256) as blob:
            check_blob(blob, length=plan.part.length, sha256=plan.part.sha256)
    except BlobError:
        return "the blob is missing"
    except env.EnvelopeError as exc:
        return f"the blob fails its check ({exc.code})"
    except OSError as exc:  # unreadable: damaged media, permissions
        return (
            f"the blob cannot be read ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})"
        )
    return None


def record_download(
    session: Session, plan: PlannedDownload, *, actor: str, problem: str | None
) -> None:
    if problem is not None:
        record(
            session,
            actor=actor,
            action="attachment.downloaded",
            outcome="stored_envelope_corrupt",
            request_id=plan.request_id,
            msg_id=plan.msg_id,
            details={"index": plan.index, "detail": problem[:200]},
        )
        return
    record(
        session,
        actor=actor,
        action="attachment.downloaded",
        request_id=plan.request_id,
        msg_id=plan.msg_id,
        peer=plan.peer,
        # The blob's hash (the signed header's), never the plaintext's (app.requests.service).
        details={"index": plan.index, "part_sha256": plan.part.sha256, "streamed": True},
    )


def download_chunks(
    node: Node, store: BlobStore, plan: PlannedDownload, *, actor: str
) -> Generator[bytes, None, None]:
    """The plaintext, decrypted as it is sent (final tag and manifest hash checked)."""
    try:
        with store.open(plan.part.sha256) as blob:
            yield from decrypt_stream(
                read_blob(blob),
                key=plan.key,
                ad=plan.ad,
                stream_header=plan.part.stream_header,
                plaintext_size=plan.size,
                plaintext_sha256=plan.sha256,
            )
    except (env.EnvelopeError, BlobError, OSError) as exc:
        # Altered after the check: abort the response; the client sees a broken transfer.
        log.error("download of %s/%s aborted: %s", plan.msg_id, plan.index, exc)
        record_alone(
            node.sessions,
            actor=actor,
            action="attachment.downloaded",
            outcome="stored_envelope_corrupt",
            request_id=plan.request_id,
            msg_id=plan.msg_id,
            details={"index": plan.index, "detail": "aborted while streaming"},
        )
        raise

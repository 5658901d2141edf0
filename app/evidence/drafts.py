"""Drafts with large evidence: declare, upload (streamed, resumable), then submit.

Creating a draft fixes what sealing needs before any byte arrives: the message id, the content
key `K` (stored sealed to this node's own encryption key, as envelopes are) and each
attachment's stream header. Each attachment is then encrypted as it is uploaded
(`app.evidence.stream.PartWriter`) into the blob store; submission seals the header and the
manifest and queues the envelope, with its case, outbox row and audit entries, in the caller's
unit of work. Plaintext is never written anywhere.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b
from nacl.public import SealedBox
from nacl.secret import SecretBox
from nacl.utils import random as random_bytes
from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from app.audit.log import record
from app.auth.service import Principal
from app.crypto.encoding import canonical_json, utc_now
from app.crypto.envelope import (
    CHUNK_BYTES,
    KEY_BYTES,
    MSG_ID_BYTES,
    STREAM_HEADER_BYTES,
    Recipient,
    part_ad,
    part_key,
)
from app.delivery import outbox
from app.domain.document import RequestDocument
from app.domain.messages import MessageDocument, MessageType
from app.errors import (
    BadRequest,
    Conflict,
    EntraideError,
    NotFound,
    PayloadTooLarge,
)
from app.evidence import schemas
from app.evidence.blobstore import BlobError, DirectoryBlobStore, UploadBusy
from app.evidence.seal import SealedHead, StreamedAttachment, seal_streamed
from app.evidence.stream import (
    CIPHER_CHUNK,
    FinishedPart,
    PartWriter,
    chunk_count,
    least_recent_past,
)
from app.limits import refuse_over_wire_limit
from app.models import (
    ApiClient,
    BlobPart,
    CaseFile,
    EvidenceDraft,
    EvidenceUpload,
    Message,
    Part,
)
from app.node import Node
from app.peers.keys import PinnedKeys
from app.peers.service import get_peer, refuse_if_suspended
from app.requests import conversation, lifecycle, moves
from app.requests.service import message_to_follow, pinned_peer, visible_case
from app.requests.status import QUEUED

OPEN = "open"
SUBMITTED = "submitted"
PERSON_DRAFT = b"entraide:draft:1"
PERSON_UPLOAD_SHA256 = b"entraide:upsha:1"
IDLE_WRITER_SECONDS = 300.0
# Writers kept between requests, each holding its staging file open: past this many, the
# longest unused is closed (its next request rebuilds it from the stored chunks). Unbounded,
# one officer's 1,088 one-byte PATCHes held 990 files open after it left, and the node ran
# out of descriptors for its database (from review).
MOST_KEPT_WRITERS = 128


class DraftCorrupt(EntraideError):
    """A stored draft no longer opens with this node's keys: storage was altered."""

    status_code = 500
    code = "stored_envelope_corrupt"


def actor_of(principal: Principal) -> str:
    return f"client:{principal.name}"


def _draft_key(content_key: bytes, msg_id: bytes) -> bytes:
    return bytes(
        blake2b(msg_id, digest_size=32, key=content_key, person=PERSON_DRAFT, encoder=RawEncoder)
    )


def _sha256_box(attachment_key: bytes) -> SecretBox:
    """The box an attachment's plaintext SHA-256 is kept in until its draft is sealed: keyed
    from its part key (so bound to its draft and index), apart from the part's own stream."""
    return SecretBox(
        blake2b(
            b"", digest_size=32, key=attachment_key, person=PERSON_UPLOAD_SHA256, encoder=RawEncoder
        )
    )


def seal_sha256(attachment_key: bytes, sha256: str) -> bytes:
    return bytes(_sha256_box(attachment_key).encrypt(bytes.fromhex(sha256)))


def open_sha256(attachment_key: bytes, row: EvidenceUpload) -> str:
    """The attachment's plaintext SHA-256: sealed, or (uploaded before it was) in clear."""
    if row.sealed_sha256 is None:
        if row.plaintext_sha256 is None:
            raise DraftCorrupt(f"attachment {row.part_index} has no recorded hash")
        return row.plaintext_sha256
    try:
        return bytes(_sha256_box(attachment_key).decrypt(row.sealed_sha256)).hex()
    except CryptoError as exc:
        raise DraftCorrupt(f"attachment {row.part_index}'s recorded hash does not open") from exc


def upload_id(draft_id: str, index: int) -> str:
    return f"out-{draft_id}-{index}"


def _href(draft_id: str, index: int) -> str:
    return f"/api/v1/evidence/drafts/{draft_id}/attachments/{index}"


def uploaded(store: DirectoryBlobStore, row: EvidenceUpload) -> bool:
    """Complete, and its blob still there: a blob lost since (a damaged disk, an older
    restore of the blob folder) makes the attachment one to upload again, not a draft that
    can be neither completed nor submitted."""
    return row.digest is not None and store.exists(row.digest)


def staged_offset(store: DirectoryBlobStore, row: EvidenceUpload) -> int:
    """The durable offset without decrypting anything: whole stored chunks, never the last."""
    if row.digest is not None:
        return row.size if store.exists(row.digest) else 0
    path = store.uploads / upload_id(row.draft_id, row.part_index)
    try:
        stored = path.stat().st_size
    except FileNotFoundError:
        return 0
    return min(stored // CIPHER_CHUNK, chunk_count(row.size) - 1) * CHUNK_BYTES


# --- creating -----------------------------------------------------------------------------


def _requested_peer(session: Session, node: Node, body: schemas.CreateDraft) -> str:
    document = body.document
    if document.requesting_authority != node.authority_id:
        raise BadRequest(
            f"document.requesting_authority must be this node's authority, {node.authority_id}",
            code="wrong_requesting_authority",
        )
    if document.requested_authority != body.to:
        raise BadRequest("document.requested_authority must equal 'to'", code="recipient_mismatch")
    return body.to


def _answered_request(
    session: Session, request_id: str, body: schemas.CreateReplyDraft, principal: Principal
) -> CaseFile:
    """The request a reply answers, if this officer may see it, and if its message may be
    sent from where the request is now: refused before any byte is uploaded (and judged
    again at submission, the request may move meanwhile)."""
    case = visible_case(session, request_id, principal)
    lifecycle.on_send(
        lifecycle.parse_state(case.status), lifecycle.role_of(case.direction), body.document.type
    )
    return case


def _refuse_over_client_budget(
    session: Session, node: Node, principal: Principal, declared: int
) -> None:
    """A client's open drafts, in number and in the bytes their attachments declare, are
    bounded (Settings.max_open_drafts_per_client): an officer's token that opened drafts
    without end could stage evidence until the node's disk was full. Checked under a lock on
    the client's row, so two creations at once cannot both take the last place."""
    settings = node.settings
    # FOR NO KEY UPDATE: creations of one client take turns, while the foreign keys of its
    # idempotency rows (a share lock on this row, taken before) do not deadlock with it.
    session.execute(
        select(ApiClient.id)
        .where(ApiClient.id == principal.client_id)
        .with_for_update(key_share=True)
    )
    count, declared_before = session.execute(
        select(
            func.count(func.distinct(EvidenceDraft.id)),
            func.coalesce(func.sum(EvidenceUpload.size), 0),
        )
        .select_from(EvidenceDraft)
        .outerjoin(EvidenceUpload, EvidenceUpload.draft_id == EvidenceDraft.id)
        .where(EvidenceDraft.created_by == principal.name, EvidenceDraft.state == OPEN)
    ).one()
    size = int(declared_before)  # PostgreSQL's SUM of a BIGINT is a NUMERIC
    # One draft is always taken, whatever its size: the per-request limit bounds it, and a
    # budget smaller than one request would otherwise refuse it for ever.
    if count and (
        count >= settings.max_open_drafts_per_client
        or size + declared > settings.max_open_draft_bytes_per_client
    ):
        raise Conflict(
            f"this client has {count} open drafts declaring {size} bytes (at most "
            f"{settings.max_open_drafts_per_client} drafts and "
            f"{settings.max_open_draft_bytes_per_client} bytes, this one's {declared} "
            "included): submit or discard some first (DELETE /api/v1/evidence/drafts/{id}); "
            f"a draft idle for {settings.evidence_draft_days:g} days is discarded",
            code="too_many_open_drafts",
        )


def _sealed_document(body: schemas.CreateDraft | schemas.CreateReplyDraft) -> dict[str, Any]:
    if isinstance(body, schemas.CreateReplyDraft):
        return body.document.wire_form()  # as add_message seals it
    return body.document.model_dump(mode="json")


def create_draft(
    session: Session,
    node: Node,
    *,
    body: schemas.CreateDraft | schemas.CreateReplyDraft,
    principal: Principal,
    request_id: str | None = None,
) -> EvidenceDraft:
    """A new request's draft (`CreateDraft`), or a reply's on `request_id`."""
    settings = node.settings
    case = None
    if isinstance(body, schemas.CreateReplyDraft):
        if request_id is None:
            raise TypeError("a reply's draft names its request")
        case = _answered_request(session, request_id, body, principal)
        to = case.peer_authority
    else:
        to = _requested_peer(session, node, body)
    if len(body.attachments) > settings.max_evidence_attachments:
        raise PayloadTooLarge(f"more than {settings.max_evidence_attachments} attachments")
    for number, item in enumerate(body.attachments, start=1):
        if item.size > settings.max_evidence_attachment_bytes:
            # By its place, not its name (case content, which error bodies must not echo).
            raise PayloadTooLarge(
                f"attachment {number} exceeds {settings.max_evidence_attachment_bytes} bytes"
            )
    declared = sum(item.size for item in body.attachments)
    if declared > settings.max_evidence_request_bytes:
        raise PayloadTooLarge(f"attachments exceed {settings.max_evidence_request_bytes} bytes")
    sealed = canonical_json(
        {
            "document": _sealed_document(body),
            "attachments": [
                {"name": item.name, "media_type": item.media_type} for item in body.attachments
            ],
        }
    )
    # Part 0 goes to the peer with the header, in one body under its limit: refused now if
    # the document alone (encrypted later, with the attachments' hashes) is over it.
    refuse_over_wire_limit(settings, len(sealed), 1)
    peer = get_peer(session, to)
    refuse_if_suspended(peer.authority_id, peer.suspended_at)
    _refuse_over_client_budget(session, node, principal, declared)
    msg_id = bytes(random_bytes(MSG_ID_BYTES))
    content_key = bytes(random_bytes(KEY_BYTES))
    now = utc_now()
    keys = node.keys  # once: the wrap and its key id from the same rotation
    draft = EvidenceDraft(
        id=msg_id.hex(),
        request_id=None if case is None else case.id,
        peer_authority=to,
        created_by=principal.name,
        state=OPEN,
        key_kid=keys.encryption_kid,
        key_wrap=bytes(SealedBox(keys.encryption.public_key).encrypt(content_key)),
        sealed_content=bytes(SecretBox(_draft_key(content_key, msg_id)).encrypt(sealed)),
        created_at=now,
        updated_at=now,
    )
    session.add(draft)
    session.flush()
    session.add_all(
        EvidenceUpload(
            draft_id=draft.id,
            part_index=index,
            size=item.size,
            stream_header=new_stream_header(),
        )
        for index, item in enumerate(body.attachments, 1)
    )
    details: dict[str, Any] = {"attachments": len(body.attachments), "bytes": declared}
    if isinstance(body, schemas.CreateReplyDraft):
        details["type"] = body.document.type.value
    record(
        session,
        actor=actor_of(principal),
        action="evidence.draft_created",
        request_id=draft.request_id,
        msg_id=draft.id,
        peer=to,
        details=details,
    )
    session.flush()
    return draft


def get_draft(
    session: Session, draft_id: str, principal: Principal, *, lock: bool = False
) -> EvidenceDraft:
    draft = session.get(EvidenceDraft, draft_id, with_for_update=lock)
    # Drafts are their author's until submitted: another officer sees no such draft.
    if draft is None or draft.created_by != principal.name:
        raise NotFound("no such draft", code="unknown_draft")
    return draft


def is_open_draft_of(session: Session, draft_id: str, principal: Principal) -> bool:
    found = session.scalar(
        select(EvidenceDraft.id).where(
            EvidenceDraft.id == draft_id,
            EvidenceDraft.created_by == principal.name,
            EvidenceDraft.state == OPEN,
        )
    )
    return found is not None


def request_of(session: Session, draft_id: str) -> str:
    """The request whose need-to-know rule covers a draft: the one a reply answers, or the
    one a new request's draft becomes (same id)."""
    answered = session.scalar(select(EvidenceDraft.request_id).where(EvidenceDraft.id == draft_id))
    return answered or draft_id


def _uploads(session: Session, draft: EvidenceDraft) -> list[EvidenceUpload]:
    return list(
        session.scalars(
            select(EvidenceUpload)
            .where(EvidenceUpload.draft_id == draft.id)
            .order_by(EvidenceUpload.part_index)
        )
    )


def _content_key(node: Node, draft: EvidenceDraft) -> bytes:
    private = node.keys.encryption_key_for(draft.key_kid)
    if private is None:
        raise DraftCorrupt("the draft's key was sealed to a key this node no longer has")
    try:
        return bytes(SealedBox(private).decrypt(draft.key_wrap))
    except CryptoError as exc:
        raise DraftCorrupt("the draft's content key does not open") from exc


def _opened_content(node: Node, draft: EvidenceDraft) -> tuple[bytes, dict[str, Any]]:
    content_key = _content_key(node, draft)
    try:
        plain = SecretBox(_draft_key(content_key, bytes.fromhex(draft.id))).decrypt(
            draft.sealed_content
        )
    except CryptoError as exc:
        raise DraftCorrupt("the draft's content does not open") from exc
    content: dict[str, Any] = json.loads(plain)
    return content_key, content


def _shown_sha256(content_key: bytes, msg_id: bytes, row: EvidenceUpload) -> str | None:
    """A complete attachment's hash for its draft's view; null if its record no longer
    opens (the view is how its author finds the draft to discard; submission refuses it)."""
    try:
        return open_sha256(part_key(content_key, msg_id, row.part_index), row)
    except DraftCorrupt:
        return None


def draft_view(
    session: Session, node: Node, store: DirectoryBlobStore, draft: EvidenceDraft
) -> schemas.DraftView:
    content_key, content = _opened_content(node, draft)
    msg_id = bytes.fromhex(draft.id)

    def view(row: EvidenceUpload) -> schemas.UploadView:
        complete = uploaded(store, row)
        return schemas.UploadView(
            index=row.part_index,
            name=content["attachments"][row.part_index - 1]["name"],
            size=row.size,
            offset=staged_offset(store, row),
            complete=complete,
            href=_href(draft.id, row.part_index),
            sha256=_shown_sha256(content_key, msg_id, row) if complete else None,
        )

    return schemas.DraftView(
        id=draft.id,
        to=draft.peer_authority,
        request_id=draft.request_id,
        state=draft.state,
        attachments=[view(row) for row in _uploads(session, draft)],
    )


# --- editing ------------------------------------------------------------------------------


def declared_attachments(
    session: Session, node: Node, draft: EvidenceDraft
) -> list[dict[str, Any]]:
    """An open draft's attachments as declared at its creation: what a new document is
    judged against (evidence names them by index). A submitted one has none to edit."""
    _refuse_if_submitted(draft)
    _, content = _opened_content(node, draft)
    return [
        {"name": item["name"], "media_type": item["media_type"], "size": row.size}
        for item, row in zip(content["attachments"], _uploads(session, draft), strict=True)
    ]


def _refuse_if_submitted(draft: EvidenceDraft) -> None:
    if draft.state != OPEN:
        raise Conflict(
            "this draft was submitted: read or answer it as a request now",
            code="draft_submitted",
        )


def read_document(session: Session, node: Node, draft: EvidenceDraft, principal: Principal) -> Any:
    """Its author reads what an open draft will send (decrypted: on record, as a request's
    read is). A submitted one is read as the request or message it became."""
    _refuse_if_submitted(draft)
    _, content = _opened_content(node, draft)
    record(
        session,
        actor=actor_of(principal),
        action="evidence.draft_document_read",
        request_id=trail_of(draft),
        msg_id=draft.id,
        peer=draft.peer_authority,
    )
    return content["document"]


def replace_document(
    session: Session,
    node: Node,
    draft: EvidenceDraft,
    body: schemas.CreateDraft | schemas.CreateReplyDraft,
    principal: Principal,
) -> Any:
    """Its author's `PUT .../document`: an open draft's document replaced, judged as at its
    creation, its recipient, the request it answers and its attachments (uploaded or not)
    unchanged. A wrong hash attested, or a date passed while tens of GiB uploaded, no longer
    costs the draft and its uploads. `body` is the draft's creation body with the new
    document (validated by the caller)."""
    _refuse_if_submitted(draft)
    if isinstance(body, schemas.CreateReplyDraft):
        _answered_request(session, str(draft.request_id), body, principal)
    else:
        _requested_peer(session, node, body)
    content_key, content = _opened_content(node, draft)
    document = _sealed_document(body)
    sealed = canonical_json({"document": document, "attachments": content["attachments"]})
    refuse_over_wire_limit(node.settings, len(sealed), 1)
    draft.sealed_content = bytes(
        SecretBox(_draft_key(content_key, bytes.fromhex(draft.id))).encrypt(sealed)
    )
    draft.updated_at = utc_now()
    details: dict[str, Any] = {}
    if isinstance(body, schemas.CreateReplyDraft):
        details["type"] = body.document.type.value
    record(
        session,
        actor=actor_of(principal),
        action="evidence.draft_edited",
        request_id=trail_of(draft),
        msg_id=draft.id,
        peer=draft.peer_authority,
        details=details,
    )
    return document


# --- uploading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadTarget:
    draft_id: str
    index: int
    size: int
    upload_id: str
    key: bytes = field(repr=False)  # never in a log line or a traceback
    ad: bytes
    stream_header: bytes
    complete: bool
    request_id: str = ""  # whose audit trail its entries join (`trail_of`)
    submitted: bool = False  # its draft is a request (or a message) now


def trail_of(draft: EvidenceDraft) -> str:
    """The request a draft's audit entries are filed under: the one a reply answers, or the
    one a new request's draft becomes (same id), so that an auditor following one request
    sees its drafts' uploads and discards too."""
    return draft.request_id or draft.id


def upload_target(
    session: Session,
    node: Node,
    store: DirectoryBlobStore,
    *,
    draft_id: str,
    index: int,
    principal: Principal,
    start_again: bool = False,
) -> tuple[UploadTarget, EvidenceUpload]:
    """With `start_again` (in a unit of work, before an upload): an attachment whose blob is
    gone is made one to upload again (`uploaded`)."""
    draft = get_draft(session, draft_id, principal)
    query = select(EvidenceUpload).where(
        EvidenceUpload.draft_id == draft.id, EvidenceUpload.part_index == index
    )
    # Locked to start it again (PostgreSQL; SQLite's writer lock is held already): of two
    # uploads at once, one renews the stream header, and the other sees it renewed.
    if start_again:
        query = query.with_for_update().execution_options(populate_existing=True)
    row = session.scalar(query)
    if row is None:
        raise NotFound("no such attachment in this draft", code="unknown_attachment")
    if start_again and draft.state == OPEN and row.digest is not None and not uploaded(store, row):
        _start_again(session, row, lost=row.digest, draft=draft)
    msg_id = bytes.fromhex(draft.id)
    content_key = _content_key(node, draft)
    target = UploadTarget(
        draft_id=draft.id,
        index=index,
        size=row.size,
        upload_id=upload_id(draft.id, index),
        key=part_key(content_key, msg_id, index),
        ad=part_ad(msg_id, index),
        stream_header=row.stream_header,
        complete=row.digest is not None or draft.state != OPEN,
        request_id=trail_of(draft),
        submitted=draft.state != OPEN,
    )
    return target, row


def upload_is_current(session: Session, target: UploadTarget) -> bool:
    """Is `target` still what to write: an unfinished attachment of an open draft, under the
    stream header it was read with? Asked again once its staging file is locked: a discard
    and a start again (`renew_stream_header`, after its file went) both follow that lock or
    its file's removal, so the answer holds until the upload lets the lock go. Bytes written
    under a header renewed since would reuse a key stream whose ciphertext may remain."""
    found = session.scalar(
        select(EvidenceUpload.id)
        .join(EvidenceDraft, EvidenceDraft.id == EvidenceUpload.draft_id)
        .where(*_unfinished_under(target), EvidenceDraft.state == OPEN)
    )
    return found is not None


def new_stream_header() -> bytes:
    return bytes(random_bytes(STREAM_HEADER_BYTES))


def start_stream(session: Session, target: UploadTarget, stream_header: bytes) -> bool:
    """Put `stream_header` in place of the one `target` was read with, for an attachment
    whose staging file holds nothing yet (its lock held): every encryption from the first
    byte is under a header never used before. Whatever may remain of an earlier start (a
    blob published but not recorded, or one another request is recording, a torn first
    chunk) was made under another key stream (from review). False, and nothing changed, if
    the attachment is no longer as read (`upload_is_current`)."""
    opened = (
        select(EvidenceDraft.id)
        .where(EvidenceDraft.id == target.draft_id, EvidenceDraft.state == OPEN)
        .exists()
    )
    changed = session.execute(
        update(EvidenceUpload)
        .where(*_unfinished_under(target), opened)
        .values(stream_header=stream_header)
    )
    return bool(getattr(changed, "rowcount", 0))


def _unfinished_under(target: UploadTarget) -> tuple[ColumnElement[bool], ...]:
    """`target`'s attachment while unfinished and still under the header it was read with
    (never a finished one: its blob opens with the header it has)."""
    return (
        EvidenceUpload.draft_id == target.draft_id,
        EvidenceUpload.part_index == target.index,
        EvidenceUpload.stream_header == target.stream_header,
        EvidenceUpload.digest.is_(None),
    )


def _start_again(session: Session, row: EvidenceUpload, *, lost: str, draft: EvidenceDraft) -> None:
    """An attachment whose blob is gone: uploaded again from its first byte, under a new
    stream header (the lost blob's key stream is never used again), and on record."""
    row.digest = None
    row.length = None
    row.sealed_sha256 = None
    row.plaintext_sha256 = None
    row.stream_header = new_stream_header()
    record(
        session,
        actor="node",
        action="evidence.upload_restarted",
        outcome="blob_missing",
        request_id=trail_of(draft),
        msg_id=draft.id,
        details={"attachment": row.part_index, "detail": f"blob {lost} is missing"},
    )
    session.flush()


def renew_stream_header(session: Session, target: UploadTarget) -> None:
    """A new stream header for an attachment started again from its first byte: chunks
    encrypted under the old one and thrown away must never be encrypted again, with other
    bytes, under the same key stream (app/evidence/router.py). Only while the row still has
    the header `target` wrote under: another request that started the attachment since, under
    a header of its own, keeps it (its chunks are under that one, from review)."""
    session.execute(
        update(EvidenceUpload)
        .where(*_unfinished_under(target))
        .values(stream_header=new_stream_header())
    )


def _removed(writer: PartWriter) -> bool:
    try:
        return writer.removed()
    except OSError:  # cannot tell (a stale network file system): not kept on that doubt
        return True


class WriterCache:
    """Writers kept between a client's successive PATCH requests in this process, so that
    only a restart (or a long pause) costs a rebuild from the stored chunks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writers: dict[str, tuple[PartWriter, float]] = {}
        self._timer: threading.Timer | None = None

    def purge(self) -> None:
        """Closes the writers idle too long, and those whose staging file was removed (a
        draft discarded through another process, or by the sweep): each holds its file's
        space allocated while it stays open."""
        now = time.monotonic()
        with self._lock:
            for name, (idle, since) in list(self._writers.items()):
                if now - since > IDLE_WRITER_SECONDS or _removed(idle):
                    idle.close()
                    del self._writers[name]
            self._timer = None
            if self._writers:  # the rest are looked at again once they could be idle
                self._schedule()

    def _schedule(self) -> None:
        """A purge IDLE_WRITER_SECONDS from now, if none is due (with `_lock` held): a
        process whose clients stop uploading closes its writers all the same."""
        if self._timer is None:
            self._timer = threading.Timer(IDLE_WRITER_SECONDS + 1, self.purge)
            self._timer.daemon = True
            self._timer.start()

    def take(self, store: DirectoryBlobStore, target: UploadTarget) -> PartWriter:
        self.purge()
        with self._lock:
            cached = self._writers.pop(target.upload_id, None)
        if cached is not None:
            writer = cached[0]
            try:
                # Under the header the row has now: one renewed since (a restart) means
                # what this writer holds is not what the attachment is any more.
                if writer.stream_header == target.stream_header and writer.resume():
                    return writer
            except UploadBusy:
                writer.close()  # written elsewhere now: rebuilt when that request is over
                raise
            writer.close()  # written elsewhere since (another replica): rebuild from it
        return PartWriter.open(
            store,
            target.upload_id,
            key=target.key,
            ad=target.ad,
            stream_header=target.stream_header,
            size=target.size,
        )

    def put_back(self, upload: str, writer: PartWriter) -> None:
        if writer.broken:  # the next request rebuilds a writer from the stored chunks
            writer.close()
            return
        writer.drop_pending()
        try:
            # Unlocked between requests: a client may resume through another replica.
            writer.suspend()
        except (OSError, BlobError):
            writer.close()
            return
        with self._lock:
            self._writers[upload] = (writer, time.monotonic())
            evicted = least_recent_past(self._writers, MOST_KEPT_WRITERS)
            self._schedule()
        for old in evicted:
            old.close()

    def forget(self, upload_ids: tuple[str, ...]) -> None:
        """Closes the idle writers of uploads just discarded: each holds its removed staging
        file open, and the disk space with it."""
        with self._lock:
            idle = [self._writers.pop(name, None) for name in upload_ids]
        for cached in idle:
            if cached is not None:
                cached[0].close()

    def close(self) -> None:
        with self._lock:
            for writer, _ in self._writers.values():
                writer.close()
            self._writers.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


# The writers of this process, kept between requests (app/evidence/router.py); the hourly
# sweep purges them too (app/evidence/cleanup.py).
WRITERS = WriterCache()


# A Conflict's code for an upload whose attachment changed under it (app/evidence/router.py).
UPLOAD_CHANGED = "upload_changed"


def record_uploaded(
    session: Session, *, target: UploadTarget, part: FinishedPart, principal: Principal
) -> None:
    # The draft's row first, as a discard takes it (then the attachments'): taken in the
    # other order, a discard and the end of an upload could each wait for the other
    # (PostgreSQL). It also marks the draft's last activity: one idle for
    # `evidence_draft_days` is discarded (below).
    touched = session.execute(
        update(EvidenceDraft)
        .where(EvidenceDraft.id == target.draft_id, EvidenceDraft.state == OPEN)
        .values(updated_at=utc_now())
    )
    row = session.scalar(
        select(EvidenceUpload)
        .where(
            EvidenceUpload.draft_id == target.draft_id,
            EvidenceUpload.part_index == target.index,
        )
        # Locked until recorded: a start again (`start_stream`) waits, then finds it done
        # (PostgreSQL; SQLite's writer lock is held already, from review).
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if not getattr(touched, "rowcount", 0) or row is None:
        # Discarded while its last bytes arrived: the blob just published is named by no
        # row, and the hourly sweep removes it (app/evidence/cleanup.py).
        raise NotFound("no such draft", code="unknown_draft")
    if row.digest is not None or row.stream_header != target.stream_header:
        # Another request started the attachment again meanwhile (under a header of its
        # own): its bytes, not these, are what it will record; this blob is named by no
        # row and swept like a discarded one. Never replaced silently (from review).
        raise Conflict(
            "this attachment was started again by another upload; ask HEAD where to resume",
            code=UPLOAD_CHANGED,
        )
    row.digest = part.digest
    row.length = part.length
    row.sealed_sha256 = seal_sha256(target.key, part.plaintext_sha256)
    row.plaintext_sha256 = None
    record(
        session,
        actor=actor_of(principal),
        action="evidence.uploaded",
        request_id=target.request_id or target.draft_id,
        msg_id=target.draft_id,
        details={"index": target.index, "size": part.plaintext_size, "sha256": part.digest},
    )


# --- discarding ---------------------------------------------------------------------------

BY_AUTHOR = "by_author"
EXPIRED = "expired"


@dataclass(frozen=True)
class Discarded:
    """What a discarded draft leaves in the blob store, to remove once its rows are gone."""

    draft_id: str
    upload_ids: tuple[str, ...]
    digests: tuple[str, ...]


def _hold_uploads(
    store: DirectoryBlobStore, held: contextlib.ExitStack, draft_id: str, indexes: list[int]
) -> None:
    """Locks every staging file of the draft until `held` closes (after the commit): an
    upload running on any process of the node holds one, and raises UploadBusy here; one
    that starts meanwhile is refused as busy, and its next try finds the draft gone."""
    for index in indexes:
        held.enter_context(store.upload(upload_id(draft_id, index)))


def _discard(
    session: Session,
    draft: EvidenceDraft,
    uploads: list[EvidenceUpload],
    *,
    actor: str,
    outcome: str,
) -> Discarded:
    """Removes the draft's rows, on record, in the caller's unit of work (its staging files
    locked by the caller). With its row goes the node's copy of its content key (`key_wrap`):
    whatever of its ciphertext remains on its disk no longer opens with what the node holds
    (a database backup taken before keeps the key: docs/operations.md)."""
    session.execute(delete(EvidenceUpload).where(EvidenceUpload.draft_id == draft.id))
    session.delete(draft)
    record(
        session,
        actor=actor,
        action="evidence.draft_discarded",
        outcome=outcome,
        request_id=trail_of(draft),
        msg_id=draft.id,
        peer=draft.peer_authority,
        details={
            "attachments": len(uploads),
            "complete": sum(1 for row in uploads if row.digest is not None),
            "bytes": sum(row.size for row in uploads),
        },
    )
    session.flush()
    return Discarded(
        draft_id=draft.id,
        upload_ids=tuple(upload_id(draft.id, row.part_index) for row in uploads),
        digests=tuple(row.digest for row in uploads if row.digest is not None),
    )


def discard_draft(
    session: Session,
    store: DirectoryBlobStore,
    held: contextlib.ExitStack,
    *,
    draft_id: str,
    principal: Principal,
) -> Discarded:
    """Its author's `DELETE`: an open draft goes, with its uploads; a submitted one is a
    request, and stays."""
    draft = get_draft(session, draft_id, principal, lock=True)
    if draft.state != OPEN:
        raise Conflict("this draft was submitted: it is a request now", code="draft_submitted")
    uploads = _uploads(session, draft)
    try:
        _hold_uploads(store, held, draft.id, [row.part_index for row in uploads])
    except UploadBusy as exc:
        raise Conflict(
            "an upload of this draft is in progress; discard it once that request ends",
            code="upload_busy",
        ) from exc
    return _discard(session, draft, uploads, actor=actor_of(principal), outcome=BY_AUTHOR)


def idle_draft_ids(session: Session, *, idle_days: float, now: datetime) -> list[str]:
    """Open drafts untouched for `idle_days` (no upload finished since), oldest first, at
    most 100 a sweep (the rest an hour later)."""
    cutoff = now - timedelta(days=idle_days)
    return list(
        session.scalars(
            select(EvidenceDraft.id)
            .where(EvidenceDraft.state == OPEN, EvidenceDraft.updated_at < cutoff)
            .order_by(EvidenceDraft.updated_at)
            .limit(100)
        )
    )


def discard_if_idle(
    session: Session,
    store: DirectoryBlobStore,
    held: contextlib.ExitStack,
    *,
    draft_id: str,
    idle_days: float,
    now: datetime,
) -> Discarded | None:
    """One draft abandoned by the system that made them (idle for `idle_days`: no upload
    finished and no staging file written since) goes with its uploads, on record, in the
    caller's unit of work. None if it is not idle after all: being submitted or uploaded
    to right now, or written to lately."""
    cutoff = now - timedelta(days=idle_days)
    draft = session.scalar(
        select(EvidenceDraft)
        .where(
            EvidenceDraft.id == draft_id,
            EvidenceDraft.state == OPEN,
            EvidenceDraft.updated_at < cutoff,
        )
        .with_for_update(skip_locked=True)
    )
    if draft is None:
        return None
    uploads = _uploads(session, draft)
    indexes = [row.part_index for row in uploads]
    if any(_written_since(store, upload_id(draft.id, i), cutoff) for i in indexes):
        return None
    try:
        _hold_uploads(store, held, draft.id, indexes)
    except BlobError:  # being uploaded to (UploadBusy), or unreadable: not this time
        return None
    return _discard(session, draft, uploads, actor="node", outcome=EXPIRED)


def _written_since(store: DirectoryBlobStore, name: str, cutoff: datetime) -> bool:
    try:
        mtime = (store.uploads / name).stat().st_mtime
    except FileNotFoundError:
        return False
    return mtime >= cutoff.timestamp()


def remove_discarded(store: DirectoryBlobStore, discarded: Discarded) -> None:
    """After the commit (and while the staging files are still locked): the files go now
    rather than with the hourly sweep. A blob is named by its ciphertext's hash, under a
    key only this draft had: no other row can name it."""
    for name in discarded.upload_ids:
        store.discard_upload(name)
    for digest in discarded.digests:
        store.delete(digest)


# --- submitting ---------------------------------------------------------------------------


def submit_draft(
    session: Session,
    node: Node,
    store: DirectoryBlobStore,
    *,
    draft_id: str,
    principal: Principal,
    now: datetime | None = None,
) -> tuple[CaseFile, Message]:
    """`now`: the moment a reply's dates are judged against (the route's clock)."""
    draft = get_draft(session, draft_id, principal, lock=True)
    if draft.state != OPEN:
        raise Conflict("this draft was already submitted", code="draft_submitted")
    uploads = _uploads(session, draft)
    missing = [
        row.part_index for row in uploads if row.digest is None or not store.exists(row.digest)
    ]
    if missing:
        raise Conflict(f"attachments {missing} are not completely uploaded", code="incomplete")
    content_key, content = _opened_content(node, draft)
    msg_id = bytes.fromhex(draft.id)
    hashes = [open_sha256(part_key(content_key, msg_id, row.part_index), row) for row in uploads]
    if draft.request_id is None:
        case, head = _seal_request(session, node, draft, content, uploads, hashes, principal)
    else:
        case, head = _seal_reply(
            session, node, draft, content, uploads, hashes, principal, now or utc_now()
        )
    message = _queue_sealed(session, node, draft, case, head, uploads, principal)
    for row in uploads:  # a hash in clear from before it was sealed: the manifest holds it
        row.plaintext_sha256 = None
    draft.state = SUBMITTED
    draft.updated_at = message.created_at
    return case, message


@dataclass(frozen=True)
class _Sealed:
    head: SealedHead
    created_at: datetime
    in_reply_to: str | None
    moved: dict[str, object]  # the move the message made to its request, if any


def _seal(
    node: Node,
    draft: EvidenceDraft,
    content: dict[str, Any],
    uploads: list[EvidenceUpload],
    hashes: list[str],
    *,
    peer: PinnedKeys,
    sealed_content: dict[str, Any],
    case_id: str | None,
    in_reply_to: str | None,
    now: datetime,
) -> SealedHead:
    head = seal_streamed(
        sender_keys=node.keys,
        sender_authority=node.authority_id,
        recipient=Recipient(peer.authority_id, peer.encryption_key),
        msg_id=bytes.fromhex(draft.id),
        content_key=_content_key(node, draft),
        content=sealed_content,
        attachments=[
            StreamedAttachment(
                name=content["attachments"][row.part_index - 1]["name"],
                media_type=content["attachments"][row.part_index - 1]["media_type"],
                stream_header=row.stream_header,
                part=FinishedPart(
                    digest=str(row.digest),
                    length=int(row.length or 0),
                    plaintext_sha256=sha256,
                    plaintext_size=row.size,
                ),
            )
            for row, sha256 in zip(uploads, hashes, strict=True)
        ],
        conversation_id=case_id,
        in_reply_to=in_reply_to,
        created_at=now,
        ttl=timedelta(seconds=node.settings.envelope_ttl_seconds),
        manifest_stream_header=None,
    )
    refuse_over_wire_limit(node.settings, len(head.header) + len(head.manifest_part), 1)
    return head


def _seal_request(
    session: Session,
    node: Node,
    draft: EvidenceDraft,
    content: dict[str, Any],
    uploads: list[EvidenceUpload],
    hashes: list[str],
    principal: Principal,
) -> tuple[CaseFile, _Sealed]:
    """A draft that opens a request: its id is the request's."""
    peer = pinned_peer(session, draft.peer_authority)
    now = utc_now()
    head = _seal(
        node,
        draft,
        content,
        uploads,
        hashes,
        peer=peer,
        sealed_content={"kind": "request", "document": content["document"]},
        case_id=None,
        in_reply_to=None,
        now=now,
    )
    document = RequestDocument.model_validate(content["document"])
    case = CaseFile(
        id=draft.id,
        direction="outbound",
        peer_authority=peer.authority_id,
        status=QUEUED,
        urgency=document.urgency.level.value,
        created_at=now,
        updated_at=now,
    )
    conversation.set_deadlines(case, node.settings, document, now=now)
    session.add(case)
    session.flush()
    record(
        session,
        actor=actor_of(principal),
        action="request.submitted",
        request_id=case.id,
        msg_id=draft.id,
        peer=peer.authority_id,
        details={"attachments": len(uploads), "urgency": case.urgency, "streamed": True},
    )
    return case, _Sealed(head, now, None, {})


def _seal_reply(
    session: Session,
    node: Node,
    draft: EvidenceDraft,
    content: dict[str, Any],
    uploads: list[EvidenceUpload],
    hashes: list[str],
    principal: Principal,
    judged_at: datetime,
) -> tuple[CaseFile, _Sealed]:
    """A draft that answers a request: judged, sealed and moved as `add_message` does for a
    message with inline attachments (app/requests/service.py), from where the request is now,
    and its dates by the clock now: a postponement drafted for tomorrow and submitted days
    later would make the request overdue at once (from review)."""
    case = visible_case(session, str(draft.request_id), principal, lock=True)
    document = MessageDocument.model_validate(content["document"])
    skew = timedelta(seconds=node.settings.clock_skew_seconds)
    dated = list(
        document.date_problems(today=judged_at.astimezone(UTC).date(), latest=judged_at + skew)
    )
    if dated:
        where = ", ".join(".".join(str(part) for part in ("document", *loc)) for loc, *_ in dated)
        raise Conflict(
            f"{where}: {dated[0][2]}, as the draft stands now: replace its document "
            f"(PUT /api/v1/evidence/drafts/{draft.id}/document)",
            code=dated[0][1],
        )
    mismatched = [loc for loc, _code, _message, _value in document.attachment_problems(hashes)]
    if mismatched:
        # Where, not what: the hashes are the evidence's, and error bodies reach logs.
        where = ", ".join(".".join(str(part) for part in ("document", *loc)) for loc in mismatched)
        raise Conflict(
            f"the SHA-256 attested at {where} is not that of the uploaded attachment: "
            f"replace the draft's document with the right hash (PUT "
            f"/api/v1/evidence/drafts/{draft.id}/document): its uploads are kept",
            code="evidence_hash_mismatch",
        )
    before = moves.Before.of(case)
    now = utc_now()
    conversation.send(case, document=document, now=now)
    peer = pinned_peer(session, case.peer_authority)
    follows = message_to_follow(session, case.id)
    head = _seal(
        node,
        draft,
        content,
        uploads,
        hashes,
        peer=peer,
        sealed_content={"kind": "message", "document": content["document"]},
        case_id=case.id,
        in_reply_to=follows,
        now=now,
    )
    if document.type is MessageType.ADDITIONAL_INFORMATION_REQUEST:
        case.question_msg_id = draft.id  # the answer must follow this one
    record(
        session,
        actor=actor_of(principal),
        action="message.submitted",
        request_id=case.id,
        msg_id=draft.id,
        peer=case.peer_authority,
        details={
            "type": document.type.value,
            "status": case.status,
            "attachments": len(uploads),
            "streamed": True,
        },
    )
    return case, _Sealed(head, now, follows, moves.move_columns(before, case))


def _queue_sealed(
    session: Session,
    node: Node,
    draft: EvidenceDraft,
    case: CaseFile,
    sealed: _Sealed,
    uploads: list[EvidenceUpload],
    principal: Principal,
) -> Message:
    """Store the sealed head with its parts in the blob store, queue it, on record."""
    head = sealed.head
    size = len(head.header) + len(head.manifest_part) + sum(int(r.length or 0) for r in uploads)
    expires_at = sealed.created_at + timedelta(seconds=node.settings.envelope_ttl_seconds)
    message = Message(
        msg_id=draft.id,
        request_id=case.id,
        direction="outbound",
        sender_authority=node.authority_id,
        recipient_authority=case.peer_authority,
        in_reply_to=sealed.in_reply_to,
        created_at=sealed.created_at,
        expires_at=expires_at,
        received_at=None,
        header=head.header,
        signature=head.signature,
        envelope_hash=head.envelope_hash,
        size_bytes=size,
    )
    session.add(message)
    session.flush()
    session.add(Part(message_id=message.id, part_index=0, ciphertext=head.manifest_part))
    session.add_all(
        BlobPart(
            message_id=message.id,
            part_index=row.part_index,
            digest=str(row.digest),
            length=int(row.length or 0),
        )
        for row in uploads
    )
    outbox.enqueue(
        session,
        node.outbox_signal,
        message_id=message.id,
        size_bytes=size,
        case=case,
        now=sealed.created_at,
        message_expires_at=expires_at,
        moved=sealed.moved or None,
    )
    record(
        session,
        actor=actor_of(principal),
        action="envelope.sealed",
        request_id=case.id,
        msg_id=draft.id,
        peer=case.peer_authority,
        details={"envelope_hash": head.envelope_hash, "size": size},
    )
    return message

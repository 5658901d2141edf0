"""Submitting requests and messages, listing and reading them.

Sealing happens in the HTTP request's unit of work: the message row, its sealed parts, its
outbox row and the audit entries commit together, so an accepted request is never lost and
never exists without its record. Decryption happens only for an authorised reader, and each
read is itself an audit entry.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import or_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.audit.log import Event, record, record_many
from app.auth.service import Principal
from app.clock import in_utc
from app.crypto.encoding import b64e, sha256_hex, utc_now
from app.crypto.envelope import (
    Attachment,
    EnvelopeError,
    Header,
    Opened,
    Recipient,
    WireEnvelope,
    open_envelope,
    parse_header,
    seal,
)
from app.crypto.randomness import SystemRandomness
from app.crypto.receipts import Receipt as VerifiedReceipt
from app.crypto.receipts import ReceiptError, SignedReceipt, verify_receipt
from app.crypto.signing import DOMAIN_ENVELOPE, verify
from app.db import UnreadableValue, unreadable
from app.delivery import outbox
from app.delivery.outbox import CANCELLED, FAILED
from app.domain.document import RequestDocument
from app.domain.messages import MessageDocument, MessageType
from app.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    StoredDataCorrupt,
    StoredEnvelopeCorrupt,
)
from app.evidence.reading import has_blob_parts, open_stored_head
from app.limits import refuse_over_wire_limit
from app.models import CaseFile, Message, OutboxItem, Peer, Receipt
from app.node import Node
from app.peers.keys import (
    PinnedKeys,
    pinned_keys,
    stored_envelope_signer,
    stored_receipt_signer,
)
from app.peers.service import refuse_if_suspended
from app.requests import access, conversation, deadlines, lifecycle, moves, schemas
from app.requests.status import QUEUED
from app.requests.store import StoredMessage, load_envelope, row_disagrees, store_envelope

OUTBOUND = "outbound"
INBOUND = "inbound"


# The tables of what a peer sent or this node sealed: damage there is the message's.
ENVELOPE_TABLES = frozenset({"messages", "parts", "receipts", "blob_parts"})


@contextmanager
def audited_if_corrupt(**entry: Any) -> Iterator[None]:
    """A read stopped by a damaged stored envelope leaves its trace in the audit log. A value
    the database cannot give back at all (SQLite TEXT that is not UTF-8 in place of its
    bytes, a PostgreSQL time of 'infinity') is the same damage, told as such (from review:
    it was 503 "retry later"): the message's when it is in the message's rows, else
    `stored_data_corrupt` naming the row's column (from review: a damaged `peers.name`
    was told as "a stored message of ..." damaged)."""

    def audited(exc: StoredEnvelopeCorrupt | StoredDataCorrupt) -> None:
        exc.audit = {**entry, "outcome": exc.code}
        exc.audit["details"] = {**entry.get("details", {}), "detail": exc.detail[:200]}

    try:
        yield
    except (StoredEnvelopeCorrupt, StoredDataCorrupt) as exc:
        audited(exc)
        raise
    except (DBAPIError, UnreadableValue) as exc:
        found = unreadable(exc)
        if found is None:
            raise
        damage: StoredEnvelopeCorrupt | StoredDataCorrupt
        if found.column is not None and found.column.split(".")[0] in ENVELOPE_TABLES:
            which = entry.get("msg_id") or entry.get("request_id")
            damage = StoredEnvelopeCorrupt(
                f"a stored message of {which}: its column '{found.column}' cannot be read "
                f"({found.why}); storage was altered or damaged"
            )
        else:
            damage = StoredDataCorrupt.of_column(found.column, found.why)
        audited(damage)
        raise damage from exc


@dataclass(frozen=True)
class Download:
    name: str
    media_type: str
    sha256: str
    data: bytes


def actor_of(principal: Principal) -> str:
    return f"client:{principal.name}"


def _attachments(node: Node, items: list[schemas.InlineAttachment]) -> list[Attachment]:
    attachments = []
    for number, item in enumerate(items, start=1):
        data = item.content()
        if len(data) > node.settings.max_attachment_bytes:
            # By its place, not its name: a file name is case content, and error bodies
            # end up in the calling system's logs.
            raise PayloadTooLarge(
                f"attachment {number} exceeds {node.settings.max_attachment_bytes} bytes"
            )
        attachments.append(Attachment(name=item.name, media_type=item.media_type, data=data))
    return attachments


def pinned_peer(session: Session, authority_id: str) -> PinnedKeys:
    peer = pinned_keys(session, authority_id)
    if peer is None:  # as app.peers.service.get_peer says it
        raise NotFound(f"{authority_id} is not a pinned peer", code="unknown_peer")
    refuse_if_suspended(peer.authority_id, peer.suspended_at)
    return peer


def _seal_and_queue(
    session: Session,
    node: Node,
    *,
    case_id: str | None,
    peer: PinnedKeys,
    content: dict[str, Any],
    attachments: list[Attachment],
    in_reply_to: str | None,
) -> tuple[WireEnvelope, Header]:
    envelope = seal(
        sender_keys=node.keys,
        sender_authority=node.authority_id,
        recipient=Recipient(peer.authority_id, peer.encryption_key),
        content=content,
        attachments=attachments,
        conversation_id=case_id,
        in_reply_to=in_reply_to,
        created_at=utc_now(),
        ttl=timedelta(seconds=node.settings.envelope_ttl_seconds),
        randomness=SystemRandomness(),
    )
    sealed = len(envelope.header) + sum(len(part) for part in envelope.parts)
    refuse_over_wire_limit(node.settings, sealed, len(envelope.parts))
    return envelope, parse_header(envelope.header, len(envelope.parts))


def _store_outbound(
    session: Session,
    node: Node,
    *,
    case: CaseFile,
    envelope: WireEnvelope,
    header: Header,
    actor: str,
    before: Sequence[Event] = (),
    after: Sequence[Event] = (),
    moved: Mapping[str, object] | None = None,
) -> StoredMessage:
    """Store a sealed envelope, queue it, and record `envelope.sealed` with the caller's own
    entries (`before` and `after` it): one audit statement, one round trip to PostgreSQL."""
    message = store_envelope(
        session, case=case, envelope=envelope, header=header, direction=OUTBOUND, received_at=None
    )
    outbox.enqueue(
        session,
        node.outbox_signal,
        message_id=message.id,
        size_bytes=message.size_bytes,
        case=case,
        now=utc_now(),
        message_expires_at=header.expires_at,
        moved=moved,
    )
    sealed = Event(
        actor=actor,
        action="envelope.sealed",
        request_id=case.id,
        msg_id=header.msg_id,
        peer=case.peer_authority,
        details={"envelope_hash": envelope.envelope_hash, "size": message.size_bytes},
    )
    record_many(session, [*before, sealed, *after])
    return message


def submit_request(
    session: Session, node: Node, *, body: schemas.SubmitRequest, principal: Principal
) -> tuple[CaseFile, StoredMessage]:
    document = body.document
    if document.requesting_authority != node.authority_id:
        raise BadRequest(
            f"document.requesting_authority must be this node's authority, {node.authority_id}",
            code="wrong_requesting_authority",
        )
    if document.requested_authority != body.to:
        raise BadRequest("document.requested_authority must equal 'to'", code="recipient_mismatch")
    peer = pinned_peer(session, body.to)
    envelope, header = _seal_and_queue(
        session,
        node,
        case_id=None,
        peer=peer,
        content={"kind": "request", "document": document.model_dump(mode="json")},
        attachments=_attachments(node, body.attachments),
        in_reply_to=None,
    )
    now = utc_now()
    case = CaseFile(
        id=header.conversation_id,
        direction=OUTBOUND,
        peer_authority=peer.authority_id,
        status=QUEUED,
        urgency=document.urgency.level.value,
        created_at=now,
        updated_at=now,
    )
    conversation.set_deadlines(case, node.settings, document, now=now)
    session.add(case)
    session.flush()
    submitted = Event(
        actor=actor_of(principal),
        action="request.submitted",
        request_id=case.id,
        msg_id=header.msg_id,
        peer=peer.authority_id,
        details={"attachments": len(body.attachments), "urgency": case.urgency},
    )
    message = _store_outbound(
        session,
        node,
        case=case,
        envelope=envelope,
        header=header,
        actor=actor_of(principal),
        before=[submitted],
    )
    return case, message


def get_case(session: Session, request_id: str, *, lock: bool = False) -> CaseFile:
    case = (
        session.get(CaseFile, request_id, with_for_update=lock) if len(request_id) == 32 else None
    )
    if case is None:
        raise NotFound("no such request", code="unknown_request")
    return case


def visible_case(
    session: Session, request_id: str, principal: Principal, *, lock: bool = False
) -> CaseFile:
    """The request, in the route's own transaction, if this officer may see it now: the
    route's first check (`access.check_visible`, audited) ran in a transaction before, and an
    administrator's restriction committed between the two must still hold. Refused as
    unknown, like the first check (that check's audit entry is the record of the attempt;
    this one only closes the gap)."""
    case = get_case(session, request_id, lock=lock)
    if not access.may_see(session, case, principal):
        raise NotFound("no such request", code="unknown_request")
    return case


def message_to_follow(session: Session, request_id: str) -> str | None:
    """The message a new one of this request replies to (its `in_reply_to`): the latest.
    The peer accepts a message only after the one it replies to; a message of ours the peer
    refused for good will never be there, so it is not the one to follow."""
    return session.scalar(
        select(Message.msg_id)
        .outerjoin(OutboxItem, OutboxItem.message_id == Message.id)
        .where(
            Message.request_id == request_id,
            or_(OutboxItem.id.is_(None), OutboxItem.state.not_in((FAILED, CANCELLED))),
        )
        .order_by(Message.id.desc())
        .limit(1)
    )


def add_message(
    session: Session,
    node: Node,
    *,
    request_id: str,
    body: schemas.SubmitMessage,
    principal: Principal,
) -> tuple[CaseFile, StoredMessage]:
    case = visible_case(session, request_id, principal, lock=True)
    before = moves.Before.of(case)
    # The lifecycle judges the move before anything is sealed: 409 message_not_allowed or
    # transition_not_allowed, and the peer applies the same rule when the envelope arrives.
    conversation.send(case, document=body.document, now=utc_now())
    peer = pinned_peer(session, case.peer_authority)
    latest = message_to_follow(session, case.id)
    envelope, header = _seal_and_queue(
        session,
        node,
        case_id=case.id,
        peer=peer,
        content={"kind": "message", "document": body.document.wire_form()},
        attachments=_attachments(node, body.attachments),
        in_reply_to=latest,
    )
    if body.document.type is MessageType.ADDITIONAL_INFORMATION_REQUEST:
        case.question_msg_id = header.msg_id  # the answer must follow this one
    added = Event(
        actor=actor_of(principal),
        action="message.submitted",
        request_id=case.id,
        msg_id=header.msg_id,
        peer=case.peer_authority,
        details={"type": body.document.type.value, "status": case.status},
    )
    message = _store_outbound(
        session,
        node,
        case=case,
        envelope=envelope,
        header=header,
        actor=actor_of(principal),
        after=[added],
        moved=moves.move_columns(before, case),
    )
    return case, message


# --- listing ------------------------------------------------------------------------------


def _encode_cursor(case: CaseFile) -> str:
    # Full precision: a cursor rounded to the second would skip rows of that second.
    raw = f"{case.created_at.isoformat()}|{case.id}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, _, case_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None or "\x00" in case_id:
            raise ValueError("a cursor's moment has a zone, and its id no NUL")
        moment = in_utc(moment)
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc
    return moment, case_id


def list_requests(
    session: Session,
    *,
    direction: str | None,
    status: str | None,
    peer: str | None,
    limit: int,
    cursor: str | None,
    principal: Principal,
    now: datetime,
    overdue: bool | None = None,
    due_before: datetime | None = None,
) -> schemas.RequestPage:
    # Restricted requests this officer is not named on do not exist for them.
    statement = select(CaseFile).where(access.visible_to(principal.name))
    if overdue is True:
        statement = statement.where(CaseFile.due_at < now)
    elif overdue is False:
        statement = statement.where(or_(CaseFile.due_at.is_(None), CaseFile.due_at >= now))
    if due_before is not None:
        statement = statement.where(CaseFile.due_at < due_before)
    if direction is not None:
        statement = statement.where(CaseFile.direction == direction)
    if status is not None:
        statement = statement.where(CaseFile.status == status)
    if peer is not None:
        statement = statement.where(CaseFile.peer_authority == peer)
    if cursor is not None:
        created, case_id = _decode_cursor(cursor)
        statement = statement.where(
            or_(
                CaseFile.created_at < created,
                (CaseFile.created_at == created) & (CaseFile.id < case_id),
            )
        )
    # Newest first; the id breaks ties so pages never overlap or skip.
    statement = statement.order_by(CaseFile.created_at.desc(), CaseFile.id.desc())
    cases = list(session.scalars(statement.limit(limit + 1)))
    more = len(cases) > limit
    cases = cases[:limit]
    return schemas.RequestPage(
        items=[summary(case, now=now) for case in cases],
        next_cursor=_encode_cursor(cases[-1]) if more else None,
    )


def summary(case: CaseFile, *, now: datetime) -> schemas.RequestSummary:
    return schemas.RequestSummary(
        id=case.id,
        direction=case.direction,
        peer=case.peer_authority,
        status=case.status,
        urgency=case.urgency,
        created_at=case.created_at,
        updated_at=case.updated_at,
        due_at=case.due_at,
        overdue=deadlines.is_overdue(case.due_at, now),
        deadlines=schemas.DeadlinesView(
            requested_date=case.requested_date,
            acknowledge_by=case.acknowledge_by,
            decide_by=case.decide_by,
            execute_by=case.execute_by,
            postponed_until=case.postponed_until,
        ),
        handling=case.handling,
        restricted=case.restricted,
    )


# --- reading ------------------------------------------------------------------------------


def _signer_key(session: Session, node: Node, message: Message, envelope: WireEnvelope) -> bytes:
    """The key pinned for its signer when it was stored: either side may have rotated since.
    Empty (never verifies) if no key of that id was ever pinned."""
    key = stored_envelope_signer(
        session,
        node.keys,
        outbound=message.direction == OUTBOUND,
        sender=message.sender_authority,
        header=envelope.header,
        parts=len(envelope.parts),
    )
    return key or b""


def _part_sha256(message: Message, index: int, attachments: int) -> str:
    return parse_header(message.header, attachments + 1).parts[index].sha256


def _open_stored(session: Session, node: Node, message: Message) -> Opened:
    """Re-check what was stored before showing it: a row planted or altered in the database
    (by someone without the sender's signing key) must not read as a genuine message."""
    if has_blob_parts(session, message):
        # Large evidence (app/evidence): header and manifest here, attachments streamed.
        return open_stored_head(session, node, message)[1]
    envelope = load_envelope(session, message)
    problem: str | None = None
    if sha256_hex(envelope.header) != message.envelope_hash:
        problem = "its header does not hash to the recorded envelope hash"
    elif not verify(
        _signer_key(session, node, message, envelope),
        DOMAIN_ENVELOPE,
        envelope.header,
        envelope.signature,
    ):
        problem = "its signature does not verify"
    if problem is None:
        try:
            header, opened = open_envelope(envelope, node.keys)
            problem = row_disagrees(message, header)
            if problem is None:
                return opened
        except EnvelopeError as exc:
            problem = f"it does not open ({exc.code})"
    raise StoredEnvelopeCorrupt(
        f"stored envelope {message.msg_id}: {problem}; storage was altered or damaged"
    )


def _checked_receipt(
    session: Session, node: Node, message: Message, stored: Receipt
) -> VerifiedReceipt:
    """A stored receipt checked again before it is shown, as its envelope is: a row planted
    or altered in the database (a backdated `received_at`, a zeroed signature) must not be
    shown as the peer's signed word. What is shown comes from the signed body."""
    peer = (
        message.recipient_authority if message.direction == OUTBOUND else message.sender_authority
    )
    signer = stored_receipt_signer(
        session,
        node.keys,
        outbound=message.direction == OUTBOUND,
        peer=peer,
        kid=stored.signer_kid,
    )
    try:
        return verify_receipt(
            SignedReceipt(body=stored.body, signature=stored.signature),
            signer_public=signer or b"",
            signer_kid=stored.signer_kid,
            msg_id=message.msg_id,
            envelope_hash=message.envelope_hash,
            from_authority=message.sender_authority,
            to_authority=message.recipient_authority,
        )
    except ReceiptError as exc:
        raise StoredEnvelopeCorrupt(
            f"stored receipt of {message.msg_id}: {exc}; storage was altered or damaged"
        ) from exc


def _validated(content: dict[str, Any]) -> dict[str, Any]:
    """The document as our schema reads it (what was checked on arrival), not the raw JSON."""
    model: type[RequestDocument] | type[MessageDocument] = (
        RequestDocument if content.get("kind") == "request" else MessageDocument
    )
    try:
        return model.model_validate(content.get("document")).model_dump(mode="json")
    except ValidationError as exc:
        raise StoredEnvelopeCorrupt("a stored document no longer matches its schema") from exc


def _message_view(
    session: Session, node: Node, case: CaseFile, message: Message
) -> schemas.MessageView:
    opened = _open_stored(session, node, message)
    content = opened.manifest.get("content", {})
    # One statement, so one snapshot on PostgreSQL: read apart, a receipt settled between
    # them showed beside the delivery state from before it.
    queued, receipt = session.execute(
        select(OutboxItem, Receipt)
        .select_from(Message)
        .outerjoin(OutboxItem, OutboxItem.message_id == Message.id)
        .outerjoin(Receipt, Receipt.message_id == Message.id)
        .where(Message.id == message.id)
    ).one()
    checked = None if receipt is None else _checked_receipt(session, node, message, receipt)
    return schemas.MessageView(
        msg_id=message.msg_id,
        direction=message.direction,
        kind=str(content.get("kind")),
        sender=message.sender_authority,
        recipient=message.recipient_authority,
        in_reply_to=message.in_reply_to,
        created_at=message.created_at,
        received_at=message.received_at,
        envelope_hash=message.envelope_hash,
        header=b64e(message.header),
        signature=b64e(message.signature),
        content=_validated(content),
        attachments=[
            schemas.AttachmentView(
                index=entry["index"],
                name=entry["name"],
                media_type=entry["media_type"],
                size=entry["size"],
                sha256=entry["sha256"],
                href=f"/api/v1/requests/{case.id}/messages/{message.msg_id}"
                f"/attachments/{entry['index']}",
            )
            for entry in opened.manifest.get("attachments", [])
        ],
        delivery=None
        if queued is None
        else schemas.DeliveryView(
            state=queued.state,
            attempts=queued.attempts,
            # As the admin view shows it: only while another attempt is to come.
            next_attempt_at=queued.next_attempt_at
            if queued.state in (outbox.QUEUED, outbox.RETRY)
            else None,
            last_error=queued.last_error,
            delivered_at=queued.delivered_at,
        ),
        receipt=None
        if receipt is None or checked is None
        else schemas.ReceiptView(
            received_at=checked.received_at,
            envelope_hash=checked.envelope_hash,
            signer_kid=checked.signer_kid,
            receipt=b64e(receipt.body),
            signature=b64e(receipt.signature),
        ),
    )


def read_request(
    session: Session, node: Node, *, request_id: str, principal: Principal, now: datetime
) -> schemas.RequestDetail:
    case = visible_case(session, request_id, principal)
    # Under PostgreSQL's READ COMMITTED each statement sees its own snapshot: a delivery settled
    # between reading the case and reading its receipts would show a receipt beside the status
    # from before it. The status and its messages change together in one transaction, so the
    # view is consistent when the case is the same before and after reading them; else again.
    for _ in range(3):
        seen = (case.status, case.updated_at)
        with audited_if_corrupt(
            actor=actor_of(principal),
            action="request.read",
            request_id=case.id,
            peer=case.peer_authority,
        ):
            messages = list(
                session.scalars(
                    select(Message).where(Message.request_id == case.id).order_by(Message.id)
                )
            )
            views = [_message_view(session, node, case, message) for message in messages]
        session.refresh(case)
        if (case.status, case.updated_at) == seen:
            break
        session.expire_all()  # read every row again, not the copies loaded on this pass
    record(
        session,
        actor=actor_of(principal),
        action="request.read",
        request_id=case.id,
        peer=case.peer_authority,
        # The newest message shown, beside how many: which messages this read decrypted, for
        # a court asking whether an officer had read a reply (from an auditor's review).
        details={"messages": len(views), "last_msg_id": views[-1].msg_id if views else None},
    )
    state = lifecycle.parse_state(case.status)
    # What can be sent now: nothing while exchanges with the peer are suspended (each would
    # be refused, 409 peer_suspended), so that a screen offers only buttons that work.
    sendable = session.scalar(
        select(Peer.id).where(Peer.authority_id == case.peer_authority, Peer.suspended_at.is_(None))
    )
    allowed = lifecycle.allowed_messages(state, lifecycle.role_of(case.direction))
    return schemas.RequestDetail(
        **summary(case, now=now).model_dump(),
        document=views[0].content if views else {},
        messages=views,
        allowed_messages=[message.value for message in allowed] if sendable is not None else [],
    )


def message_of(session: Session, case: CaseFile, msg_id: str) -> Message:
    """A message of this request, or 404 `unknown_message`."""
    message = session.scalar(
        select(Message).where(Message.request_id == case.id, Message.msg_id == msg_id)
    )
    if message is None:
        raise NotFound("no such message in this request", code="unknown_message")
    return message


def read_attachment(
    session: Session,
    node: Node,
    *,
    request_id: str,
    msg_id: str,
    index: int,
    principal: Principal,
) -> Download:
    case = visible_case(session, request_id, principal)
    message = message_of(session, case, msg_id)
    with audited_if_corrupt(
        actor=actor_of(principal),
        action="attachment.downloaded",
        request_id=case.id,
        msg_id=message.msg_id,
        peer=case.peer_authority,
        details={"index": index},
    ):
        opened = _open_stored(session, node, message)
    listed = opened.manifest.get("attachments", [])
    if not 1 <= index <= len(listed):
        raise NotFound("no such attachment", code="unknown_attachment")
    entry = listed[index - 1]
    record(
        session,
        actor=actor_of(principal),
        action="attachment.downloaded",
        request_id=case.id,
        msg_id=message.msg_id,
        peer=case.peer_authority,
        # The part's ciphertext hash, as the signed header gives it, not the plaintext's: an
        # audit trail in clear must not confirm which known file was read (DESIGN.md section
        # 3); the manifest, opened by the node, ties one to the other for a court.
        details={"index": index, "part_sha256": _part_sha256(message, index, len(listed))},
    )
    return Download(
        name=str(entry["name"]),
        media_type=str(entry["media_type"]),
        sha256=str(entry["sha256"]),
        data=opened.attachments[index - 1],
    )

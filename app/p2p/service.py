"""Accepting an envelope from a peer, with the receiver's checks in the protocol's order.

Cheap checks come first (shape, sizes, known sender, signature, addressee, time, replay);
only then the key unwrap and decryption. Any failure raises `EnvelopeRefused` with its code,
and the caller records the refusal in the audit log in a transaction of its own, so a
refused envelope leaves exactly one trace and stores nothing.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from pydantic import ValidationError
from sqlalchemy import LargeBinary, Table, delete, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import Session

from app.audit.checkpoints import latest_signed, log_verifier
from app.audit.index import indexed_size
from app.audit.log import Event, record, record_many
from app.audit.merkle import leaf_hash
from app.auth.throttle import Limits, auth_limits, register_refusal
from app.crypto import envelope as env
from app.crypto.encoding import DecodeError, format_time, load_canonical_object, utc_now
from app.crypto.receipts import Receipt as VerifiedReceipt
from app.crypto.receipts import (
    ReceiptError,
    SignedReceipt,
    check_statement,
    issue_receipt,
    verify_receipt,
)
from app.domain.document import RequestDocument
from app.domain.messages import MessageDocument
from app.errors import EnvelopeRefused, StoredEnvelopeCorrupt
from app.models import AuditEntry, AuditIndex, CaseFile, InboundTransfer, Message, Receipt
from app.node import Node
from app.peers.keys import (
    PinnedKeys,
    peer_encryption_kid_known,
    peer_signing_key,
    pinned_keys,
    refresh_peer_keys,
)
from app.requests import conversation
from app.requests.store import store_envelope

MAX_TTL = timedelta(days=30)
RECEIPTS = cast(Table, Receipt.__table__)  # a Core insert, as for the message (store.py)


@dataclass(frozen=True)
class Accepted:
    receipt: SignedReceipt
    created: bool  # False when this was a repeat answered with the stored receipt


@dataclass(frozen=True)
class Recovered:
    """Our own receipt of an envelope we took before a restore, as the peer kept it
    (app/recovery): taken back as it was, when it was, instead of issued anew."""

    signed: SignedReceipt
    receipt: VerifiedReceipt


_LATEST_NOTE = "entraide.latest_note"


def _refuse(code: str, detail: str, status: int | None = None) -> EnvelopeRefused:
    if status is None:  # §9's tables: every `too_large` is a 413, the other codes 400
        status = 413 if code == "too_large" else 400
    return EnvelopeRefused(code, detail, status_code=status)


def _check_time(node: Node, header: env.Header, *, taken_before: bool = False) -> None:
    """Steps 21 to 23. `taken_before`: an envelope our own receipt says we took in its
    lifetime (app/recovery), which may have run out since."""
    now = utc_now()
    skew = timedelta(seconds=node.settings.clock_skew_seconds)
    if header.created_at > now + skew:
        raise _refuse("not_yet_valid", "the envelope was created in the future")
    if header.expires_at <= now and not taken_before:
        raise _refuse("expired", "the envelope has expired")
    if header.expires_at - header.created_at > MAX_TTL or header.expires_at < header.created_at:
        raise _refuse("malformed_header", "the envelope's lifetime is invalid")


def _latest_note(session: Session, node: Node) -> str | None:
    """The latest signed checkpoint of our log, its signature checked (a row's columns could
    name a stale one): the sender witnesses it (DESIGN.md 5).

    Read once a transaction: a batch's receipts (app/p2p/batch.py) all carry the checkpoint
    that was the latest when the batch began, one query instead of one per envelope."""
    transaction = session.get_transaction()
    seen = session.info.get(_LATEST_NOTE)
    if seen is not None and transaction is not None and seen[0] is transaction:
        note: str | None = seen[1]
        return note
    latest = latest_signed(session, log_verifier(node.authority_id, node.keys.log_public))
    note = None if latest is None else latest.note
    session.info[_LATEST_NOTE] = (transaction, note)
    return note


@dataclass(frozen=True)
class Stored:
    """A stored message with this msg_id: whether an envelope is a repeat of it."""

    id: int
    msg_id: str
    request_id: str
    direction: str
    envelope_hash: str
    sender_authority: str
    received_at: datetime | None


# Repeats of one message audited one by one in a window (then counted): docs/audit.md.
REPEATS_AUDITED = 10
_MESSAGES = cast(Table, Message.__table__)
_STORED = select(
    _MESSAGES.c.id,
    _MESSAGES.c.msg_id,
    _MESSAGES.c.request_id,
    _MESSAGES.c.direction,
    _MESSAGES.c.envelope_hash,
    _MESSAGES.c.sender_authority,
    _MESSAGES.c.received_at,
)
_RECEIPT = select(RECEIPTS.c.body, RECEIPTS.c.signature)


def stored_message(session: Session, msg_id: str) -> Stored | None:
    """Read with one Core query: every arriving envelope asks, and almost always in vain."""
    row = session.connection().execute(_STORED.where(_MESSAGES.c.msg_id == msg_id)).first()
    return None if row is None else Stored(*row)


def answer_repeat(
    session: Session, node: Node, header: env.Header, existing: Stored, **details: object
) -> Accepted:
    """A repeat of an envelope we hold (posted whole or announced): answered with its stored
    receipt, and on record, up to REPEATS_AUDITED times per message a window. A sender that
    lost our answer repeats it a few times; anyone holding a copy of the envelope (a proxy
    on the way) could repeat it without end, each repeat an entry of the log for ever (from
    review): past the limit, repeats are counted, and the count is audited (`auth.throttled`
    when it starts, `auth.throttle_ended` with the number left out). Never refused: a
    genuine sender must always get its receipt."""
    window = auth_limits(node.settings).window
    verdict = register_refusal(
        session,
        [f"repeat:{header.msg_id}"],
        Limits(REPEATS_AUDITED, window, window),
        actor=f"peer:{header.from_authority}",
    )
    if verdict.audit:
        record(
            session,
            actor=f"peer:{header.from_authority}",
            action="envelope.repeated",
            request_id=existing.request_id,
            msg_id=header.msg_id,
            peer=header.from_authority,
            details={"envelope_hash": existing.envelope_hash, **details},
        )
    return Accepted(receipt=_stored_receipt(session, node, existing), created=False)


def _stored_receipt(session: Session, node: Node, message: Stored) -> SignedReceipt:
    """The receipt of an envelope we hold, for a sender that lost our first answer. Signed
    again with our current key if the stored one is not (a rotation since): the same
    statement, its time unchanged, that the sender can verify with the key it pins; the
    receipt as first issued stays stored. The stored one is checked first, signature and
    statement, against the message it is for: signing again whatever the row says would sign
    any statement an insider wrote there (from review)."""
    row = session.connection().execute(_RECEIPT.where(RECEIPTS.c.message_id == message.id)).first()
    if row is None:
        corrupt = StoredEnvelopeCorrupt(f"inbound message {message.msg_id} has no stored receipt")
    else:
        stored = SignedReceipt(body=row.body, signature=row.signature)
        try:
            receipt = _checked_receipt(session, node, message, stored)
        except (ReceiptError, DecodeError) as exc:
            corrupt = StoredEnvelopeCorrupt(
                f"the stored receipt of inbound message {message.msg_id} does not check out: "
                f"{str(exc)[:120]}"
            )
        else:
            keys = node.keys  # once: a key and its id from the same rotation
            if receipt.signer_kid == keys.signing_kid:
                return stored
            return issue_receipt(
                keys.signing,
                signer_kid=keys.signing_kid,
                msg_id=receipt.msg_id,
                envelope_hash=receipt.envelope_hash,
                from_authority=receipt.from_authority,
                to_authority=receipt.to_authority,
                received_at=receipt.received_at,
                checkpoint=receipt.checkpoint,
            )
    corrupt.audit = {
        "actor": "node",
        "action": "envelope.repeated",
        "outcome": StoredEnvelopeCorrupt.code,
        "request_id": message.request_id,
        "msg_id": message.msg_id,
        "peer": message.sender_authority,
        "details": {"detail": corrupt.detail[:200]},
    }
    raise corrupt


def _checked_receipt(
    session: Session, node: Node, message: Stored, stored: SignedReceipt
) -> VerifiedReceipt:
    kid = load_canonical_object(stored.body).get("signer_kid")
    public = node.keys.signing_public_for(kid) if isinstance(kid, str) and kid.isascii() else None
    expected = {
        "msg_id": message.msg_id,
        "envelope_hash": message.envelope_hash,
        "from_authority": message.sender_authority,
        "to_authority": node.authority_id,
    }
    if public is not None:
        return verify_receipt(stored, signer_public=public, signer_kid=kid, **expected)
    # Signed with a key this node no longer has (replaced outside a rotation, after a
    # compromise): its signature cannot be checked, so only what the message's own row says
    # is signed again, its time included, and no checkpoint (one the row cannot vouch for);
    # and only if the Merkle log holds the receipt this node issued for that envelope. The
    # rows alone made the node sign a receipt for an envelope it had refused, for anyone who
    # could write them (from review): docs/threat-model.md.
    if not _issued_on_record(session, message):
        raise ReceiptError("no receipt.issued (or .recovered) entry of the log vouches for it")
    receipt = check_statement(stored, **expected)
    if message.received_at is None or format_time(receipt.received_at) != format_time(
        message.received_at
    ):
        raise ReceiptError("its time is not the message's")
    return dataclasses.replace(receipt, checkpoint=None)


def _issued_on_record(session: Session, message: Stored) -> bool:
    """Whether the log holds the receipt this node issued for this very envelope: an entry
    whose hashed bytes (not its query columns, which the log does not hash) say so. Found
    through the auditor's index by request, and in the tail not indexed yet by message."""
    indexed = indexed_size(session)
    candidates = set(
        session.scalars(
            select(AuditIndex.idx).where(
                AuditIndex.request_id == message.request_id,
                AuditIndex.action.in_(("receipt.issued", "receipt.recovered")),
            )
        )
    )
    candidates.update(
        session.scalars(
            select(AuditEntry.idx).where(
                AuditEntry.idx >= indexed, AuditEntry.msg_id == message.msg_id
            )
        )
    )
    if not candidates:
        return False
    rows = session.execute(
        select(
            sql_cast(AuditEntry.entry, LargeBinary), sql_cast(AuditEntry.leaf_hash, LargeBinary)
        ).where(AuditEntry.idx.in_(sorted(candidates)))
    )
    for raw, stored_leaf in rows:
        entry = raw.encode() if isinstance(raw, str) else bytes(raw)
        if not hmac.compare_digest(leaf_hash(entry), bytes(stored_leaf)):
            continue  # not the bytes the log committed to
        try:
            fields = load_canonical_object(entry)
        except DecodeError:
            continue
        details = fields.get("details")
        if (
            # Issued here, or taken back with the message after a restore (app/recovery).
            fields.get("action") in ("receipt.issued", "receipt.recovered")
            and fields.get("outcome") == "ok"
            and fields.get("msg_id") == message.msg_id
            and isinstance(details, dict)
            and details.get("envelope_hash") == message.envelope_hash
        ):
            return True
    return False


def check_content(
    header: env.Header, opened: env.Opened, case: CaseFile | None
) -> RequestDocument | MessageDocument:
    """Validate the decrypted document against our schema."""
    content = opened.manifest.get("content")
    if not isinstance(content, dict):
        raise _refuse("invalid_content", "the manifest has no content", 422)
    if content.keys() != env.CONTENT_FIELDS:
        # As the document's own models refuse members they do not define: one beside it would
        # be receipted yet never shown to the officer. Its names are the sender's: not said.
        raise _refuse(
            "invalid_content", "the content has other members than 'kind' and 'document'", 422
        )
    kind = content.get("kind")
    try:
        if kind == "request":
            if (
                case is not None
                or header.in_reply_to is not None
                or header.conversation_id != header.msg_id
            ):
                raise _refuse("unknown_conversation", "a request must open a conversation", 409)
            document = RequestDocument.model_validate(content.get("document"))
            if (
                document.requesting_authority != header.from_authority
                or document.requested_authority != header.to_authority
            ):
                raise _refuse("manifest_mismatch", "the document names other authorities")
            return document
        if kind == "message":
            if case is None:
                raise _refuse("unknown_conversation", "no such conversation", 409)
            message = MessageDocument.model_validate(content.get("document"))
            hashes = [str(entry.get("sha256")) for entry in opened.manifest.get("attachments", [])]
            if any(True for _ in message.attachment_problems(hashes)):
                raise _refuse(
                    "invalid_content", "an evidence item does not match its attachment", 422
                )
            return message
    except ValidationError as exc:
        raise _refuse(
            "invalid_content", f"the document fails validation ({exc.error_count()} errors)", 422
        ) from exc
    raise _refuse("invalid_content", "unknown content kind", 422)


def check_sender(
    session: Session,
    node: Node,
    envelope: env.WireEnvelope,
    header: env.Header,
    *,
    may_refresh: bool = True,
) -> PinnedKeys:
    """Steps 14 to 17 of docs/protocol.md section 9: a pinned sender, its key, the signature
    and the addressee (shared with the streamed-parts path, app/evidence). Returns the
    sender's pinned keys, for `check_encryption_keys`.

    `may_refresh=False` (a batch, app/p2p/batch.py, which refreshed keys before its
    transaction) refuses an unknown signing key at once instead of ending the transaction to
    fetch the sender's identity document."""
    peer = pinned_keys(session, header.from_authority)
    if peer is None:
        raise _refuse("unknown_sender", "the sender is not a pinned peer of this node", 403)
    signing_key = peer_signing_key(session, peer, header.from_sig_kid, signed_at=header.created_at)
    # A suspended peer's rotations are not followed: its operator may have suspended it
    # because its keys are no longer trusted.
    if signing_key is None and (not may_refresh or peer.suspended_at is not None):
        raise _refuse("unknown_key", "the envelope is signed with a key not pinned here", 403)
    if signing_key is None:
        # Perhaps the peer rotated its keys: follow its signed rotation (docs/protocol.md
        # §5.4). Nothing was written yet; end this transaction so the fetch, which may take
        # the whole peer timeout, holds no lock.
        session.rollback()
        refresh_peer_keys(node, header.from_authority)
        peer = pinned_keys(session, header.from_authority)
        if peer is None or peer.signing_kid != header.from_sig_kid:
            raise _refuse("unknown_key", "the envelope is signed with a key not pinned here", 403)
        signing_key = peer.signing_key
    try:
        env.verify_header_signature(envelope, signing_key)
    except env.EnvelopeError as exc:
        raise _refuse(exc.code, exc.detail) from exc
    if peer.suspended_at is not None:
        # Said only to the key's holder (after its signature): a stranger learns nothing of
        # which peers are suspended. Its node tries again until exchanges resume.
        raise _refuse(
            "peer_suspended", "this node has suspended exchanges with your authority", 403
        )
    if header.to_authority != node.authority_id:
        raise _refuse("not_addressed_to_us", "the envelope is addressed to another authority", 421)
    return peer


def check_encryption_keys(
    session: Session,
    node: Node,
    peer: PinnedKeys,
    header: env.Header,
    *,
    at: datetime | None = None,
) -> None:
    """Steps 19 and 20: both encryption keys, for an envelope not yet stored. A repeat of one
    we hold skips them: it was sealed to keys valid when it first arrived, and its sender,
    which may have lost our first answer, needs the stored receipt even if either key has
    been retired or replaced since (refusing it would make a delivered request failed)."""
    if not peer_encryption_kid_known(session, peer, header.from_enc_kid):
        raise _refuse("unknown_key", "the sender's encryption key is not the one pinned here", 403)
    # `at`: when our receipt says we took it (app/recovery), our keys judged as they were then.
    now = at or utc_now()
    if not node.keys.accepts_encryption_kid(header.to_enc_kid, now) and (
        # Perhaps our new key, which another thread is loading right now: wait for it.
        not node.keyring.current(wait=True).keys.accepts_encryption_kid(header.to_enc_kid, now)
    ):
        # A retired key of ours past its overlap period, or none of ours at all.
        raise _refuse("unknown_recipient_key", "the envelope is sealed for another key of ours")


def admit_opened(
    session: Session,
    node: Node,
    *,
    header: env.Header,
    envelope_hash: str,
    opened: env.Opened,
    store: Callable[[CaseFile, datetime], int],
    recovered: Recovered | None = None,
) -> Accepted:
    """Steps 31 on of section 9 for an envelope whose parts all checked out: content, the
    conversation's lifecycle, storage (`store`: the parts in rows, or in the blob store for
    streamed parts; returns the message's id), audit entries and the signed receipt.
    `recovered`: the receipt we gave it before a restore, kept instead of a new one, and
    its time the time the request moved (app/recovery)."""
    # Locked: two messages of one conversation arriving together must not lose a status. Read
    # again under the lock (populate_existing): a copy an earlier envelope of the same batch
    # loaded may predate a change another transaction committed since.
    case = session.get(
        CaseFile, header.conversation_id, with_for_update=True, populate_existing=True
    )
    if case is not None and case.peer_authority != header.from_authority:
        # Worded as for an id never used: another peer's conversation is not for this one
        # to learn of (from review).
        raise _refuse("unknown_conversation", "no such conversation", 409)
    if case is not None:
        # Step 18 again, under the lock: two copies of one message (a retry after a timeout,
        # PostgreSQL) both passed it before either was stored; the second, seeing the status
        # the first moved, would be refused for good (409) although the message is here. A
        # new request's copy needs no second look: its conversation's insert collides.
        existing = stored_message(session, header.msg_id)
        if existing is not None:
            if existing.direction == "inbound" and existing.envelope_hash == envelope_hash:
                # A streamed copy completing here has nothing more to receive: its transfer
                # goes (as when a repeat is found before the lock, app/evidence/inbound.py).
                session.execute(
                    delete(InboundTransfer).where(InboundTransfer.msg_id == header.msg_id)
                )
                return answer_repeat(session, node, header, existing)
            raise _refuse("replayed", "this message id was already used for another envelope", 409)
    document = check_content(header, opened, case)

    now = utc_now() if recovered is None else recovered.receipt.received_at
    if case is None and isinstance(document, RequestDocument):
        message_type = "request"
        case = conversation.open_inbound(
            session,
            node.settings,
            request_id=header.conversation_id,
            peer=header.from_authority,
            document=document,
            now=now,
        )
    elif case is not None and isinstance(document, MessageDocument):
        # The lifecycle's checks: who may send it, after what, in which state (409 / 425).
        message_type = document.type.value
        conversation.receive(
            session, case, in_reply_to=header.in_reply_to, document=document, now=now
        )
    else:  # check_content pairs a request with a new conversation, a message with a known one
        raise _refuse("invalid_content", "unexpected content", 422)
    message_id = store(case, now)
    actor = f"peer:{header.from_authority}"
    received = Event(
        actor=actor,
        action="envelope.received",
        request_id=case.id,
        msg_id=header.msg_id,
        peer=header.from_authority,
        details={"envelope_hash": envelope_hash, "type": message_type, "status": case.status},
    )
    if recovered is not None:
        return _keep_recovered(session, received, message_id, recovered)
    # Both entries in one statement: one round trip to PostgreSQL, not two.
    record_many(
        session,
        [
            received,
            Event(
                actor="node",
                action="receipt.issued",
                request_id=case.id,
                msg_id=header.msg_id,
                peer=header.from_authority,
                details={"envelope_hash": envelope_hash},
            ),
        ],
    )
    keys = node.keys  # once: a key and its id from the same rotation
    receipt = issue_receipt(
        keys.signing,
        signer_kid=keys.signing_kid,
        msg_id=header.msg_id,
        envelope_hash=envelope_hash,
        from_authority=header.from_authority,
        to_authority=header.to_authority,
        received_at=now,
        checkpoint=_latest_note(session, node),
    )
    # Whatever `store` left pending (a streamed envelope's parts), before the receipt's insert.
    session.flush()
    session.connection().execute(
        RECEIPTS.insert(),
        {
            "message_id": message_id,
            "body": receipt.body,
            "signature": receipt.signature,
            "signer_kid": keys.signing_kid,
            "received_at": now,
            "stored_at": now,
        },
    )
    return Accepted(receipt=receipt, created=True)


def _keep_recovered(
    session: Session, received: Event, message_id: int, recovered: Recovered
) -> Accepted:
    """The envelope taken back after a restore, with the receipt we gave it then."""
    record_many(
        session,
        [
            dataclasses.replace(received, details={**received.details, "recovered": True}),
            Event(
                actor="node",
                action="receipt.recovered",
                request_id=received.request_id,
                msg_id=received.msg_id,
                peer=received.peer,
                details={
                    "envelope_hash": recovered.receipt.envelope_hash,
                    "received_at": format_time(recovered.receipt.received_at),
                },
            ),
        ],
    )
    session.flush()
    session.connection().execute(
        RECEIPTS.insert(),
        {
            "message_id": message_id,
            "body": recovered.signed.body,
            "signature": recovered.signed.signature,
            "signer_kid": recovered.receipt.signer_kid,
            "received_at": recovered.receipt.received_at,
            "stored_at": utc_now(),
        },
    )
    return Accepted(receipt=recovered.signed, created=True)


def accept_envelope(
    session: Session,
    node: Node,
    *,
    wire: object,
    may_refresh: bool = True,
    recovered: Recovered | None = None,
) -> Accepted:
    """`recovered`: an envelope we took before a restore, taken back from the peer that kept
    it with our receipt (app/recovery): its lifetime may have run out since, and the receipt
    we signed then proves we took it in time."""
    settings = node.settings
    try:
        envelope = env.decode_wire(
            wire, max_parts=settings.max_envelope_parts, max_header_bytes=settings.max_header_bytes
        )
        if len(envelope.header) > settings.max_header_bytes:
            raise _refuse("too_large", "header too large", 413)
        header = env.parse_header(envelope.header, len(envelope.parts))
    except env.EnvelopeError as exc:
        raise _refuse(exc.code, exc.detail) from exc

    peer = check_sender(session, node, envelope, header, may_refresh=may_refresh)

    # A repeat of an accepted envelope gets its receipt back even after it expired: its
    # sender may have lost our first answer, and the receipt is its proof of delivery.
    existing = stored_message(session, header.msg_id)
    if existing is not None:
        if existing.direction == "inbound" and existing.envelope_hash == envelope.envelope_hash:
            return answer_repeat(session, node, header, existing)
        raise _refuse("replayed", "this message id was already used for another envelope", 409)
    taken_at = recovered.receipt.received_at if recovered is not None else None
    check_encryption_keys(session, node, peer, header, at=taken_at)
    _check_time(node, header, taken_before=recovered is not None)

    try:
        content_key = env.unwrap_content_key(header, node.keys, kid=header.to_enc_kid)
        env.check_commitment(header, content_key)
        env.check_parts(header, envelope.parts)
        opened = env.check_manifest(header, env.decrypt_parts(header, envelope.parts, content_key))
    except env.EnvelopeError as exc:
        raise _refuse(exc.code, exc.detail) from exc

    # A streamed transfer of it begun before (a sender may change carriage between attempts)
    # has nothing more to receive: it goes with this transaction, as when a repeat is
    # announced (app/evidence/inbound.py); a refusal below rolls it back. Left, it counted
    # against the peer's transfers under way until it expired (a peer that switched to whole
    # posts was refused new announcements, 429, for days) and HEAD still asked for its parts
    # (from review). Its row locked first, as a part's completion locks it before the case
    # and the audit log's head (a delete after them deadlocked with one on PostgreSQL; from
    # review). What it staged goes with the clean-up sweep, as any transfer's whose row is
    # gone. An envelope of part 0 alone completes at its announcement: none can be left.
    if len(header.parts) > 1:
        session.execute(delete(InboundTransfer).where(InboundTransfer.msg_id == header.msg_id))
    return admit_opened(
        session,
        node,
        header=header,
        envelope_hash=envelope.envelope_hash,
        opened=opened,
        store=lambda case, now: (
            store_envelope(
                session,
                case=case,
                envelope=envelope,
                header=header,
                direction="inbound",
                received_at=now,
            ).id
        ),
        recovered=recovered,
    )

"""Taking one listed message back (app/recovery/recover.py runs them in order).

Nothing of the peer's listing is believed but what our keys and the peer's pinned key prove.
A message of the peer's is taken back through the ordinary acceptance (every check of the
protocol but the expiry, the request's lifecycle) with the receipt we signed for it then,
which the peer kept: only what that receipt proves we took comes back. A message of ours
comes back only if its header verifies with one of our own keys (valid when it was sealed)
and the peer's receipt with the peer's; it is opened with our own key's wrap, judged by the
lifecycle as when our officer sent it, and stored as delivered, with that receipt. Each
entry's time must be the one these signatures carry (our seal, our receipt): the order the
entries are taken in is then ours, whatever the peer's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.log import Event, record, record_many
from app.crypto import envelope as env
from app.crypto.encoding import DecodeError, format_time, utc_now
from app.crypto.keys import NodeKeys
from app.crypto.receipts import Receipt as VerifiedReceipt
from app.crypto.receipts import (
    ReceiptError,
    SignedReceipt,
    check_received_at,
    decode_receipt,
    verify_receipt,
)
from app.db import unit_of_work
from app.delivery import outbox
from app.domain.document import RequestDocument
from app.domain.messages import MessageDocument, MessageType
from app.errors import EntraideError
from app.evidence.inbound import _manifest, announced_header, store_streamed
from app.models import CaseFile, InboundTransfer, Message, OutboxItem
from app.node import Node
from app.p2p.service import (
    RECEIPTS,
    Recovered,
    _check_time,
    accept_envelope,
    admit_opened,
    check_content,
    check_encryption_keys,
    check_sender,
    stored_message,
)
from app.peers.keys import claimed_signer_kid, pinned_keys, verify_peer_receipt
from app.recovery.listing import Entry
from app.recovery.parts import PartUnavailable, fetch_parts, still_held
from app.requests import conversation, moves
from app.requests.status import QUEUED, status_after_receipt
from app.requests.store import store_envelope

RECOVERED = "recovered"
ALREADY = "already here"
SETTLED = "already here, now receipted"


class Unrecoverable(Exception):
    """This message cannot be taken back (said in the summary)."""


def here(node: Node, entry: Entry) -> bool:
    """Whether a message of this id, in the entry's direction, is stored here."""
    with unit_of_work(node.sessions) as session:
        stored = stored_message(session, entry.msg_id)
    direction = "inbound" if entry.role == "received" else "outbound"
    return stored is not None and stored.direction == direction


def apply(node: Node, http: httpx.Client, entry: Entry, *, peer: str, peer_url: str = "") -> str:
    """Take `entry` back, or say why not (Unrecoverable). `peer_url`: where its streamed
    parts are asked for, if it has any."""
    if entry.wire is None:
        raise Unrecoverable("the peer listed it without its envelope")
    try:
        envelope = env.decode_wire(
            entry.wire,
            max_parts=node.settings.max_envelope_parts,
            max_header_bytes=node.settings.max_header_bytes,
        )
        if entry.streamed:
            # Its header, signature and part 0, as announced (§8.5); the other parts follow.
            if len(envelope.parts) != 1:
                raise Unrecoverable("a streamed message is listed with more than its manifest")
            header = announced_header(envelope.header)
            if len(header.parts) < 2:
                raise Unrecoverable("a streamed message is listed without streamed parts")
        else:
            header = env.parse_header(envelope.header, len(envelope.parts))
        if (header.msg_id, header.conversation_id, header.in_reply_to) != (
            entry.msg_id,
            entry.request_id,
            entry.in_reply_to,
        ):
            raise Unrecoverable("it is listed under other ids than its header's")
        if entry.role == "received":
            return _take_received(node, entry, envelope, header, peer=peer, peer_url=peer_url)
        return _take_sent(node, http, entry, envelope, header, peer=peer, peer_url=peer_url)
    except (EntraideError, ReceiptError, env.EnvelopeError, DecodeError) as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        code = getattr(exc, "code", None)
        raise Unrecoverable(f"{code}: {detail}" if code else detail) from exc
    except PartUnavailable as exc:
        raise Unrecoverable(f"its streamed evidence: {exc}") from exc
    except IntegrityError as exc:  # stored meanwhile by a node process running beside us
        raise Unrecoverable("stored meanwhile; run the recovery again") from exc


def _listed_when_signed(entry: Entry, signed_at: datetime) -> None:
    """The time the entry is listed at must be the one our signature gave it: the order we
    take entries in is then the order we first took them, whatever the peer's."""
    if entry.at != format_time(signed_at):
        raise Unrecoverable(
            f"it is listed at {entry.at}, but was taken at {format_time(signed_at)}"
        )


def _take_received(
    node: Node,
    entry: Entry,
    envelope: env.WireEnvelope,
    header: env.Header,
    *,
    peer: str,
    peer_url: str,
) -> str:
    """A message of the peer's: our own receipt of it first, then the ordinary acceptance."""
    signed = decode_receipt(entry.receipt)
    claimed = claimed_signer_kid(signed)
    ours = node.keys.signing_public_for(claimed) if claimed is not None else None
    if ours is None:
        raise Unrecoverable("its receipt is not signed by a key of this node")
    receipt = verify_receipt(
        signed,
        signer_public=ours,
        signer_kid=claimed,
        msg_id=header.msg_id,
        envelope_hash=envelope.envelope_hash,
        from_authority=peer,
        to_authority=node.authority_id,
    )
    # Dated as any receipt must be, within the envelope's lifetime (we never receipted an
    # expired one), by a key of ours that was ours then.
    check_received_at(receipt, created_at=header.created_at, now=utc_now())
    if receipt.received_at >= header.expires_at:
        raise Unrecoverable("its receipt is dated after the envelope expired")
    own_key_then(node.keys, receipt.signer_kid, receipt.received_at, _skew(node))
    _listed_when_signed(entry, receipt.received_at)
    recovered = Recovered(signed, receipt)
    if entry.streamed:
        with unit_of_work(node.sessions) as session:
            if stored_message(session, header.msg_id) is not None:
                return ALREADY
            check_sender(session, node, envelope, header)  # its signature, before its parts
        fetch_parts(node, peer=peer, peer_url=peer_url, header=header)
        with unit_of_work(node.sessions) as session:
            if stored_message(session, header.msg_id) is not None:
                return ALREADY
            _admit_streamed(session, node, envelope, header, recovered)
        return RECOVERED
    with unit_of_work(node.sessions) as session:
        if stored_message(session, header.msg_id) is not None:
            return ALREADY
        accept_envelope(session, node, wire=entry.wire, recovered=recovered)
    return RECOVERED


def _admit_streamed(
    session: Session,
    node: Node,
    head: env.WireEnvelope,
    header: env.Header,
    recovered: Recovered,
) -> None:
    """A peer's message with streamed parts, all in the blob store and checked: §9's checks
    of its header and manifest (but the expiry), then stored as a completed transfer is
    (app/evidence/inbound.py), with our receipt of then."""
    pinned = check_sender(session, node, head, header)
    check_encryption_keys(session, node, pinned, header, at=recovered.receipt.received_at)
    # A transfer of it the backup caught under way has nothing more to receive: it goes
    # (its row locked before the case, as accept_envelope does), or it would count against
    # the peer's transfers until it expired.
    session.execute(delete(InboundTransfer).where(InboundTransfer.msg_id == header.msg_id))
    still_held(node, header)
    _check_time(node, header, taken_before=True)
    content_key = env.unwrap_content_key(header, node.keys, kid=header.to_enc_kid)
    env.check_commitment(header, content_key)
    opened = _manifest(header, head.parts[0], content_key)
    admit_opened(
        session,
        node,
        header=header,
        envelope_hash=head.envelope_hash,
        opened=opened,
        store=lambda case, now: store_streamed(
            session, case=case, header=header, head=head, direction="inbound", received_at=now
        ),
        recovered=recovered,
    )


def own_key_then(keys: NodeKeys, kid: str, at: datetime, grace: timedelta) -> bytes:
    """Our signing key `kid`, if it was ours at `at`: the current one, or one rotated away
    after `at` (a key rotated away, or taken, signs nothing dated after its rotation; but
    for `grace`, the clock skew: a running node signs with the old key until it has loaded
    the new one, a moment after the rotation's time)."""
    if kid == keys.signing_kid:
        return keys.signing_public
    for rotation in keys.rotations:
        if rotation.old.signing_kid == kid:
            if at > rotation.rotated_at + grace:
                raise Unrecoverable(f"signed by a key of this node rotated away before {at}")
            return rotation.old.signing
    raise Unrecoverable("it is signed with a key this node does not hold")


def _take_sent(
    node: Node,
    http: httpx.Client,
    entry: Entry,
    envelope: env.WireEnvelope,
    header: env.Header,
    *,
    peer: str,
    peer_url: str,
) -> str:
    """A message of ours the peer took: verified with our own key, opened with our own wrap."""
    if header.from_authority != node.authority_id or header.to_authority != peer:
        raise Unrecoverable("the envelope is not one of ours to this peer")
    own_key = own_key_then(node.keys, header.from_sig_kid, header.created_at, _skew(node))
    env.verify_header_signature(envelope, own_key)
    _listed_when_signed(entry, header.created_at)
    signed = decode_receipt(entry.receipt)
    with unit_of_work(node.sessions) as session:
        pinned = pinned_keys(session, peer)
    if pinned is None:
        raise Unrecoverable(f"{peer} is not a pinned peer")
    receipt = verify_peer_receipt(
        node,
        http,
        signed,
        authority=peer,
        signer_public=pinned.signing_key,
        signer_kid=pinned.signing_kid,
        msg_id=header.msg_id,
        envelope_hash=envelope.envelope_hash,
        from_authority=node.authority_id,
        sealed_at=header.created_at,
    )
    if receipt.received_at >= header.expires_at:
        raise Unrecoverable("the peer's receipt is dated after the envelope expired")
    content_key = env.unwrap_content_key(header, node.keys, kid=header.from_enc_kid)
    env.check_commitment(header, content_key)
    if entry.streamed:
        opened = _manifest(header, envelope.parts[0], content_key)
        with unit_of_work(node.sessions) as session:
            held = stored_message(session, header.msg_id) is not None
        if not held:  # its parts, before the transaction that stores it (one writer)
            fetch_parts(node, peer=peer, peer_url=peer_url, header=header)
    else:
        env.check_parts(header, envelope.parts)
        opened = env.check_manifest(header, env.decrypt_parts(header, envelope.parts, content_key))
    with unit_of_work(node.sessions) as session:
        stored = stored_message(session, header.msg_id)
        if stored is not None:
            if stored.direction != "outbound" or stored.envelope_hash != envelope.envelope_hash:
                raise Unrecoverable("another envelope is stored here under its id")
            return _settle_stored(session, stored.id, signed, receipt)
        case = session.get(CaseFile, header.conversation_id, with_for_update=True)
        if case is not None and case.peer_authority != peer:
            raise Unrecoverable("its request is one with another peer here")
        if (
            header.in_reply_to is not None
            and case is not None
            and not _known(session, case.id, header.in_reply_to)
        ):
            # As the peer judged it when it arrived: a message follows the one it names.
            raise Unrecoverable(f"the message it follows ({header.in_reply_to}) is not here")
        document = check_content(header, opened, case)
        if entry.streamed:
            still_held(node, header)
        _store_sent(
            session, node, envelope, header, document, case, signed, receipt, entry.streamed
        )
    return RECOVERED


def _skew(node: Node) -> timedelta:
    return timedelta(seconds=node.settings.clock_skew_seconds)


def _known(session: Session, request_id: str, msg_id: str) -> bool:
    found = session.scalar(
        select(Message.id).where(Message.request_id == request_id, Message.msg_id == msg_id)
    )
    return found is not None


def _settle_stored(
    session: Session, message_id: int, signed: SignedReceipt, receipt: VerifiedReceipt
) -> str:
    """A message of ours the backup holds as not yet receipted, which the peer took: its
    delivery settled with the peer's receipt, as the worker settles one (its request then
    delivered, if it was the request). One a worker is posting right now is left to it (the
    peer answers the repeat with the same receipt); one given up stays as it is (its move
    may have been undone: the operator settles it with the peer's operator)."""
    item = session.scalar(
        select(OutboxItem).where(OutboxItem.message_id == message_id).with_for_update()
    )
    if item is not None and item.state in (outbox.FAILED, outbox.CANCELLED):
        raise Unrecoverable(
            f"it is {item.state} here, but the peer holds it with its receipt: retry its "
            f"delivery (`entraide deliveries retry {item.id}`), which the peer answers with "
            "that receipt"
        )
    if item is None or item.state not in (outbox.QUEUED, outbox.RETRY):
        return ALREADY  # in flight: its worker gets the same receipt for its post
    now = utc_now()
    message = session.get(Message, message_id)
    case = session.get(CaseFile, item.request_id, with_for_update=True)
    if message is None or case is None:  # rows are never deleted
        return ALREADY
    session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item.id)
        .values(
            state=outbox.DELIVERED,
            delivered_at=now,
            last_error=None,
            lease_until=None,
            lease_owner=None,
            updated_at=now,
        )
    )
    session.flush()
    _store_receipt(session, message_id, signed, receipt, now)
    if message.in_reply_to is None:
        case.status = status_after_receipt(case.status)
        case.updated_at = now
    record_many(
        session,
        [
            Event(
                actor="node",
                action="receipt.received",
                request_id=case.id,
                msg_id=message.msg_id,
                peer=case.peer_authority,
                details={
                    "envelope_hash": message.envelope_hash,
                    "signer_kid": receipt.signer_kid,
                    "recovered": True,
                },
            )
        ],
    )
    return SETTLED


def _store_receipt(
    session: Session,
    message_id: int,
    signed: SignedReceipt,
    receipt: VerifiedReceipt,
    now: datetime,
) -> None:
    session.connection().execute(
        RECEIPTS.insert(),
        {
            "message_id": message_id,
            "body": signed.body,
            "signature": signed.signature,
            "signer_kid": receipt.signer_kid,
            "received_at": receipt.received_at,
            "stored_at": now,
        },
    )


def _store_sent(
    session: Session,
    node: Node,
    envelope: env.WireEnvelope,
    header: env.Header,
    document: RequestDocument | MessageDocument,
    case: CaseFile | None,
    signed: SignedReceipt,
    receipt: VerifiedReceipt,
    streamed: bool,
) -> None:
    """Our message as our officer sent it then: the request moved as it moved then (judged by
    the lifecycle), stored (its streamed parts in the blob store), delivered, with the peer's
    receipt."""
    sealed_at = header.created_at
    moved: dict[str, object] = {}
    if case is None and isinstance(document, RequestDocument):
        case = CaseFile(
            id=header.conversation_id,
            direction=conversation.OUTBOUND,
            peer_authority=header.to_authority,
            status=status_after_receipt(QUEUED),
            urgency=document.urgency.level.value,
            created_at=sealed_at,
            updated_at=sealed_at,
        )
        conversation.set_deadlines(case, node.settings, document, now=sealed_at)
        session.add(case)
        session.flush()
    elif case is not None and isinstance(document, MessageDocument):
        before = moves.Before.of(case)
        conversation.send(case, document=document, now=sealed_at)
        if document.type is MessageType.ADDITIONAL_INFORMATION_REQUEST:
            case.question_msg_id = header.msg_id
        moved = moves.move_columns(before, case)
    else:  # check_content pairs a request with a new conversation, a message with a known one
        raise Unrecoverable("its content does not fit its request")
    if streamed:
        message_id = store_streamed(
            session, case=case, header=header, head=envelope, direction="outbound", received_at=None
        )
        size = len(envelope.header) + sum(info.length for info in header.parts)
    else:
        stored = store_envelope(
            session,
            case=case,
            envelope=envelope,
            header=header,
            direction="outbound",
            received_at=None,
        )
        message_id, size = stored.id, stored.size_bytes
    now = utc_now()
    session.connection().execute(
        outbox.OUTBOX.insert(),
        {
            "message_id": message_id,
            "request_id": case.id,
            "peer_authority": case.peer_authority,
            "state": outbox.DELIVERED,
            "priority": outbox.priority_of(case.urgency),
            "size_bytes": size,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": sealed_at,
            "updated_at": now,
            "delivered_at": receipt.received_at,
            "expires_at": None,
            **moved,
        },
    )
    _store_receipt(session, message_id, signed, receipt, now)
    record(
        session,
        actor="node",
        action="message.recovered",
        request_id=case.id,
        msg_id=header.msg_id,
        peer=case.peer_authority,
        details={
            "envelope_hash": envelope.envelope_hash,
            "status": case.status,
            "receipted_at": format_time(receipt.received_at),
        },
    )

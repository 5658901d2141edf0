"""The restored node's side of a recovery: ask a peer for what the two exchanged since a
time (app/recovery/serve.py), and take each message back in the order it was first taken.

A message of the peer's is taken back through the ordinary acceptance (every check of the
protocol, the request's lifecycle) with the receipt we signed for it then, which the peer
kept: only what that receipt proves we took comes back, and its lifetime may have run out
since. A message of ours comes back only if its header verifies with one of our own keys and
the peer's receipt with the peer's; it is opened with our own key's wrap, judged by the
lifecycle as when our officer sent it, and stored as delivered, with that receipt.

A message that cannot be taken back is reported, with why, and holds back the later messages
of its request, as a delivery does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.log import record
from app.crypto import envelope as env
from app.crypto.encoding import DecodeError, format_time, parse_time, utc_now
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
from app.errors import EntraideError, PeerError
from app.models import CaseFile, Peer
from app.node import Node
from app.p2p.service import (
    RECEIPTS,
    Recovered,
    accept_envelope,
    check_content,
    stored_message,
)
from app.peers.client import read_json_bounded
from app.peers.keys import claimed_signer_kid, pinned_keys, verify_peer_receipt
from app.recovery.request import sign_request
from app.recovery.serve import OURS, YOURS
from app.requests import conversation, moves
from app.requests.status import QUEUED, status_after_receipt
from app.requests.store import store_envelope

RECOVERY_PATH = "/p2p/v1/recovery"
# A page holds at most 16 MiB of sealed envelopes (serve.PAGE_BYTES), or one envelope of up
# to the body limit; as base64 and JSON, about a third more.
MAX_PAGE_BYTES = 64 * 1024 * 1024
MAX_PAGES = 100_000
RECOVERED = "recovered"
ALREADY = "already here"


@dataclass
class Entry:
    """A listed message: the peer's word for its role and time, checked as it is applied."""

    role: str
    msg_id: str
    at: str
    in_reply_to: str | None
    request_id: str | None
    wire: dict[str, Any] | None
    receipt: object
    streamed: bool
    error: str | None = None


@dataclass
class Summary:
    listed: int = 0
    received: int = 0  # the peer's messages taken back
    sent: int = 0  # our own messages taken back
    already: int = 0
    failed: list[Entry] = field(default_factory=list)


class Unrecoverable(Exception):
    """This message cannot be taken back (said in the summary), or not yet."""


def fetch_all(
    node: Node, http: httpx.Client, *, peer_url: str, peer: str, since: datetime
) -> list[Entry]:
    """Every page the peer lists for us since `since`, in its order."""
    entries: list[Entry] = []
    after: str | None = None
    for _ in range(MAX_PAGES):
        keys = node.keys
        body = sign_request(
            keys.signing,
            sig_kid=keys.signing_kid,
            from_authority=node.authority_id,
            to_authority=peer,
            since=since,
            after=after,
            created_at=utc_now(),
        )
        page = _post(http, peer_url + RECOVERY_PATH, body)
        entries.extend(_entry(item) for item in page["entries"])
        after = page["next"]
        if after is None:
            return entries
    raise PeerError("the peer's listing did not end", code="peer_bad_response")


def _post(http: httpx.Client, url: str, body: dict[str, str]) -> dict[str, Any]:
    try:
        with http.stream("POST", url, json=body) as response:
            answer = read_json_bounded(response, max_bytes=MAX_PAGE_BYTES)
            status = response.status_code
    except httpx.HTTPError as exc:
        raise PeerError(
            f"could not reach the peer at {url}: {type(exc).__name__}", code="peer_unreachable"
        ) from exc
    if status != 200:
        said = answer.get("detail") if isinstance(answer, dict) else None
        raise PeerError(
            f"the peer refused the recovery request (HTTP {status}: {str(said)[:300]})",
            code="peer_refused",
        )
    if (
        not isinstance(answer, dict)
        or not isinstance(answer.get("entries"), list)
        or not (answer.get("next") is None or isinstance(answer.get("next"), str))
    ):
        raise PeerError("the peer's listing is malformed", code="peer_bad_response")
    return answer


def _entry(item: object) -> Entry:
    if not isinstance(item, dict) or item.get("role") not in (OURS, YOURS):
        raise PeerError("the peer's listing holds a malformed entry", code="peer_bad_response")
    wire = item.get("envelope")
    header = _claimed_header(wire)
    return Entry(
        # The peer's "ours" is our "received"; kept in our words from here on.
        role="received" if item["role"] == OURS else "sent",
        msg_id=str(item.get("msg_id"))[:32],
        at=str(item.get("at")),
        in_reply_to=header.in_reply_to if header is not None else None,
        request_id=header.conversation_id if header is not None else None,
        wire=wire if isinstance(wire, dict) else None,
        receipt=item.get("receipt"),
        streamed=item.get("streamed") is True,
    )


def _claimed_header(wire: object) -> env.Header | None:
    """An entry's header as it claims, unverified: only to order and group entries."""
    try:
        envelope = env.decode_wire(wire, max_parts=10_000, max_header_bytes=1 << 20)
        return env.parse_header(envelope.header, len(envelope.parts))
    except env.EnvelopeError:
        return None


def _in_order(entries: list[Entry]) -> list[Entry]:
    """The peer's order (by our clock, to the second), and within one second a message after
    the one it follows: our answer and the question it answers, made within a second, are
    listed by their ids."""
    ordered: list[Entry] = []
    index = 0
    while index < len(entries):
        end = index
        while end < len(entries) and entries[end].at == entries[index].at:
            end += 1
        group = entries[index:end]
        while group:
            waiting = {entry.msg_id for entry in group}
            ready = next((entry for entry in group if entry.in_reply_to not in waiting), group[0])
            ordered.append(ready)
            group.remove(ready)
        index = end
    return ordered


def recover(
    node: Node,
    http: httpx.Client,
    *,
    peer: str,
    since: datetime,
    actor: str,
    progress: Callable[[Entry, str], None] | None = None,
) -> Summary:
    """Take back what `peer` lists since `since`; each message in a transaction of its own."""
    with unit_of_work(node.sessions) as session:
        row = session.query(Peer).filter(Peer.authority_id == peer).one_or_none()
        if row is None:
            raise PeerError(f"{peer} is not a pinned peer", code="unknown_peer")
        peer_url = row.public_url
    entries = fetch_all(node, http, peer_url=peer_url, peer=peer, since=since)
    summary = Summary(listed=len(entries))
    held: set[str] = set()
    for entry in _in_order(entries):
        if entry.request_id is not None and entry.request_id in held:
            entry.error = "held back: an earlier message of its request was not taken back"
            continue
        try:
            outcome = _apply(node, http, entry, peer=peer)
        except Unrecoverable as exc:
            entry.error = str(exc)
            if entry.request_id is not None:
                held.add(entry.request_id)
            continue
        if outcome == ALREADY:
            summary.already += 1
        elif entry.role == "received":
            summary.received += 1
        else:
            summary.sent += 1
        if progress is not None:
            progress(entry, outcome)
    summary.failed = [entry for entry in entries if entry.error is not None]
    with unit_of_work(node.sessions) as session:
        record(
            session,
            actor=actor,
            action="peer.recovered",
            outcome="ok" if not summary.failed else "partial",
            peer=peer,
            details={
                "since": format_time(since),
                "listed": summary.listed,
                "received": summary.received,
                "sent": summary.sent,
                "already": summary.already,
                "not_recovered": [entry.msg_id for entry in summary.failed][:100],
            },
        )
    return summary


def _apply(node: Node, http: httpx.Client, entry: Entry, *, peer: str) -> str:
    if entry.streamed or entry.wire is None:
        raise Unrecoverable(
            "it carries streamed evidence, which a recovery does not carry: ask the peer's "
            "operator to send it again"
        )
    try:
        if entry.role == "received":
            return _take_received(node, entry, peer=peer)
        return _take_sent(node, http, entry, peer=peer)
    except (EntraideError, ReceiptError, env.EnvelopeError, DecodeError) as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        code = getattr(exc, "code", None)
        raise Unrecoverable(f"{code}: {detail}" if code else detail) from exc
    except IntegrityError as exc:  # stored meanwhile by a node process running beside us
        raise Unrecoverable("stored meanwhile; run the recovery again") from exc


def _take_received(node: Node, entry: Entry, *, peer: str) -> str:
    """A message of the peer's: our own receipt of it first, then the ordinary acceptance."""
    envelope = env.decode_wire(
        entry.wire,
        max_parts=node.settings.max_envelope_parts,
        max_header_bytes=node.settings.max_header_bytes,
    )
    header = env.parse_header(envelope.header, len(envelope.parts))
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
    # Dated as any receipt must be, and within the envelope's lifetime: we never receipted
    # an envelope that had expired, so a receipt that says so was not given by this node
    # as it runs (its key taken, or a bug): nothing is taken back on it.
    check_received_at(receipt, created_at=header.created_at, now=utc_now())
    if receipt.received_at >= header.expires_at:
        raise Unrecoverable("its receipt is dated after the envelope expired")
    with unit_of_work(node.sessions) as session:
        if stored_message(session, header.msg_id) is not None:
            return ALREADY
        accept_envelope(session, node, wire=entry.wire, recovered=Recovered(signed, receipt))
    return RECOVERED


def _take_sent(node: Node, http: httpx.Client, entry: Entry, *, peer: str) -> str:
    """A message of ours the peer took: verified with our own key, opened with our own wrap."""
    settings = node.settings
    envelope = env.decode_wire(
        entry.wire,
        max_parts=settings.max_envelope_parts,
        max_header_bytes=settings.max_header_bytes,
    )
    header = env.parse_header(envelope.header, len(envelope.parts))
    if header.from_authority != node.authority_id or header.to_authority != peer:
        raise Unrecoverable("the envelope is not one of ours to this peer")
    own_key = node.keys.signing_public_for(header.from_sig_kid)
    if own_key is None:
        raise Unrecoverable("it is signed with a key this node does not hold")
    env.verify_header_signature(envelope, own_key)
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
    content_key = env.unwrap_content_key(header, node.keys, kid=header.from_enc_kid)
    env.check_commitment(header, content_key)
    env.check_parts(header, envelope.parts)
    opened = env.check_manifest(header, env.decrypt_parts(header, envelope.parts, content_key))
    with unit_of_work(node.sessions) as session:
        if stored_message(session, header.msg_id) is not None:
            return ALREADY
        case = session.get(CaseFile, header.conversation_id, with_for_update=True)
        if case is not None and case.peer_authority != peer:
            raise Unrecoverable("its request is one with another peer here")
        document = check_content(header, opened, case)
        _store_sent(session, node, envelope, header, document, case, signed, receipt)
    return RECOVERED


def _store_sent(
    session: Session,
    node: Node,
    envelope: env.WireEnvelope,
    header: env.Header,
    document: RequestDocument | MessageDocument,
    case: CaseFile | None,
    signed: SignedReceipt,
    receipt: VerifiedReceipt,
) -> None:
    """Our message as our officer sent it then: the request moved as it moved then (judged by
    the lifecycle), stored, delivered, with the peer's receipt."""
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
    message = store_envelope(
        session, case=case, envelope=envelope, header=header, direction="outbound", received_at=None
    )
    now = utc_now()
    session.connection().execute(
        outbox.OUTBOX.insert(),
        {
            "message_id": message.id,
            "request_id": case.id,
            "peer_authority": case.peer_authority,
            "state": outbox.DELIVERED,
            "priority": outbox.priority_of(case.urgency),
            "size_bytes": message.size_bytes,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": sealed_at,
            "updated_at": now,
            "delivered_at": receipt.received_at,
            "expires_at": None,
            **moved,
        },
    )
    session.connection().execute(
        RECEIPTS.insert(),
        {
            "message_id": message.id,
            "body": signed.body,
            "signature": signed.signature,
            "signer_kid": receipt.signer_kid,
            "received_at": receipt.received_at,
            "stored_at": now,
        },
    )
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


def parse_since(text: str) -> datetime:
    """`--since`: an RFC 3339 UTC time, as the backup's manifest and `restore` print it."""
    return parse_time(text)

"""Receiving an envelope whose large parts are streamed (docs/protocol.md section 8.5).

The peer first announces the envelope: header, signature and part 0 (the manifest), checked
as section 9 says up to the manifest (steps 1 to 30, with only part 0's bytes at hand: each
attachment's ciphertext length must be the one its manifest size implies). Then each part
arrives, in order, by offset: each whole chunk is authenticated before it is stored, and the
part's length, ciphertext SHA-256 and plaintext SHA-256 are checked at its end. When the last
part checks out, the remaining steps (31 on) run and the signed receipt is issued, in one
transaction with the stored message. Nothing but checked ciphertext is ever stored.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.audit.log import record
from app.crypto import envelope as env
from app.crypto.encoding import (
    DecodeError,
    load_canonical_object,
    sha256_hex,
    utc_now,
)
from app.crypto.part_put import HEADER as PART_PUT_HEADER
from app.crypto.part_put import part_put_signed
from app.crypto.receipts import SignedReceipt
from app.errors import EntraideError, EnvelopeRefused
from app.evidence.blobstore import BlobError, DirectoryBlobStore, UploadBusy
from app.evidence.stream import CIPHER_CHUNK, PartReceiver, least_recent_past
from app.models import BlobPart, CaseFile, InboundTransfer, Message, Part, Peer
from app.node import Node
from app.p2p.service import (
    Accepted,
    _check_time,
    _refuse,
    _stored_receipt,
    admit_opened,
    answer_repeat,
    check_encryption_keys,
    check_sender,
    stored_message,
)
from app.peers.keys import peer_signing_key, pinned_keys


@dataclass(frozen=True)
class Announced:
    accepted: Accepted | None  # set when the envelope is (now, or already) accepted
    offsets: list[dict[str, int]]


IDLE_RECEIVER_SECONDS = 300.0
# Receivers kept between a sender's PUTs, each holding its staging file open: past this
# many, the least recently used is closed (rebuilt from its stored chunks if needed again),
# as upload writers are (app/evidence/drafts.py: unbounded, they ran the node out of file
# descriptors).
MOST_KEPT_RECEIVERS = 128


def receive_upload_id(msg_id: str, index: int) -> str:
    return f"in-{msg_id}-{index}"


def _declared_parts(header: bytes) -> int:
    try:
        parts = load_canonical_object(header).get("parts")
    except DecodeError as exc:
        raise env.EnvelopeError("malformed_header", str(exc)) from exc
    if not isinstance(parts, list) or not parts:
        raise env.EnvelopeError("malformed_header", "parts must be a non-empty list")
    return len(parts)


def _manifest(
    header: env.Header, manifest_part: bytes, content_key: bytes, *, stored: bool = False
) -> env.Opened:
    """Steps 26 to 30 for part 0, and for each attachment the length its size implies.
    `stored`: a message this node accepted earlier, reopened (env.bind_manifest)."""
    # Bound to the header here; the attachments' hashes are checked as each part arrives.
    manifest = env.open_manifest_part(header, manifest_part, content_key, stored=stored)
    for number, entry in enumerate(manifest["attachments"], 1):
        if env.ciphertext_length(entry["size"]) != header.parts[number].length:
            raise env.EnvelopeError("manifest_mismatch", "an attachment differs from the manifest")
    return env.Opened(manifest=manifest, attachments=[])


def _content_key(node: Node, header: env.Header) -> bytes:
    content_key = env.unwrap_content_key(header, node.keys, kid=header.to_enc_kid)
    env.check_commitment(header, content_key)
    return content_key


def _offsets(
    store: DirectoryBlobStore, transfer: InboundTransfer, header: env.Header
) -> list[dict[str, int]]:
    done = held_parts(store, transfer, header)
    return [
        {"index": info.index, "offset": received_offset(store, transfer, header, info.index, done)}
        for info in header.parts[1:]
    ]


def held_parts(store: DirectoryBlobStore, transfer: InboundTransfer, header: env.Header) -> int:
    """Parts, from 1, complete, checked and still in the blob store.

    Normally `parts_done`. A part counted done whose blob has gone since (removed by hand, a
    restore from an older backup) is asked for again rather than receipted: a receipt for
    bytes this node no longer holds would be a false proof of delivery.
    """
    for index in range(1, transfer.parts_done + 1):
        if not store.exists(header.parts[index].sha256):
            return index - 1
    return transfer.parts_done


def received_offset(
    store: DirectoryBlobStore,
    transfer: InboundTransfer,
    header: env.Header,
    index: int,
    done: int,
) -> int:
    """Ciphertext bytes of part `index` stored and checked (whole chunks), without reading;
    `done` is `held_parts`."""
    info = header.parts[index]
    if index <= done:
        return info.length
    if index > done + 1:
        return 0
    path = store.uploads / receive_upload_id(transfer.msg_id, index)
    try:
        stored = path.stat().st_size
    except FileNotFoundError:
        return 0
    # The last chunk is never counted before the part completes (it must carry TAG_FINAL).
    chunks = -(-info.length // CIPHER_CHUNK)
    return min(stored // CIPHER_CHUNK, chunks - 1) * CIPHER_CHUNK


def _limits(node: Node, header: env.Header) -> None:
    settings = node.settings
    lengths = [info.length for info in header.parts[1:]]
    if any(
        length > env.ciphertext_length(settings.max_evidence_attachment_bytes) for length in lengths
    ):
        raise _refuse("too_large", "an attachment is larger than this node accepts", 413)
    if sum(lengths) > env.ciphertext_length(settings.max_evidence_request_bytes) + 17 * len(
        lengths
    ):
        raise _refuse("too_large", "the attachments are larger than this node accepts", 413)


def _within_peer_budget(session: Session, node: Node, header: env.Header) -> None:
    """A new transfer only while its sender's others leave room (ENTRAIDE_MAX_INBOUND_*):
    staged parts stay until their envelope expires, and a peer that announces without
    finishing would fill the blob store for everyone. Announcements of one peer take turns
    (its pin row locked), so two at once cannot both take the last place."""
    settings = node.settings
    suspended = session.scalar(
        select(Peer.suspended_at)
        .where(Peer.authority_id == header.from_authority)
        .with_for_update()
    )
    if suspended is not None:
        # Suspended since `check_sender` looked (which took no lock): a suspension drops the
        # peer's transfers under this same lock, so none may begin after it.
        raise _refuse(
            "peer_suspended", "this node has suspended exchanges with your authority", 403
        )
    under_way = list(
        session.scalars(
            select(InboundTransfer.header).where(
                InboundTransfer.sender_authority == header.from_authority
            )
        )
    )
    declared = sum(info.length for info in header.parts[1:])
    # An expired transfer receives nothing more, but what it received stays on disk until
    # the sweep may remove it (app/evidence/cleanup.py): its declared bytes (at most what it
    # holds) count until then, or a peer could stage without limit by letting short-lived
    # transfers lapse (from review). Not its place among those under way: transfers that
    # lapsed while this node was down must not keep new ones out for days.
    now = utc_now()
    swept_before = now - timedelta(hours=settings.evidence_orphan_hours)
    live = lapsed = 0
    for raw in under_way:
        try:
            other = announced_header(raw)
        except env.EnvelopeError:
            continue  # unreadable: the sweep reports it; it holds nothing we can count
        if other.expires_at < swept_before:
            continue  # the sweep removes it and what it received
        if other.expires_at <= now:
            lapsed += 1
        else:
            live += 1
        declared += sum(info.length for info in other.parts[1:])
    # One transfer is always taken, whatever its size (the per-request limit bounds it):
    # a budget smaller than one transfer would otherwise turn it away for ever. Lapsed ones
    # have a cap of their own, several times the live one: each is a row (up to a 64 KiB
    # header) read at every announcement (from review: else without limit in number).
    if (live or lapsed) and (
        live >= settings.max_inbound_transfers_per_peer
        or lapsed >= LAPSED_PER_LIVE * settings.max_inbound_transfers_per_peer
        or declared > settings.max_inbound_bytes_per_peer
    ):
        raise TooManyTransfers(
            f"{live} transfers of yours are under way here and {lapsed} lapsed ones await "
            f"removal, declaring {declared} bytes with this one (at most "
            f"{settings.max_inbound_transfers_per_peer} transfers under way and "
            f"{settings.max_inbound_bytes_per_peer} bytes); announce it again once some have "
            "completed"
        )


LAPSED_PER_LIVE = 4


class TooManyTransfers(EntraideError):
    """Not a refusal of the envelope (neither audited nor counted against the sender's
    address, whose other traffic goes on): flow control, answered 429 with Retry-After."""

    status_code = 429
    code = "too_many_transfers"
    retry_after = 60


def announce(session: Session, node: Node, store: DirectoryBlobStore, *, wire: object) -> Announced:
    settings = node.settings
    try:
        head = env.decode_wire(wire, max_parts=1, max_header_bytes=settings.max_header_bytes)
        if len(head.header) > settings.max_header_bytes:
            raise _refuse("too_large", "header too large", 413)
        count = _declared_parts(head.header)
        if count > settings.max_envelope_parts:
            raise _refuse("too_large", f"more than {settings.max_envelope_parts} parts", 413)
        header = env.parse_header(head.header, count)
    except env.EnvelopeError as exc:
        raise _refuse(exc.code, exc.detail) from exc
    peer = check_sender(session, node, head, header)
    envelope_hash = sha256_hex(head.header)
    existing = stored_message(session, header.msg_id)
    if existing is not None:
        if existing.direction == "inbound" and existing.envelope_hash == envelope_hash:
            # A transfer of it begun before it arrived inline is of no further use.
            session.execute(delete(InboundTransfer).where(InboundTransfer.msg_id == header.msg_id))
            return Announced(answer_repeat(session, node, header, existing, announced=True), [])
        raise _refuse("replayed", "this message id was already used for another envelope", 409)
    transfer = session.scalar(
        select(InboundTransfer).where(InboundTransfer.msg_id == header.msg_id)
    )
    if transfer is not None:
        if transfer.envelope_hash != envelope_hash:
            raise _refuse("replayed", "this message id was announced with another envelope", 409)
        if held_parts(store, transfer, header) == len(header.parts) - 1:
            return Announced(complete(session, node, transfer, header), [])
        return Announced(None, _offsets(store, transfer, header))
    # A new transfer only: one under way was checked when it was announced.
    check_encryption_keys(session, node, peer, header)
    _check_time(node, header)
    _limits(node, header)
    _within_peer_budget(session, node, header)
    try:
        content_key = _content_key(node, header)
        _manifest(header, head.parts[0], content_key)
    except env.EnvelopeError as exc:
        raise _refuse(exc.code, exc.detail) from exc
    now = utc_now()
    transfer = InboundTransfer(
        msg_id=header.msg_id,
        sender_authority=header.from_authority,
        envelope_hash=envelope_hash,
        header=head.header,
        signature=head.signature,
        manifest_part=head.parts[0],
        parts_done=0,
        created_at=now,
        updated_at=now,
    )
    session.add(transfer)
    record(
        session,
        actor=f"peer:{header.from_authority}",
        action="envelope.announced",
        msg_id=header.msg_id,
        peer=header.from_authority,
        details={
            "envelope_hash": envelope_hash,
            "parts": len(header.parts),
            "bytes": sum(info.length for info in header.parts),
        },
    )
    session.flush()
    if len(header.parts) == 1:
        return Announced(complete(session, node, transfer, header), [])
    return Announced(None, _offsets(store, transfer, header))


def transfer_header(transfer: InboundTransfer) -> env.Header:
    return announced_header(transfer.header)


def announced_header(raw: bytes) -> env.Header:
    """A transfer's stored header, parsed (the announcement carried part 0 only)."""
    return env.parse_header(raw, _declared_parts(raw))


def get_transfer(session: Session, msg_id: str, *, lock: bool = False) -> InboundTransfer:
    statement = select(InboundTransfer).where(InboundTransfer.msg_id == msg_id)
    transfer = session.scalar(statement.with_for_update() if lock else statement)
    if transfer is None:
        raise EnvelopeRefused(
            "unknown_transfer", "no envelope with this id is being received", status_code=404
        )
    return transfer


class TransferDamaged(EntraideError):
    """A transfer's stored announcement no longer opens: its header or part 0 altered or
    damaged in the database, or the key it was sealed to gone. Never the sender's doing (the
    announcement opened when it was stored), so never refused in its name: the row is dropped
    (`drop_damaged`) and the sender told to announce again, as for a transfer this node does
    not know (protocol.md section 8.5); it still holds the envelope."""

    status_code = 404
    code = "unknown_transfer"

    def __init__(self, transfer: InboundTransfer, cause: env.EnvelopeError) -> None:
        super().__init__("no envelope with this id is being received; announce it again")
        self.row_id = transfer.id
        self.msg_id = transfer.msg_id
        self.sender = transfer.sender_authority
        self.cause = cause


def drop_damaged(session: Session, damaged: TransferDamaged) -> None:
    """On record, in a transaction of its own; only the row found damaged (a fresh
    announcement of the same envelope, made meanwhile, stays)."""
    session.execute(delete(InboundTransfer).where(InboundTransfer.id == damaged.row_id))
    record(
        session,
        actor="node",
        action="evidence.transfer_dropped",
        outcome=damaged.cause.code,
        msg_id=damaged.msg_id,
        peer=damaged.sender,
        details={"detail": damaged.cause.detail[:200]},
    )


@dataclass(frozen=True)
class PartTarget:
    msg_id: str
    index: int
    length: int
    offset: int
    kwargs: dict[str, Any] = field(repr=False)  # the part's key: never in a log or traceback
    done: bool
    sender: str = ""  # the authority that announced it (signed); not who sends the bytes


@dataclass(frozen=True)
class SignedPut:
    offset: int  # its Upload-Offset
    signature: str | None = field(repr=False)  # its Entraide-Part-Signature, as received


class BadPartSignature(EnvelopeRefused):
    """A part's PUT with a signature that does not verify. `sender`: the transfer's, whose
    keys the caller may refresh (it may have rotated since it sealed the envelope)."""

    def __init__(self, sender: str) -> None:
        super().__init__(
            "bad_part_signature",
            f"the {PART_PUT_HEADER} header is not a signature of this PUT by its sender",
            status_code=403,
        )
        self.sender = sender


def _check_signed(
    session: Session,
    transfer: InboundTransfer,
    header: env.Header,
    index: int,
    put: SignedPut,
    *,
    required: bool,
) -> None:
    """A part's PUT is its sender's alone (protocol.md section 8.5): signed with the key that
    signed the envelope, or with the sender's current key (it may have rotated since). A peer
    that never signed one runs a release from before these signatures: its PUTs are taken
    unsigned until its first signed one, so that authorities need not upgrade all at once,
    unless the operator `required` signatures of every peer
    (ENTRAIDE_PART_SIGNATURES_REQUIRED: every peer runs a release that signs)."""
    authority = transfer.sender_authority
    peer = pinned_keys(session, authority)
    # Core reads, as for every P2P call's keys (app/peers/keys.py): not the whole row.
    signs = session.scalar(select(Peer.part_signatures_since).where(Peer.authority_id == authority))
    if put.signature is None:
        if peer is not None and signs is None and not required:
            return
        raise EnvelopeRefused(
            "bad_part_signature",
            f"a part's PUT must carry its sender's {PART_PUT_HEADER} header",
            status_code=403,
        )
    keys: list[bytes] = []
    if peer is not None:
        keys.append(peer.signing_key)
        signer = peer_signing_key(session, peer, header.from_sig_kid, signed_at=header.created_at)
        if signer is not None and signer != peer.signing_key:
            keys.append(signer)
    if not part_put_signed(keys, transfer.envelope_hash, index, put.offset, put.signature):
        raise BadPartSignature(authority)
    if signs is None:  # from now on, its parts come signed
        session.execute(
            update(Peer)
            .where(Peer.authority_id == authority, Peer.part_signatures_since.is_(None))
            .values(part_signatures_since=utc_now())
        )


class AttachmentsOpened:
    """The size and plaintext hash of each attachment, by envelope hash, for the transfers
    whose parts are arriving in this process.

    Each PUT of a part needs its attachment's entry of the manifest; decrypting and parsing
    part 0 again for each (up to the body limit and 250,000 values) let a peer make the node
    do that work at will with empty PUTs, answered 204 and so never counted against it (from
    review). The entries are a function of the envelope hash alone (the header it covers
    names part 0's hash, and part 0 was checked against it at the announcement); the content
    key is still unwrapped for each PUT, which keys the part."""

    # Every transfer several peers may have under way at once (16 each by default): a
    # full cache only costs a PUT the opening it did before.
    def __init__(self, most: int = 1024) -> None:
        self._most = most
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, list[tuple[int, str]]] = OrderedDict()

    def of(self, envelope_hash: str, opened: Callable[[], env.Opened]) -> list[tuple[int, str]]:
        with self._lock:
            entries = self._kept.get(envelope_hash)
            if entries is not None:
                self._kept.move_to_end(envelope_hash)
                return entries
        listed = opened().manifest["attachments"]
        entries = [(int(entry["size"]), str(entry["sha256"])) for entry in listed]
        with self._lock:
            self._kept[envelope_hash] = entries
            while len(self._kept) > self._most:
                self._kept.popitem(last=False)
        return entries


_ATTACHMENTS = AttachmentsOpened()


def part_target(
    session: Session,
    node: Node,
    store: DirectoryBlobStore,
    *,
    msg_id: str,
    index: int,
    open_keys: bool = True,
    put: SignedPut | None = None,
) -> PartTarget:
    """Where part `index` stands, refused if no part may arrive now. With `open_keys`, also
    what receiving it needs: the content key unsealed and the manifest decrypted, work that
    a caller who only asks where to resume (anyone who knows the message id) does not get:
    that caller's bytes are taken only from the envelope's sender, whose signature of the
    PUT (`put`) is checked first."""
    transfer = get_transfer(session, msg_id)
    try:
        header = transfer_header(transfer)
    except env.EnvelopeError as exc:
        raise TransferDamaged(transfer, exc) from exc
    if open_keys:
        _check_signed(
            session,
            transfer,
            header,
            index,
            put or SignedPut(0, None),
            required=node.settings.part_signatures_required,
        )
    if not 1 <= index < len(header.parts):
        raise EnvelopeRefused("unknown_part", "the envelope has no such part", status_code=404)
    info = header.parts[index]
    done = held_parts(store, transfer, header)
    if index <= done:
        return PartTarget(
            msg_id, index, info.length, info.length, {}, True, transfer.sender_authority
        )
    if header.expires_at <= utc_now():
        # As for an envelope posted whole (§8.2's sender stops at expiry): no new bytes, and
        # the clean-up may remove what an abandoned transfer received (app/evidence/cleanup).
        raise _refuse("expired", "the envelope has expired")
    if index != done + 1:
        raise EnvelopeRefused("part_out_of_order", f"send part {done + 1} first", status_code=409)
    offset = received_offset(store, transfer, header, index, done)
    if not open_keys:
        return PartTarget(msg_id, index, info.length, offset, {}, False, transfer.sender_authority)
    try:
        content_key = _content_key(node, header)
        plaintext_size, plaintext_sha256 = _ATTACHMENTS.of(
            transfer.envelope_hash, lambda: _manifest(header, transfer.manifest_part, content_key)
        )[index - 1]
    except env.EnvelopeError as exc:
        raise TransferDamaged(transfer, exc) from exc
    msg = header.msg_id_bytes
    return PartTarget(
        msg_id,
        index,
        info.length,
        offset,
        {
            "key": env.part_key(content_key, msg, index),
            "ad": env.part_ad(msg, index),
            "stream_header": info.stream_header,
            "length": info.length,
            "sha256": info.sha256,
            "plaintext_size": plaintext_size,
            "plaintext_sha256": plaintext_sha256,
        },
        False,
        transfer.sender_authority,
    )


def open_receiver(store: DirectoryBlobStore, target: PartTarget) -> PartReceiver:
    return PartReceiver.open(
        store,
        receive_upload_id(target.msg_id, target.index),
        key=target.kwargs["key"],
        ad=target.kwargs["ad"],
        stream_header=target.kwargs["stream_header"],
        length=target.kwargs["length"],
        sha256=target.kwargs["sha256"],
        plaintext_size=target.kwargs["plaintext_size"],
        plaintext_sha256=target.kwargs["plaintext_sha256"],
    )


class ReceiverCache:
    """Receivers kept between a peer's successive PUTs of a part in this process.

    A sender sends a long part in several requests (app/evidence/transfer.py), and opening a
    receiver rebuilds its secretstream state and hashes by reading back every stored chunk:
    kept here, only a restart or a long pause costs that. Between requests a kept receiver
    holds no lock: the sender's next request may reach another replica behind the same
    address, and a receiver that finds its staging object written elsewhere since rebuilds.
    """

    def __init__(self, idle_seconds: float = IDLE_RECEIVER_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[PartReceiver, float]] = {}

    def take(self, store: DirectoryBlobStore, target: PartTarget) -> PartReceiver:
        name = receive_upload_id(target.msg_id, target.index)
        now = time.monotonic()
        with self._lock:
            expired = [
                self._kept.pop(key)[0]
                for key, (_, since) in list(self._kept.items())
                if now - since > self.idle_seconds
            ]
            kept = self._kept.pop(name, None)
        for receiver in expired:
            receiver.close()
        if kept is not None:
            receiver = kept[0]
            try:
                current = receiver.resume()
            except UploadBusy:
                receiver.close()  # received elsewhere now: rebuilt when that request is over
                raise
            if current and receiver.stored_matches():
                return receiver
            receiver.close()  # its staging object was removed or changed meanwhile
        return open_receiver(store, target)

    def put_back(self, target: PartTarget, receiver: PartReceiver) -> None:
        if receiver.failed:  # the next request rebuilds a receiver from the stored chunks
            receiver.close()
            return
        receiver.drop_pending()
        try:
            receiver.suspend()  # unlocked between requests, as upload writers are
        except (OSError, BlobError):
            receiver.close()
            return
        with self._lock:
            self._kept[receive_upload_id(target.msg_id, target.index)] = (
                receiver,
                time.monotonic(),
            )
            evicted = least_recent_past(self._kept, MOST_KEPT_RECEIVERS)
        for old in evicted:
            old.close()

    def close(self) -> None:
        with self._lock:
            for receiver, _ in self._kept.values():
                receiver.close()
            self._kept.clear()


def part_received(
    session: Session,
    node: Node,
    store: DirectoryBlobStore,
    *,
    msg_id: str,
    index: int,
    from_offset: int,
) -> bool:
    """Part `index` is complete and published: count it. True once every part is held, for
    `complete_held`, in a transaction of its own: a refusal of the whole envelope (a reply
    whose predecessor has not arrived yet, say: 425, tried again) must not undo the count,
    or the sender would send the whole last part again on every attempt."""
    transfer = get_transfer(session, msg_id, lock=True)
    try:
        header = transfer_header(transfer)
    except env.EnvelopeError as exc:
        raise TransferDamaged(transfer, exc) from exc
    if transfer.parts_done < index:
        transfer.parts_done = index
        transfer.updated_at = utc_now()
    record(
        session,
        actor=f"peer:{transfer.sender_authority}",
        action="evidence.part_received",
        msg_id=msg_id,
        peer=transfer.sender_authority,
        details={
            "index": index,
            "length": header.parts[index].length,
            "sha256": header.parts[index].sha256,
            # Where the receiver that completed the part was opened (rebuilt from the stored
            # chunks): bytes before it were not sent again after an interruption.
            "from_offset": from_offset,
        },
    )
    session.flush()
    return held_parts(store, transfer, header) == len(header.parts) - 1


def complete_held(
    session: Session, node: Node, store: DirectoryBlobStore, *, msg_id: str
) -> Accepted | None:
    """Accept the envelope whose parts are all held (steps 31 on), or None if one is missing
    again; if another request completed it meanwhile, its stored receipt."""
    transfer = session.scalar(
        select(InboundTransfer).where(InboundTransfer.msg_id == msg_id).with_for_update()
    )
    if transfer is None:
        existing = stored_message(session, msg_id)
        if existing is None or existing.direction != "inbound":
            raise EnvelopeRefused(
                "unknown_transfer", "no envelope with this id is being received", status_code=404
            )
        return Accepted(receipt=_stored_receipt(session, node, existing), created=False)
    try:
        header = transfer_header(transfer)
    except env.EnvelopeError as exc:
        raise TransferDamaged(transfer, exc) from exc
    if held_parts(store, transfer, header) != len(header.parts) - 1:
        return None
    return complete(session, node, transfer, header)


def complete(
    session: Session, node: Node, transfer: InboundTransfer, header: env.Header
) -> Accepted:
    """Steps 31 on, then store the message with its parts in the blob store, and the receipt."""
    existing = stored_message(session, header.msg_id)
    if existing is not None:
        # The same message id arrived meanwhile on the inline route (a sender may change how
        # it carries an envelope between attempts): that copy's receipt, if it is this one.
        if existing.direction == "inbound" and existing.envelope_hash == transfer.envelope_hash:
            session.delete(transfer)
            return Accepted(receipt=_stored_receipt(session, node, existing), created=False)
        raise _refuse("replayed", "this message id was already used for another envelope", 409)
    try:
        opened = _manifest(header, transfer.manifest_part, _content_key(node, header))
    except env.EnvelopeError as exc:
        # It opened when it was announced: what no longer does is what this node stored.
        raise TransferDamaged(transfer, exc) from exc

    def store(case: CaseFile, now: Any) -> int:
        head = env.WireEnvelope(transfer.header, transfer.signature, [transfer.manifest_part])
        message_id = store_streamed(
            session, case=case, header=header, head=head, direction="inbound", received_at=now
        )
        session.delete(transfer)
        return message_id

    return admit_opened(
        session,
        node,
        header=header,
        envelope_hash=transfer.envelope_hash,
        opened=opened,
        store=store,
    )


def store_streamed(
    session: Session,
    *,
    case: CaseFile,
    header: env.Header,
    head: env.WireEnvelope,
    direction: str,
    received_at: datetime | None,
) -> int:
    """A message whose parts past the manifest are in the blob store: its row, part 0 (in
    `head`, with its header and signature) and a `blob_parts` row for each other part, as
    its signed header names them. Returns the message's id."""
    message = Message(
        msg_id=header.msg_id,
        request_id=case.id,
        direction=direction,
        sender_authority=header.from_authority,
        recipient_authority=header.to_authority,
        in_reply_to=header.in_reply_to,
        created_at=header.created_at,
        expires_at=header.expires_at,
        received_at=received_at,
        header=head.header,
        signature=head.signature,
        envelope_hash=head.envelope_hash,
        size_bytes=len(head.header) + sum(info.length for info in header.parts),
    )
    session.add(message)
    session.flush()
    session.add(Part(message_id=message.id, part_index=0, ciphertext=head.parts[0]))
    session.add_all(
        BlobPart(
            message_id=message.id, part_index=info.index, digest=info.sha256, length=info.length
        )
        for info in header.parts[1:]
    )
    session.flush()
    return message.id


def receipt_wire(accepted: Accepted) -> dict[str, str]:
    receipt: SignedReceipt = accepted.receipt
    return receipt.to_wire()

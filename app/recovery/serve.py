"""The peer's side of a recovery: what it exchanged with the restored node, page by page.

Both directions, in the order the restored node first took them, by its own clock: a
message of its own by the time it sealed it (its signed `created_at`, when it moved its
request), one of ours by the time its receipt says it took it. Each comes with the receipt
that proves it was taken: ours for its messages, its own for ours. Messages of ours it has
not receipted are not listed: our delivery worker is still sending them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from app.crypto.encoding import b64e, format_time
from app.evidence.blobstore import BlobError, DirectoryBlobStore
from app.evidence.node_store import blob_store
from app.evidence.stream import CIPHER_CHUNK
from app.models import BlobPart, Message, Part, Receipt
from app.node import Node
from app.recovery.request import (
    PartRequest,
    RecoveryRefused,
    RecoveryRequest,
    cursor_of,
    split_cursor,
)
from app.requests.store import load_envelopes

# A page: at most this many messages, and past the first, at most this many sealed bytes
# (a restored node reads a page whole; an envelope is at most the body limit).
PAGE_ENTRIES = 100
PAGE_BYTES = 16 * 1024 * 1024
YOURS = "yours"  # sent by the asking node, received here
OURS = "ours"  # sent from here, receipted by the asking node


@dataclass(frozen=True)
class Listed:
    message: Message
    role: str
    at: datetime
    receipt_body: bytes
    receipt_signature: bytes
    streamed: bool
    part0_bytes: int


def _side(session: Session, request: RecoveryRequest, role: str) -> list[Listed]:
    own = request.from_authority
    if role == YOURS:
        at = Message.created_at
        mine = (Message.direction == "inbound") & (Message.sender_authority == own)
    else:
        at = Receipt.received_at
        mine = (Message.direction == "outbound") & (Message.recipient_authority == own)
    where = [mine, at >= request.since]
    if request.after is not None:
        after_at, after_id = split_cursor(request.after)
        where.append(or_(at > after_at, and_(at == after_at, Message.msg_id > after_id)))
    streamed = exists().where(BlobPart.message_id == Message.id)
    # What a page carries of it: the whole envelope, or for a streamed one part 0 (with the
    # header, counted below).
    carried = (
        select(func.length(Part.ciphertext))
        .where(Part.message_id == Message.id, Part.part_index == 0)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Message, at, Receipt.body, Receipt.signature, streamed, carried)
        .join(Receipt, Receipt.message_id == Message.id)
        .where(*where)
        .order_by(at, Message.msg_id)
        .limit(PAGE_ENTRIES)
    ).all()
    return [
        Listed(row[0], role, row[1], row[2], row[3], bool(row[4]), int(row[5] or 0)) for row in rows
    ]


def list_page(session: Session, request: RecoveryRequest) -> dict[str, Any]:
    """One page of the exchange with the asking node, from its cursor on."""
    yours, ours = _side(session, request, YOURS), _side(session, request, OURS)
    both = yours + ours
    both.sort(key=lambda listed: (listed.at, listed.message.msg_id))
    page: list[Listed] = []
    size = 0
    for listed in both[:PAGE_ENTRIES]:
        message = listed.message
        cost = len(message.header) + listed.part0_bytes if listed.streamed else message.size_bytes
        if page and size + cost > PAGE_BYTES:
            break
        page.append(listed)
        size += cost
    envelopes = load_envelopes(session, [item.message for item in page])
    entries = []
    for item in page:
        envelope = envelopes.get(item.message.id)
        entries.append(
            {
                "role": item.role,
                "msg_id": item.message.msg_id,
                # Routing metadata both nodes hold: where it stands in its conversation,
                # for the asking node to order and hold back what it cannot take back.
                "request_id": item.message.request_id,
                "in_reply_to": item.message.in_reply_to,
                "at": format_time(item.at),
                "streamed": item.streamed,
                # Streamed: its header, signature and part 0 (the manifest) only, as the
                # announcement of §8.5 carries it; each other part is asked for by itself.
                "envelope": None if envelope is None else envelope.to_wire(),
                "receipt": {
                    "receipt": b64e(item.receipt_body),
                    "signature": b64e(item.receipt_signature),
                },
            }
        )
    # More after this page: some listed rows did not fit, or a side may have had more rows.
    more = len(page) < len(both) or PAGE_ENTRIES in (len(yours), len(ours))
    last = page[-1] if page else None
    following = cursor_of(last.at, last.message.msg_id) if more and last is not None else None
    return {"v": 1, "entries": entries, "next": following}


@dataclass(frozen=True)
class ListedPart:
    """A streamed part of a message listed for the asking node, in this node's blob store."""

    store: DirectoryBlobStore
    digest: str
    length: int

    def chunks(self, offset: int) -> Iterator[bytes]:
        with self.store.open(self.digest) as reader:
            reader.seek(offset)
            while data := reader.read(CIPHER_CHUNK):
                yield data


def find_part(session: Session, node: Node, request: PartRequest) -> ListedPart:
    """The part asked for, if its message is one the listing gives the asker: one it sent
    here, or one sent from here that it receipted."""
    asker = request.from_authority
    message = session.scalar(select(Message).where(Message.msg_id == request.msg_id))
    receipted = message is not None and (
        session.scalar(select(Receipt.id).where(Receipt.message_id == message.id)) is not None
    )
    listed = message is not None and (
        (message.direction == "inbound" and message.sender_authority == asker)
        or (message.direction == "outbound" and message.recipient_authority == asker and receipted)
    )
    part = (
        session.scalar(
            select(BlobPart).where(
                BlobPart.message_id == message.id, BlobPart.part_index == request.index
            )
        )
        if message is not None and listed
        else None
    )
    if part is None:
        raise RecoveryRefused("unknown_part", "no such streamed part of a message of yours", 404)
    if request.offset > part.length:
        raise RecoveryRefused("bad_offset", f"the part is {part.length} bytes long")
    store = blob_store(node.settings)
    try:
        whole = store.exists(part.digest) and store.size(part.digest) == part.length
    except (BlobError, OSError):  # gone between the two
        whole = False
    if not whole:
        raise RecoveryRefused(
            "part_missing", "this node no longer holds that part's evidence whole", 404
        )
    return ListedPart(store, part.digest, part.length)

"""Storing and loading sealed envelopes: the only way content reaches the database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from app.crypto.encoding import format_time
from app.crypto.envelope import Header, WireEnvelope
from app.models import CaseFile, Message, Part


@dataclass(frozen=True)
class StoredMessage:
    """What callers need of a message just stored."""

    id: int
    msg_id: str
    size_bytes: int


# Written with Core inserts, not added to the session: the ORM's unit of work cost several
# times the statements themselves (about a fifth of a submission's CPU, and of an arrival's).
# Such rows never enter the session's identity map, and Core statements do not autoflush:
# code that mixes the two in one transaction flushes the session first (store_envelope does).
MESSAGES = cast(Table, Message.__table__)
PARTS = cast(Table, Part.__table__)


def store_envelope(
    session: Session,
    *,
    case: CaseFile,
    envelope: WireEnvelope,
    header: Header,
    direction: str,
    received_at: datetime | None,
) -> StoredMessage:
    session.flush()  # the conversation's row first: the message refers to it
    size = len(envelope.header) + sum(len(part) for part in envelope.parts)
    connection = session.connection()
    inserted = connection.execute(
        MESSAGES.insert(),
        {
            "msg_id": header.msg_id,
            "request_id": case.id,
            "direction": direction,
            "sender_authority": header.from_authority,
            "recipient_authority": header.to_authority,
            "in_reply_to": header.in_reply_to,
            "created_at": header.created_at,
            "expires_at": header.expires_at,
            "received_at": received_at,
            "header": envelope.header,
            "signature": envelope.signature,
            "envelope_hash": envelope.envelope_hash,
            "size_bytes": size,
        },
    )
    key = inserted.inserted_primary_key
    if key is None:  # pragma: no cover - a single-row insert always has one
        raise RuntimeError("the message insert returned no id")
    message_id = int(key[0])
    connection.execute(
        PARTS.insert(),
        [
            {"message_id": message_id, "part_index": index, "ciphertext": data}
            for index, data in enumerate(envelope.parts)
        ],
    )
    return StoredMessage(message_id, header.msg_id, size)


def row_disagrees(message: Message, header: Header) -> str | None:
    """What of a message's row differs from its signed header, or None. The row's routing
    columns are copies of the header's (store_envelope): a row altered in the database (moved
    to another conversation, backdated) must not be shown under the header's signature."""
    copies: dict[str, tuple[object, object]] = {
        "msg_id": (message.msg_id, header.msg_id),
        "conversation": (message.request_id, header.conversation_id),
        "sender": (message.sender_authority, header.from_authority),
        "recipient": (message.recipient_authority, header.to_authority),
        "in_reply_to": (message.in_reply_to, header.in_reply_to),
        # To the second, as signed: an envelope sealed here keeps its row's finer time.
        "created_at": (format_time(message.created_at), format_time(header.created_at)),
        "expires_at": (format_time(message.expires_at), format_time(header.expires_at)),
    }
    differ = [name for name, (stored, signed) in copies.items() if stored != signed]
    return f"its row's {', '.join(differ)} differ from its signed header" if differ else None


def load_envelope(session: Session, message: Message) -> WireEnvelope:
    parts = session.scalars(
        select(Part.ciphertext).where(Part.message_id == message.id).order_by(Part.part_index)
    )
    return WireEnvelope(header=message.header, signature=message.signature, parts=list(parts))


def load_envelopes(session: Session, messages: Sequence[Message]) -> dict[int, WireEnvelope]:
    """`load_envelope` for a batch (the delivery worker's claim), in one query."""
    parts: dict[int, list[bytes]] = {message.id: [] for message in messages}
    rows = session.execute(
        select(Part.message_id, Part.ciphertext)
        .where(Part.message_id.in_(list(parts)))
        .order_by(Part.message_id, Part.part_index)
    )
    for message_id, ciphertext in rows:
        parts[message_id].append(ciphertext)
    return {
        message.id: WireEnvelope(
            header=message.header, signature=message.signature, parts=parts[message.id]
        )
        for message in messages
    }

"""Storing and loading sealed envelopes: the only way content reaches the database."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crypto.envelope import Header, WireEnvelope
from app.models import CaseFile, Message, Part


def store_envelope(
    session: Session,
    *,
    case: CaseFile,
    envelope: WireEnvelope,
    header: Header,
    direction: str,
    received_at: datetime | None,
) -> Message:
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
        header=envelope.header,
        signature=envelope.signature,
        envelope_hash=envelope.envelope_hash,
        size_bytes=len(envelope.header) + sum(len(part) for part in envelope.parts),
    )
    session.add(message)
    session.flush()
    session.add_all(
        Part(message_id=message.id, part_index=index, ciphertext=data)
        for index, data in enumerate(envelope.parts)
    )
    return message


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

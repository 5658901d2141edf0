"""Bodies and answers of the local API's request routes."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app.config import AUTHORITY_ID_PATTERN
from app.domain.document import RequestDocument
from app.domain.messages import MessageDocument

AuthorityId = Annotated[str, StringConstraints(pattern=AUTHORITY_ID_PATTERN)]
FileName = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^/\\\x00-\x1f]+$")
]
MediaType = Annotated[
    str,
    StringConstraints(
        max_length=255,
        pattern=r"^[a-z0-9!#$&^_.+-]{1,63}/[a-z0-9!#$&^_.+-]{1,63}"
        r"(?:; ?[a-z0-9!#$&^_.+-]{1,63}=[A-Za-z0-9!#$&^_.+-]{1,63}){0,4}$",
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InlineAttachment(Strict):
    name: FileName
    media_type: MediaType = "application/octet-stream"
    content_base64: str = Field(max_length=48 * 1024 * 1024)

    @field_validator("content_base64")
    @classmethod
    def _valid_base64(cls, value: str) -> str:
        try:
            base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError("content_base64 is not valid base64") from exc
        return value

    def content(self) -> bytes:
        return base64.b64decode(self.content_base64)


class SubmitRequest(Strict):
    to: AuthorityId
    document: RequestDocument
    attachments: list[InlineAttachment] = Field(default_factory=list, max_length=32)


class SubmitMessage(Strict):
    document: MessageDocument
    attachments: list[InlineAttachment] = Field(default_factory=list, max_length=32)


class Submitted(BaseModel):
    id: str
    msg_id: str
    status: str
    delivery: str


class ReceiptView(BaseModel):
    received_at: datetime
    envelope_hash: str
    signer_kid: str
    receipt: str
    signature: str


class DeliveryView(BaseModel):
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    delivered_at: datetime | None


class AttachmentView(BaseModel):
    index: int
    name: str
    media_type: str
    size: int
    sha256: str
    href: str


class MessageView(BaseModel):
    msg_id: str
    direction: str
    kind: str
    sender: str
    recipient: str
    in_reply_to: str | None
    created_at: datetime
    received_at: datetime | None
    envelope_hash: str
    # The exact signed header bytes and signature, so a reader can check the sender's
    # signature independently of this node.
    header: str
    signature: str
    content: dict[str, Any]
    attachments: list[AttachmentView]
    delivery: DeliveryView | None
    receipt: ReceiptView | None


class RequestSummary(BaseModel):
    id: str
    direction: str
    peer: str
    status: str
    urgency: str
    created_at: datetime
    updated_at: datetime


class RequestDetail(RequestSummary):
    document: dict[str, Any]
    messages: list[MessageView]


class RequestPage(BaseModel):
    items: list[RequestSummary]
    next_cursor: str | None

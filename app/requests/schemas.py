"""Bodies and answers of the local API's request routes."""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import date, datetime
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.config import AUTHORITY_ID_PATTERN
from app.domain.document import RequestDocument
from app.domain.messages import MessageDocument
from app.oneline import is_one_line

AuthorityId = Annotated[str, StringConstraints(pattern=AUTHORITY_ID_PATTERN)]


def _one_line(name: str) -> str:
    # Shown in file lists and terminals at both ends: a C1 control or a bidirectional override
    # (`evil\u202etxt.exe` reads `evilexe.txt`) would show another name than the file has.
    # The local API only: what peers may send is the protocol's rule (protocol.md §6.2).
    if not is_one_line(name):
        raise PydanticCustomError(
            "string_pattern_mismatch",
            "a file name has no control, line separator or bidirectional formatting character",
        )
    return name


FileName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255, pattern=r"^[^/\\\x00-\x1f\x7f]+$"),
    AfterValidator(_one_line),
]


def _lower_type_and_keys(value: object) -> object:
    # Media types and their parameter names are case-insensitive (RFC 9110 §8.3.1): what
    # Python's mimetypes guesses (`audio/AMR`) is taken, spelt as the protocol wants it (lower
    # case: peers compare it byte for byte). A parameter's value keeps its case.
    if not isinstance(value, str):
        return value
    head, *parameters = value.split(";")
    spelt = [head.lower()]
    for parameter in parameters:
        key, equals, rest = parameter.partition("=")
        spelt.append(key.lower() + equals + rest)
    return ";".join(spelt)


MediaType = Annotated[
    str,
    BeforeValidator(_lower_type_and_keys),
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

    @model_validator(mode="after")
    def _evidence_matches_attachments(self) -> Self:
        hashes = [hashlib.sha256(item.content()).hexdigest() for item in self.attachments]
        details = [
            InitErrorDetails(
                type=PydanticCustomError(code, message), loc=("document", *loc), input=value
            )
            for loc, code, message, value in self.document.attachment_problems(hashes)
        ]
        if details:
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self


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


class DeadlinesView(BaseModel):
    requested_date: date | None
    acknowledge_by: datetime | None
    decide_by: datetime | None
    execute_by: datetime | None
    postponed_until: date | None


class RequestSummary(BaseModel):
    id: str
    direction: str
    peer: str
    status: str
    urgency: str
    created_at: datetime
    updated_at: datetime
    # The deadline the request is working towards in its status, and whether it has passed.
    due_at: datetime | None
    overdue: bool
    deadlines: DeadlinesView
    handling: str
    restricted: bool


class RequestDetail(RequestSummary):
    document: dict[str, Any]
    messages: list[MessageView]
    # The message types this node may send now (docs/domain.md, "The life of a request").
    allowed_messages: list[str]


# A client's name, which `access.restrict` checks names an active officer: names are
# spelled as `clients create` allows (app/auth/service.py) since 2026-11-30, and one made
# before stays nameable (from review: refused here, such an officer could never be named).
OfficerName = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class SetOfficers(Strict):
    officers: list[OfficerName] = Field(max_length=50)


class RestrictionView(BaseModel):
    id: str
    direction: str
    peer: str
    handling: str
    restricted: bool
    officers: list[str]
    created_at: datetime


class RequestPage(BaseModel):
    items: list[RequestSummary]
    next_cursor: str | None

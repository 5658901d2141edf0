"""Bodies and answers of the evidence routes (local API)."""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, StrictInt, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.domain.document import RequestDocument
from app.domain.messages import MessageDocument
from app.requests.schemas import AuthorityId, FileName, MediaType, Strict


class DeclaredAttachment(Strict):
    name: FileName
    media_type: MediaType = "application/octet-stream"
    # StrictInt: JSON's `"1_0"`, `true` and `2.0` are no sizes (lax mode read 10, 1 and 2).
    size: StrictInt = Field(ge=0)


class CreateDraft(Strict):
    to: AuthorityId
    document: RequestDocument
    attachments: list[DeclaredAttachment] = Field(default_factory=list, max_length=63)


class CreateReplyDraft(Strict):
    """A message of a request this node holds, with large evidence: what a requested
    authority returns when it executes a request (or a requesting one sends in reply). The
    request is the route's (`POST /api/v1/requests/{id}/messages/drafts`)."""

    document: MessageDocument
    attachments: list[DeclaredAttachment] = Field(default_factory=list, max_length=63)

    @model_validator(mode="after")
    def _evidence_names_declared_attachments(self) -> Self:
        """Evidence that names an attachment must name one declared here, and two items
        naming one attachment must attest the same hash. That each hash is the attachment's
        is checked when it is submitted, once every byte has been uploaded and hashed."""
        attested = [""] * len(self.attachments)
        for item in self.document.evidence:
            if item.attachment is not None and item.attachment <= len(attested):
                attested[item.attachment - 1] = attested[item.attachment - 1] or item.sha256
        details = [
            InitErrorDetails(
                type=PydanticCustomError(code, message), loc=("document", *loc), input=value
            )
            for loc, code, message, value in self.document.attachment_problems(attested)
        ]
        if details:
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self


class UploadView(Strict):
    index: int
    name: str
    size: int
    offset: int
    complete: bool
    href: str
    # The plaintext SHA-256 the node computed as the bytes arrived, once complete: what the
    # attachment will be sent as (a client resuming an upload checks its file against it).
    sha256: str | None = None


class DraftCreated(Strict):
    """What an Idempotency-Key keeps of a draft's creation (app/evidence/router.py)."""

    id: str


class DraftView(Strict):
    id: str
    to: str
    request_id: str | None = None  # the request a reply answers; none for a new request
    state: str
    attachments: list[UploadView]


class ReplaceDocument(Strict):
    """`PUT /api/v1/evidence/drafts/{id}/document`: the draft's new document, a request's
    (§4.1) or a message's (§4.4) as the draft is, judged as at the draft's creation."""

    document: dict[str, Any]


class DraftDocument(Strict):
    document: dict[str, Any]

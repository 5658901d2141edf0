"""Bodies and answers of the evidence routes (local API)."""

from __future__ import annotations

from pydantic import Field

from app.domain.document import RequestDocument
from app.requests.schemas import AuthorityId, FileName, MediaType, Strict


class DeclaredAttachment(Strict):
    name: FileName
    media_type: MediaType = "application/octet-stream"
    size: int = Field(ge=0)


class CreateDraft(Strict):
    to: AuthorityId
    document: RequestDocument
    attachments: list[DeclaredAttachment] = Field(default_factory=list, max_length=63)


class UploadView(Strict):
    index: int
    name: str
    size: int
    offset: int
    complete: bool
    href: str


class DraftView(Strict):
    id: str
    to: str
    state: str
    attachments: list[UploadView]

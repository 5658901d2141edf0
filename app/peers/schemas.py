"""Bodies and answers of the peer administration routes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.models import Peer


class AddPeer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=500)
    fingerprint: str = Field(max_length=100)


class SuspendPeer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    authority_id: str = Field(max_length=40)
    # Judged by `suspend_peer` (400 invalid_reason, as documented), not here (422).
    reason: str


class ResumePeer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    authority_id: str = Field(max_length=40)


class PeerView(BaseModel):
    authority_id: str
    name: str
    public_url: str
    fingerprint: str
    signing_kid: str
    encryption_kid: str
    log_kid: str
    added_at: datetime
    updated_at: datetime
    suspended_at: datetime | None = None
    suspended_reason: str | None = None
    # When the peer first signed a streamed part (protocol.md §8.5): null while it runs a
    # release from before those signatures, whose parts are taken unsigned.
    part_signatures_since: datetime | None = None

    @classmethod
    def of(cls, peer: Peer) -> PeerView:
        return cls(
            authority_id=peer.authority_id,
            name=peer.name,
            public_url=peer.public_url,
            fingerprint=peer.fingerprint,
            signing_kid=peer.signing_kid,
            encryption_kid=peer.encryption_kid,
            log_kid=peer.log_kid,
            added_at=peer.added_at,
            updated_at=peer.updated_at,
            suspended_at=peer.suspended_at,
            suspended_reason=peer.suspended_reason,
            part_signatures_since=peer.part_signatures_since,
        )

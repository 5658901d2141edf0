"""Removing what abandoned uploads and transfers leave in the blob store.

A blob is kept while any row names it: a stored message's part (`blob_parts`) or an upload of
a draft (`evidence_uploads`). A staging upload is kept while its draft is open or its inbound
transfer exists. Everything else older than `evidence_orphan_hours` goes; the grace period
covers a blob finalised whose row is not yet committed.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.evidence.blobstore import DirectoryBlobStore
from app.models import BlobPart, EvidenceDraft, EvidenceUpload, InboundTransfer


def cleanup_orphans(
    session: Session, store: DirectoryBlobStore, *, older_than_hours: float
) -> tuple[int, int]:
    """Returns (uploads removed, blobs removed)."""
    referenced = set(session.scalars(select(BlobPart.digest)))
    referenced.update(
        digest for digest in session.scalars(select(EvidenceUpload.digest)) if digest is not None
    )
    open_drafts = set(
        session.scalars(select(EvidenceDraft.id).where(EvidenceDraft.state == "open"))
    )
    transfers = set(session.scalars(select(InboundTransfer.msg_id)))

    def upload_is_live(upload_id: str) -> bool:
        direction, _, rest = upload_id.partition("-")
        owner = rest.rpartition("-")[0]
        return (direction == "out" and owner in open_drafts) or (
            direction == "in" and owner in transfers
        )

    return store.cleanup(
        is_referenced=referenced.__contains__,
        upload_is_live=upload_is_live,
        older_than_seconds=older_than_hours * 3600,
    )

"""The attachment download route's path for streamed evidence (see app/evidence/reading.py)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.errors import NotFound
from app.evidence.node_store import blob_store
from app.evidence.reading import StoredEvidenceCorrupt, has_blob_parts, streamed_download
from app.models import Message
from app.node import Node
from app.requests.service import actor_of, get_case


def _disposition(name: str) -> str:
    fallback = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in '"\\' else "_" for ch in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"


def maybe_streamed(
    session: Session,
    node: Node,
    *,
    request_id: str,
    msg_id: str,
    index: int,
    principal: Principal,
) -> StreamingResponse | JSONResponse | None:
    """The streamed response if this message's attachments are in the blob store, else None."""
    case = get_case(session, request_id)
    message = session.scalar(
        select(Message).where(Message.request_id == case.id, Message.msg_id == msg_id)
    )
    if message is None:
        raise NotFound("no such message in this request", code="unknown_message")
    if not has_blob_parts(session, message):
        return None
    try:
        download = streamed_download(
            session,
            node,
            blob_store(node.settings),
            message=message,
            index=index,
            actor=actor_of(principal),
        )
    except StoredEvidenceCorrupt as exc:
        # Answered, not raised, so that the refusal's audit entry commits with this request.
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=500)
    # The media type is the peer's claim: reported, never used to render the bytes.
    return StreamingResponse(
        download.chunks,
        media_type="application/octet-stream",
        headers={
            "content-length": str(download.size),
            "content-disposition": _disposition(download.name),
            "x-entraide-media-type": download.media_type,
            "x-entraide-sha256": download.sha256,
        },
    )

"""The attachment download route's path for streamed evidence (see app/evidence/reading.py)."""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from urllib.parse import quote

from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.audit.log import record_alone
from app.auth.lasting import StillAllowed, TokenWithdrawn
from app.auth.service import Principal
from app.db import unit_of_work
from app.evidence.node_store import blob_store
from app.evidence.reading import (
    PlannedDownload,
    check_download,
    download_chunks,
    has_blob_parts,
    plan_download,
    record_download,
)
from app.node import Node
from app.requests.service import actor_of, message_of, visible_case

log = logging.getLogger(__name__)


def _disposition(name: str) -> str:
    fallback = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in '"\\' else "_" for ch in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"


def _while_allowed(
    node: Node, plan: PlannedDownload, principal: Principal, chunks: Generator[bytes, None, None]
) -> Iterator[bytes]:
    """The plaintext, for as long as the client's token is valid (app/auth/lasting.py): a
    download stopped so ends as a broken transfer, never as a short file taken for whole."""
    try:
        yield from StillAllowed(node, principal).through(chunks)
    except TokenWithdrawn as stopped:
        log.warning(
            "download of %s/%s stopped: the client's token was withdrawn (%s)",
            plan.msg_id,
            plan.index,
            stopped.refused.code,
        )
        record_alone(
            node.sessions,
            actor=actor_of(principal),
            action="attachment.downloaded",
            outcome=stopped.refused.code,
            request_id=plan.request_id,
            msg_id=plan.msg_id,
            details={"index": plan.index, "detail": "stopped: the token was withdrawn meanwhile"},
        )
        raise


def plan_streamed(
    session: Session,
    node: Node,
    *,
    request_id: str,
    msg_id: str,
    index: int,
    principal: Principal,
) -> PlannedDownload | None:
    """The download of an attachment in the blob store, or None (an inline attachment)."""
    message = message_of(session, visible_case(session, request_id, principal), msg_id)
    if not has_blob_parts(session, message):
        return None
    return plan_download(session, node, message=message, index=index)


def streamed_response(
    node: Node, plan: PlannedDownload, principal: Principal
) -> StreamingResponse | JSONResponse:
    """Checks the whole blob with no transaction open (SQLite has one writer: a long read
    inside a transaction would hold every other write), then records the download."""
    store = blob_store(node.settings)
    actor = actor_of(principal)
    problem = check_download(store, plan)
    with unit_of_work(node.sessions) as session:
        record_download(session, plan, actor=actor, problem=problem)
    if problem is not None:
        detail = f"attachment {plan.index} of {plan.msg_id}: {problem}"
        return JSONResponse({"error": "stored_envelope_corrupt", "detail": detail}, status_code=500)
    # The media type is the peer's claim: reported, never used to render the bytes.
    return StreamingResponse(
        _while_allowed(node, plan, principal, download_chunks(node, store, plan, actor=actor)),
        media_type="application/octet-stream",
        headers={
            "content-length": str(plan.size),
            "content-disposition": _disposition(plan.name),
            "x-entraide-media-type": plan.media_type,
            "x-entraide-sha256": plan.sha256,
        },
    )

"""P2P: a restored peer asks for what it exchanged with this node (app/recovery/serve.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from app.audit.log import record
from app.crypto.encoding import format_time, utc_now
from app.db import reading, unit_of_work
from app.deps import PEER_SIGNED, NodeDep, record_p2p_refusal, source_address
from app.node import Node
from app.p2p.refusals import json_body
from app.peers.keys import peer_signing_key, pinned_keys
from app.recovery.request import (
    PartRequest,
    RecoveryRefused,
    RecoveryRequest,
    check_request,
    parse_part_request,
    parse_request,
)
from app.recovery.serve import ListedPart, find_part, list_page
from app.tls import check_peer_certificate

router = APIRouter(prefix="/p2p/v1", tags=["p2p"], dependencies=[Depends(PEER_SIGNED)])
# Both routes' body: a request signed by the asking node (app/recovery/request.py).
SIGNED_REQUEST: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["request", "signature"],
                    "properties": {
                        "request": {"type": "string"},
                        "signature": {"type": "string"},
                    },
                }
            }
        },
    }
}


def _authenticate(
    session: Session,
    node: Node,
    request: RecoveryRequest | PartRequest,
    body: bytes,
    signature: bytes,
    scope: Scope,
) -> None:
    """The checks of docs/protocol.md §8.7, in its order: the signer, its certificate, its
    key and signature, the addressee, freshness, suspension."""
    peer = pinned_keys(session, request.from_authority)
    if peer is None:
        raise RecoveryRefused("unknown_sender", "the sender is not a pinned peer", 403)
    # With mutual TLS, the caller's certificate must be the signer's own: a request
    # captured and replayed within its freshness window comes from another connection.
    presented = check_peer_certificate(session, node.settings, scope)
    if presented is not None and presented != request.from_authority:
        raise RecoveryRefused(
            "certificate_mismatch", "the client certificate is another peer's", 403
        )
    key = peer_signing_key(session, peer, request.sig_kid, signed_at=request.created_at)
    if key is None:
        raise RecoveryRefused(
            "unknown_key", "the request is signed with a key not pinned here", 403
        )
    check_request(
        request,
        body,
        signature,
        signer_public=key,
        own_authority=node.authority_id,
        now=utc_now(),
        skew=timedelta(seconds=max(node.settings.clock_skew_seconds, 60)),
    )
    if peer.suspended_at is not None:  # said only to the key's holder, as for envelopes
        raise RecoveryRefused(
            "peer_suspended", "this node has suspended exchanges with your authority", 403
        )


def _answer(node: Node, wire: object, scope: Scope) -> tuple[RecoveryRequest, dict[str, Any]]:
    request, body, signature = parse_request(wire)
    with reading(node.sessions) as session:
        _authenticate(session, node, request, body, signature, scope)
        page = list_page(session, request)
    with unit_of_work(node.sessions) as session:
        record(
            session,
            actor=f"peer:{request.from_authority}",
            action="recovery.served",
            peer=request.from_authority,
            details={
                "since": format_time(request.since),
                "after": request.after,
                "entries": len(page["entries"]),
                "more": page["next"] is not None,
            },
        )
    return request, page


def _refused(node: Node, wire: object, refusal: RecoveryRefused, source: str) -> None:
    claimed = None
    if isinstance(wire, dict):
        for parse in (parse_request, parse_part_request):
            try:
                claimed = parse(wire)[0].from_authority
                break
            except RecoveryRefused:
                continue
    with unit_of_work(node.sessions) as session:
        if record_p2p_refusal(session, node, source):
            record(
                session,
                actor=f"peer:{claimed}" if claimed else f"address:{source}",
                action="recovery.refused",
                outcome=refusal.code,
                peer=claimed,
                details={"code": refusal.code, "detail": refusal.detail, "claimed": True},
            )


@router.post(
    "/recovery",
    openapi_extra=SIGNED_REQUEST,
)
async def recovery_page(request: Request, node: NodeDep) -> JSONResponse:
    """What this node and the signing peer exchanged since a time, one page: for a peer
    restored from a backup (docs/protocol.md §8.7)."""
    wire = await json_body(request)
    try:
        if wire is None:
            raise RecoveryRefused("malformed_recovery_request", "the body is not JSON")
        _request, page = await run_in_threadpool(_answer, node, wire, request.scope)
    except RecoveryRefused as refusal:
        await run_in_threadpool(_refused, node, wire, refusal, source_address(request))
        raise
    return JSONResponse(page)


def _part(node: Node, wire: object, scope: Scope) -> tuple[PartRequest, ListedPart]:
    request, body, signature = parse_part_request(wire)
    with reading(node.sessions) as session:
        _authenticate(session, node, request, body, signature, scope)
        part = find_part(session, node, request)
    with unit_of_work(node.sessions) as session:
        record(
            session,
            actor=f"peer:{request.from_authority}",
            action="recovery.part_served",
            msg_id=request.msg_id,
            peer=request.from_authority,
            details={"index": request.index, "offset": request.offset, "length": part.length},
        )
    return request, part


@router.post(
    "/recovery/parts",
    openapi_extra=SIGNED_REQUEST,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def recovery_part(request: Request, node: NodeDep) -> StreamingResponse:
    """A streamed part of a message the recovery listing holds, from an offset: its
    ciphertext, as this node's blob store holds it (docs/protocol.md §8.7)."""
    wire = await json_body(request)
    try:
        if wire is None:
            raise RecoveryRefused("malformed_recovery_request", "the body is not JSON")
        asked, part = await run_in_threadpool(_part, node, wire, request.scope)
    except RecoveryRefused as refusal:
        await run_in_threadpool(_refused, node, wire, refusal, source_address(request))
        raise
    return StreamingResponse(
        part.chunks(asked.offset),
        media_type="application/octet-stream",
        headers={"content-length": str(part.length - asked.offset)},
    )

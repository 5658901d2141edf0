"""P2P API: peers post envelopes here. No bearer token: every envelope is signed."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.db import unit_of_work
from app.deps import PEER_SIGNED, NodeDep, record_p2p_refusal, source_address
from app.errors import EnvelopeRefused
from app.p2p.service import Accepted, accept_envelope, record_refusal

router = APIRouter(prefix="/p2p/v1", tags=["p2p"], dependencies=[Depends(PEER_SIGNED)])

RECEIPT_SCHEMA = {
    "type": "object",
    "required": ["receipt", "signature"],
    "properties": {"receipt": {"type": "string"}, "signature": {"type": "string"}},
}


def _accept(node: NodeDep, wire: object) -> Accepted:
    try:
        with unit_of_work(node.sessions) as session:
            return accept_envelope(session, node, wire=wire)
    except IntegrityError:
        # Two copies of one envelope raced past the replay check (PostgreSQL, parallel
        # retries); the loser's transaction rolled back, and the winner's receipt is the
        # answer for both.
        with unit_of_work(node.sessions) as session:
            return accept_envelope(session, node, wire=wire)


@router.post(
    "/envelopes",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
    responses={
        200: {"content": {"application/json": {"schema": RECEIPT_SCHEMA}}},
        201: {"content": {"application/json": {"schema": RECEIPT_SCHEMA}}},
    },
)
async def receive_envelope(request: Request, node: NodeDep) -> JSONResponse:
    raw = await request.body()
    try:
        wire: object = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8, bad JSON, absurdly long integers
        wire = None
    try:
        if wire is None:
            raise EnvelopeRefused("malformed_envelope", "the body is not a JSON object")
        accepted = await run_in_threadpool(_accept, node, wire)
    except EnvelopeRefused as refusal:
        await run_in_threadpool(_record_refusal, node, wire, refusal, source_address(request))
        raise
    return JSONResponse(accepted.receipt.to_wire(), status_code=201 if accepted.created else 200)


def _record_refusal(node: NodeDep, wire: object, refusal: EnvelopeRefused, source: str) -> None:
    with unit_of_work(node.sessions) as session:
        # Anyone can post garbage here: past a limit per address, refusals are only counted.
        if record_p2p_refusal(session, node, source):
            record_refusal(session, wire=wire, refusal=refusal)

"""P2P API: peers post envelopes here. No bearer token: every envelope is signed."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.db import unit_of_work
from app.deps import PEER_SIGNED, NodeDep, source_address
from app.errors import EnvelopeRefused
from app.openapi import RECEIPT_SCHEMA
from app.p2p.batch import accept_batch, parse_batch
from app.p2p.refusals import audit_refusals, json_body
from app.p2p.service import Accepted, accept_envelope
from app.peers.client import MAX_BATCH_ENVELOPES

router = APIRouter(prefix="/p2p/v1", tags=["p2p"], dependencies=[Depends(PEER_SIGNED)])


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
    wire = await json_body(request)
    try:
        if wire is None:
            raise EnvelopeRefused("malformed_envelope", "the body is not a JSON object")
        accepted = await run_in_threadpool(_accept, node, wire)
    except EnvelopeRefused as refusal:
        source = source_address(request)
        await run_in_threadpool(audit_refusals, node, [(wire, refusal)], source=source)
        raise
    return JSONResponse(accepted.receipt.to_wire(), status_code=201 if accepted.created else 200)


BATCH_ANSWER_SCHEMA = {
    "type": "object",
    "required": ["results"],
    "properties": {
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "integer"},
                    "receipt": {"type": "string"},
                    "signature": {"type": "string"},
                    "error": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
        }
    },
}


@router.post(
    "/envelopes/batch",
    status_code=200,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["v", "envelopes"],
                        "properties": {
                            "v": {"type": "integer", "enum": [1]},
                            "request_ids": {
                                "type": "array",
                                "items": {"type": ["string", "null"]},
                            },
                            "envelopes": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": MAX_BATCH_ENVELOPES,
                                "items": {"type": "object"},
                            },
                        },
                    }
                }
            },
        }
    },
    responses={200: {"content": {"application/json": {"schema": BATCH_ANSWER_SCHEMA}}}},
)
async def receive_batch(request: Request, node: NodeDep) -> JSONResponse:
    """Several envelopes, one answer each, in order (docs/protocol.md section 8.6)."""
    body = await json_body(request)
    source = source_address(request)
    try:
        batch = parse_batch(body)
    except EnvelopeRefused as refusal:
        await run_in_threadpool(audit_refusals, node, [(None, refusal)], source=source)
        raise
    answers = await run_in_threadpool(lambda: accept_batch(node, batch, source=source))
    # Each envelope refused inside a batch counts as a single post's refusal does (from an
    # earlier note: they were answered and audited but on no count a dashboard watches);
    # the items left unchecked past the batch's refusal cap (429) were refused by nothing.
    for answer in answers:
        if 400 <= answer.status < 500 and answer.status != 429:
            request.app.state.metrics.envelope_refused(str(answer.body["error"]))
    return JSONResponse({"results": [answer.to_wire() for answer in answers]})

"""Local API: requests, their conversations and attachments (role: officer)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.clock import ClockDep, UtcMoment
from app.db import unit_of_work
from app.deps import NodeDep, OfficerDep, SessionDep, UnitOfWorkRoute
from app.domain.messages import MessageDocument
from app.evidence.download import plan_streamed, streamed_response
from app.plainint import PlainInt
from app.requests import access, idempotency, proof, schemas, service
from app.requests.lifecycle import State

router = APIRouter(prefix="/api/v1/requests", tags=["requests"], route_class=UnitOfWorkRoute)

RequestId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
MsgId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]


def _submitted(case_id: str, msg_id: str, status: str) -> schemas.Submitted:
    return schemas.Submitted(id=case_id, msg_id=msg_id, status=status, delivery="queued")


def _disposition(name: str) -> str:
    # An ASCII fallback for old clients, then the exact UTF-8 name (RFC 6266, RFC 8187).
    fallback = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in '"\\' else "_" for ch in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"


def _once(
    node: NodeDep,
    principal: OfficerDep,
    key: str,
    route: str,
    body: BaseModel,
    response: Response,
    submit: Callable[[Session], schemas.Submitted],
) -> schemas.Submitted:
    """A submission under the caller's Idempotency-Key (app/requests/idempotency.py)."""
    return idempotency.answered_once(
        node.sessions, principal, key, route, body, response, submit, schemas.Submitted
    )


@router.post("", status_code=201)
def submit_request(
    body: schemas.SubmitRequest,
    node: NodeDep,
    principal: OfficerDep,
    response: Response,
    idempotency_key: idempotency.KeyHeader = None,
) -> schemas.Submitted:
    def submit(session: Session) -> schemas.Submitted:
        case, message = service.submit_request(session, node, body=body, principal=principal)
        return _submitted(case.id, message.msg_id, case.status)

    if idempotency_key is not None:
        return _once(
            node, principal, idempotency_key, "POST /api/v1/requests", body, response, submit
        )
    # The unit of work in the route's own thread, begun and committed there: SessionDep would
    # cost two more trips through the thread pool on the busiest route (docs/benchmarks.md).
    with unit_of_work(node.sessions) as session:
        return submit(session)


@router.get("")
def list_requests(
    session: SessionDep,
    principal: OfficerDep,
    direction: Literal["inbound", "outbound"] | None = None,
    # One of the statuses: a misspelt one was an empty page, which read as "none".
    status: State | None = None,
    peer: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[PlainInt, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    overdue: bool | None = None,
    due_before: UtcMoment | None = None,
    *,
    clock: ClockDep,
) -> schemas.RequestPage:
    return service.list_requests(
        session,
        direction=direction,
        status=None if status is None else status.value,
        peer=peer,
        limit=limit,
        cursor=cursor,
        principal=principal,
        now=clock(),
        overdue=overdue,
        due_before=due_before,
    )


@router.get("/{request_id}")
def read_request(
    request_id: RequestId,
    session: SessionDep,
    node: NodeDep,
    principal: OfficerDep,
    clock: ClockDep,
) -> schemas.RequestDetail:
    access.check_visible(node, request_id=request_id, principal=principal, action="request.read")
    return service.read_request(
        session, node, request_id=request_id, principal=principal, now=clock()
    )


def check_dates(document: MessageDocument, now: datetime, skew_seconds: int) -> None:
    """A 422 like the schema's, at the field: dates judged by this node's clock."""
    problems = document.date_problems(
        today=now.astimezone(UTC).date(), latest=now + timedelta(seconds=skew_seconds)
    )
    errors = [
        {"type": code, "loc": ("body", "document", *loc), "msg": msg, "input": value}
        for loc, code, msg, value in problems
    ]
    if errors:
        raise RequestValidationError(errors)


@router.post("/{request_id}/messages", status_code=201)
def add_message(
    request_id: RequestId,
    body: schemas.SubmitMessage,
    node: NodeDep,
    principal: OfficerDep,
    response: Response,
    clock: ClockDep,
    idempotency_key: idempotency.KeyHeader = None,
) -> schemas.Submitted:
    access.check_visible(
        node, request_id=request_id, principal=principal, action="message.submitted"
    )

    def submit(session: Session) -> schemas.Submitted:
        # Here, not before: a submission repeated under its Idempotency-Key gets the answer
        # it had, even once the date it gave has passed.
        check_dates(body.document, clock(), node.settings.clock_skew_seconds)
        case, message = service.add_message(
            session, node, request_id=request_id, body=body, principal=principal
        )
        return _submitted(case.id, message.msg_id, case.status)

    if idempotency_key is not None:
        route = f"POST /api/v1/requests/{request_id}/messages"
        return _once(node, principal, idempotency_key, route, body, response, submit)
    with unit_of_work(node.sessions) as session:  # as submit_request: in this thread
        return submit(session)


@router.get("/{request_id}/messages/{msg_id}/proof")
def custody_proof(
    request_id: RequestId, msg_id: MsgId, node: NodeDep, principal: OfficerDep
) -> dict[str, Any]:
    """A custody proof of one message (app/crypto/proof.py): what the sender signed, the
    manifest it sealed, and the receiver's signed receipt, checkable offline with `entraide
    proof verify`. It holds the envelope's content key: handle it as the request itself."""
    access.check_visible(node, request_id=request_id, principal=principal, action=proof.ACTION)
    with unit_of_work(node.sessions) as session:
        return proof.custody_proof(
            session, node, request_id=request_id, msg_id=msg_id, principal=principal
        )


@router.get(
    "/{request_id}/messages/{msg_id}/attachments/{index}",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        }
    },
)
def download_attachment(
    request_id: RequestId,
    msg_id: MsgId,
    index: Annotated[PlainInt, Path(ge=1, le=1000)],
    node: NodeDep,
    principal: OfficerDep,
) -> Response:
    access.check_visible(
        node, request_id=request_id, principal=principal, action="attachment.downloaded"
    )
    # Transactions of its own, not SessionDep's: evidence in the blob store is checked
    # between them (app/evidence/download.py).
    with unit_of_work(node.sessions) as session:
        planned = plan_streamed(
            session, node, request_id=request_id, msg_id=msg_id, index=index, principal=principal
        )
        if planned is None:  # small, inline in the envelope: read in this transaction
            download = service.read_attachment(
                session,
                node,
                request_id=request_id,
                msg_id=msg_id,
                index=index,
                principal=principal,
            )
    if planned is not None:  # large evidence, in the blob store (app/evidence)
        return streamed_response(node, planned, principal)
    # The media type is the peer's claim: it is reported, never used to render the bytes.
    return Response(
        content=download.data,
        media_type="application/octet-stream",
        headers={
            "content-disposition": _disposition(download.name),
            "x-entraide-media-type": download.media_type,
            "x-entraide-sha256": download.sha256,
        },
    )

"""Local API for operators: deliveries that are stuck, failed, to retry or to cancel (admin).

An admin sees routing metadata and delivery history, never request content.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from app.delivery import admin, outbox
from app.deps import AdminDep, SessionDep, UnitOfWorkRoute
from app.plainint import PlainInt

router = APIRouter(prefix="/api/v1/admin/deliveries", tags=["admin"], route_class=UnitOfWorkRoute)

DeliveryId = Annotated[PlainInt, Path(ge=1, le=outbox.MAX_ID)]


class AttemptView(BaseModel):
    attempt: int
    worker: str
    started_at: datetime
    finished_at: datetime
    outcome: str
    http_status: int | None
    error: str | None


class DeliveryView(BaseModel):
    id: int
    request_id: str
    msg_id: str
    peer: str
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    expires_at: datetime | None
    delivered_at: datetime | None
    last_error: str | None
    history: list[AttemptView]


class DeliveryPage(BaseModel):
    items: list[DeliveryView]
    next_cursor: int | None


def _view(row: admin.DeliveryRow) -> DeliveryView:
    item = row.item
    pending = item.state in ("queued", "retry")
    return DeliveryView(
        id=item.id,
        request_id=row.message.request_id,
        msg_id=row.message.msg_id,
        peer=item.peer_authority,
        state=item.state,
        attempts=item.attempts,
        created_at=item.created_at,
        next_attempt_at=item.next_attempt_at if pending else None,
        expires_at=item.expires_at,
        delivered_at=item.delivered_at,
        last_error=item.last_error,
        history=[
            AttemptView(
                attempt=a.attempt,
                worker=a.worker,
                started_at=a.started_at,
                finished_at=a.finished_at,
                outcome=a.outcome,
                http_status=a.http_status,
                error=a.error,
            )
            for a in row.attempts
        ],
    )


@router.get("")
def list_deliveries(
    session: SessionDep,
    principal: AdminDep,
    state: Literal["queued", "in_flight", "retry", "delivered", "failed", "cancelled"]
    | None = None,
    stuck_minutes: Annotated[PlainInt | None, Query(ge=0, le=525_600)] = None,
    peer: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[PlainInt, Query(ge=1, le=500)] = 100,
    cursor: Annotated[PlainInt | None, Query(ge=1, le=outbox.MAX_ID)] = None,
) -> DeliveryPage:
    stuck = timedelta(minutes=stuck_minutes) if stuck_minutes is not None else None
    rows, next_cursor = admin.list_deliveries(
        session, state=state, stuck_for=stuck, peer=peer, limit=limit, before=cursor
    )
    return DeliveryPage(items=[_view(row) for row in rows], next_cursor=next_cursor)


@router.post("/{delivery_id}/retry")
def retry(delivery_id: DeliveryId, session: SessionDep, principal: AdminDep) -> dict[str, object]:
    item = admin.retry_delivery(session, delivery_id=delivery_id, actor=f"client:{principal.name}")
    return {"id": item.id, "state": item.state}


@router.post("/{delivery_id}/cancel")
def cancel(delivery_id: DeliveryId, session: SessionDep, principal: AdminDep) -> dict[str, object]:
    item = admin.cancel_delivery(session, delivery_id=delivery_id, actor=f"client:{principal.name}")
    return {"id": item.id, "state": item.state}

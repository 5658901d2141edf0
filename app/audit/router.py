"""The auditor's API (role auditor: the log, never request content) and the proofs peers
fetch to witness our log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from app.audit import service
from app.audit.checkpoints import latest_signed, log_verifier, log_verifier_key, sign_checkpoint
from app.audit.witnessed import WitnessedDamaged, cosigned, listing, view
from app.clock import UtcMoment
from app.deps import PEER_SIGNED, AuditorDep, NodeDep, ReadingDep, SessionDep, UnitOfWorkRoute
from app.errors import NotFound, StoredDataCorrupt
from app.models import WitnessAlarm
from app.plainint import PlainInt

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], route_class=UnitOfWorkRoute)
p2p_router = APIRouter(
    prefix="/p2p/v1/audit",
    tags=["p2p"],
    dependencies=[Depends(PEER_SIGNED)],
    route_class=UnitOfWorkRoute,
)

Name = Annotated[str | None, Query(max_length=140)]
Size = Annotated[PlainInt | None, Query(ge=0, le=2**62)]


@router.get("")
def list_entries(
    session: SessionDep,
    principal: AuditorDep,
    # With a zone: a naive time is ambiguous in a log kept in UTC (422, never a guess).
    since: UtcMoment | None = None,
    until: UtcMoment | None = None,
    actor: Name = None,
    action: Name = None,
    request_id: Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")] = None,
    peer: Name = None,
    outcome: Name = None,
    cursor: Size = None,
    limit: Annotated[PlainInt, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    where = service.EntryFilter(since, until, actor, action, request_id, peer, outcome)
    rows, next_cursor = service.query_entries(session, where=where, before=cursor, limit=limit)
    return {"items": [service.entry_view(row) for row in rows], "next_cursor": next_cursor}


@router.get("/checkpoint")
def get_checkpoint(session: SessionDep, node: NodeDep, principal: AuditorDep) -> dict[str, Any]:
    checkpoint = latest_signed(session, log_verifier(node.authority_id, node.keys.log_public))
    if checkpoint is None:
        raise NotFound("no checkpoint has been signed yet", code="no_checkpoint")
    return {
        "size": checkpoint.size,
        "root_hash": checkpoint.root_hash.hex(),
        "note": checkpoint.note,
        "created_at": checkpoint.created_at,
        "log_key": log_verifier_key(node.authority_id, node.keys.log),
    }


@router.post("/checkpoint", status_code=201)
def new_checkpoint(session: SessionDep, node: NodeDep, principal: AuditorDep) -> dict[str, Any]:
    checkpoint = sign_checkpoint(
        session, authority_id=node.authority_id, log_key=node.keys.log, anchor=node.log_anchor
    )
    return {
        "size": checkpoint.size,
        "root_hash": checkpoint.root_hash.hex(),
        "note": checkpoint.note,
    }


@router.get("/proofs/inclusion")
def inclusion(
    session: SessionDep,
    principal: AuditorDep,
    index: Annotated[PlainInt, Query(ge=0, le=2**62)],
    size: Size = None,
) -> dict[str, Any]:
    return service.prove_inclusion(session, index=index, size=size)


@router.get("/proofs/consistency")
def consistency(
    session: SessionDep,
    principal: AuditorDep,
    first: Annotated[PlainInt, Query(ge=0, le=2**62)],
    second: Size = None,
) -> dict[str, Any]:
    return service.prove_consistency(session, first=first, second=second)


@router.get("/alarms")
def alarms(session: SessionDep, principal: AuditorDep) -> list[dict[str, Any]]:
    rows = session.scalars(select(WitnessAlarm).order_by(WitnessAlarm.id.desc()).limit(500))
    return [
        {
            "peer": alarm.peer_authority,
            "reason": alarm.reason,
            "known_checkpoint": alarm.known_note,
            "new_checkpoint": alarm.new_note,
            "created_at": alarm.created_at,
            "resolved_at": alarm.resolved_at,
            "resolution": alarm.resolution,
        }
        for alarm in rows
    ]


@router.get("/witnessed")
def witnessed(
    session: SessionDep, principal: AuditorDep, peer: Name = None
) -> list[dict[str, Any]]:
    """A row holding a value that cannot be read is listed with its id and the columns,
    never the values (from review: one answered 500, or showed the text a size was made)."""
    return [view(row) for row in listing(session, peer=peer, limit=500)]


@p2p_router.get("/consistency")
def peer_consistency(
    session: ReadingDep,
    first: Annotated[PlainInt, Query(ge=0, le=2**62)],
    second: Annotated[PlainInt, Query(ge=0, le=2**62)],
) -> dict[str, Any]:
    """Hashes only: lets a witness check that our log only ever grew."""
    return service.prove_consistency(session, first=first, second=second)


@p2p_router.get("/cosignature")
def peer_cosignature(
    session: ReadingDep, authority: Annotated[str, Query(max_length=40)]
) -> dict[str, str]:
    """The latest checkpoint of `authority`'s log that this node cosigned, with the cosignature."""
    try:
        note = cosigned(session, authority)
    except WitnessedDamaged as exc:  # its witnessing is held (app/audit/witness.py)
        column = f"witnessed_checkpoints.{exc.columns[0]}"
        raise StoredDataCorrupt.of_column(column, "stored value damaged") from exc
    if note is None:
        raise NotFound("this node has cosigned no checkpoint of that log", code="no_cosignature")
    return {"note": note}

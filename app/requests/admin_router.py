"""Local API: who may see a restricted request on this node (role: admin).

Administrators see only routing metadata here (ids, peer, handling, names); reading a
request's content stays with officers, and only with the officers named on it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import exists, select, true
from sqlalchemy.orm import Session

from app.deps import AdminDep, SessionDep, UnitOfWorkRoute
from app.models import CaseFile, RequestOfficer
from app.requests import access, schemas
from app.requests.service import get_case

router = APIRouter(prefix="/api/v1/admin/requests", tags=["admin"], route_class=UnitOfWorkRoute)

RequestId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]


def _view(session: Session, case: CaseFile) -> schemas.RestrictionView:
    return schemas.RestrictionView(
        id=case.id,
        direction=case.direction,
        peer=case.peer_authority,
        handling=case.handling,
        restricted=case.restricted,
        officers=access.officers_of(session, case),
        created_at=case.created_at,
    )


@router.get("/restricted")
def list_restricted(session: SessionDep, principal: AdminDep) -> list[schemas.RestrictionView]:
    """Restricted requests, those with no officer named first (seen by nobody: they wait for
    an administrator), then newest first, up to 500: past that, the oldest ones with officers
    named are left out, never one that waits (from review)."""
    named = exists().where(RequestOfficer.request_id == CaseFile.id)
    cases = session.scalars(
        select(CaseFile)
        .where(CaseFile.restricted == true())
        .order_by(named, CaseFile.created_at.desc(), CaseFile.id.desc())
        .limit(500)
    )
    return [_view(session, case) for case in cases]


@router.get("/{request_id}/officers")
def get_officers(
    request_id: RequestId, session: SessionDep, principal: AdminDep
) -> schemas.RestrictionView:
    return _view(session, get_case(session, request_id))


@router.put("/{request_id}/officers")
def set_officers(
    request_id: RequestId, body: schemas.SetOfficers, session: SessionDep, principal: AdminDep
) -> schemas.RestrictionView:
    case = get_case(session, request_id, lock=True)
    access.restrict(session, case=case, officers=body.officers, actor=f"client:{principal.name}")
    return _view(session, case)

"""Need-to-know: requests only named officers of this node may see.

A request is restricted here when the requesting authority marked it `need_to_know` (it
arrives restricted, with nobody named: fail closed) or when an administrator of this node
restricts it. Only an administrator names the officers (API clients with the officer role):
the requesting authority cannot, it does not know who works at the requested authority.

To any other officer a restricted request does not exist: it is left out of lists, and
reading it, its attachments, or adding a message answers 404 `unknown_request`, exactly as
for an id that was never used. Every refused attempt is an audit entry, recorded in a
transaction of its own (the refused request's own transaction rolls back); allowed reads are
audited by the read itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, delete, exists, false, or_, select
from sqlalchemy.orm import Session

from app.audit.log import record
from app.auth.refusals import already_audited, record_counted
from app.auth.service import Principal, Role
from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.errors import BadRequest, Conflict, NotFound
from app.models import ApiClient, CaseFile, RequestOfficer
from app.node import Node
from app.oneline import is_one_line

REFUSED = "refused_need_to_know"


def visible_to(name: str) -> ColumnElement[bool]:
    """A filter on requests: those an officer of this name may see."""
    named = exists().where(
        RequestOfficer.request_id == CaseFile.id, RequestOfficer.client_name == name
    )
    return or_(CaseFile.restricted == false(), named)


def may_see(session: Session, case: CaseFile, principal: Principal) -> bool:
    if not case.restricted:
        return True
    named = session.scalar(
        select(RequestOfficer.id).where(
            RequestOfficer.request_id == case.id, RequestOfficer.client_name == principal.name
        )
    )
    return named is not None


def check_visible(node: Node, *, request_id: str, principal: Principal, action: str) -> None:
    """Refuse, as unknown, a request this officer may not see; audit the refusal.

    Runs in its own short transaction before the route's unit of work touches the database,
    so the refusal's audit entry (its own transaction) never waits on the route's lock.
    """
    with unit_of_work(node.sessions) as session:
        case = session.get(CaseFile, request_id)
        hidden = case is not None and not may_see(session, case, principal)
        peer = case.peer_authority if case is not None else None
    if hidden:
        # On record until the client reaches the refusal limit, then counted: an officer
        # looping over a restricted id must not grow the log without end. A key of its own,
        # never blocking anything: the answer stays 404 throughout, and no other answer of
        # this client's changes with it (a 429 anywhere would tell a restricted id from one
        # never used).
        record_counted(
            node,
            f"hidden:{principal.client_id}",
            actor=f"client:{principal.name}",
            action=action,
            outcome=REFUSED,
            request_id=request_id,
            peer=peer,
            details={"reason": "not named on a restricted request"},
        )
        raise already_audited(NotFound("no such request", code="unknown_request"))


def officers_of(session: Session, case: CaseFile) -> list[str]:
    return list(
        session.scalars(
            select(RequestOfficer.client_name)
            .where(RequestOfficer.request_id == case.id)
            .order_by(RequestOfficer.client_name)
        )
    )


def _check_officers(session: Session, names: Sequence[str]) -> None:
    now = utc_now()
    for name in names:
        # No client's name holds a control character or a lone surrogate, and PostgreSQL
        # refuses to compare with text holding a NUL (400 invalid_value there, from review).
        found = is_one_line(name)
        client = session.scalar(select(ApiClient).where(ApiClient.name == name)) if found else None
        usable = (
            client is not None
            and client.revoked_at is None
            and (client.expires_at is None or client.expires_at > now)
            and Role.OFFICER.value in client.roles.split(",")
        )
        if not usable:
            raise BadRequest(
                f"{name!r} is not an active API client with the officer role",
                code="unknown_officer",
            )


def restrict(session: Session, *, case: CaseFile, officers: Sequence[str], actor: str) -> list[str]:
    """Name the officers who may see `case` here (replacing any earlier list). An empty list
    lifts the restriction, except on a request received marked need-to-know: the requesting
    authority asked for it there. At the requesting node the request started unrestricted,
    and a restriction its administrator chose is theirs to lift (from review: it could not)."""
    names = sorted(set(officers))
    _check_officers(session, names)
    if not names and case.handling == "need_to_know" and case.direction == "inbound":
        raise Conflict(
            "the requesting authority marked this request need-to-know: name at least one officer",
            code="restriction_required",
        )
    session.execute(delete(RequestOfficer).where(RequestOfficer.request_id == case.id))
    now = utc_now()
    session.add_all(
        RequestOfficer(request_id=case.id, client_name=name, assigned_at=now, assigned_by=actor)
        for name in names
    )
    case.restricted = bool(names)
    session.flush()
    record(
        session,
        actor=actor,
        action="request.restricted" if case.restricted else "request.unrestricted",
        request_id=case.id,
        peer=case.peer_authority,
        details={"officers": names},
    )
    return names

"""Local API: pinning and listing peers (role: admin)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter

from app.audit.log import record_alone
from app.auth.refusals import already_audited
from app.delivery.outbox import wake_after_commit
from app.deps import AdminDep, NodeDep, SessionDep, UnitOfWorkRoute
from app.errors import EntraideError
from app.peers import service
from app.peers.client import peer_http_client, shown_url
from app.peers.schemas import AddPeer, PeerView, ResumePeer, SuspendPeer

router = APIRouter(prefix="/api/v1/admin/peers", tags=["admin"], route_class=UnitOfWorkRoute)


@router.post("", status_code=201)
def add_peer(body: AddPeer, session: SessionDep, node: NodeDep, principal: AdminDep) -> PeerView:
    actor = f"client:{principal.name}"
    try:
        with peer_http_client(node.settings) as http:
            peer = service.add_peer(
                session,
                url=body.url,
                fingerprint=body.fingerprint,
                own_authority=node.authority_id,
                own_keys=node.keys,
                allow_insecure_http=node.settings.allow_insecure_http,
                clock_skew=timedelta(seconds=node.settings.clock_skew_seconds),
                http=http,
                actor=actor,
            )
    except EntraideError as exc:
        session.rollback()  # release our write lock before the refusal's own transaction
        details = {"url": shown_url(body.url), "detail": exc.detail}
        record_alone(
            node.sessions, actor=actor, action="peer.add", outcome=exc.code, details=details
        )
        raise already_audited(exc) from None
    return PeerView.of(peer)


@router.get("")
def list_peers(session: SessionDep, principal: AdminDep) -> list[PeerView]:
    return [PeerView.of(peer) for peer in service.list_peers(session)]


@router.post("/suspend")
def suspend_peer(body: SuspendPeer, session: SessionDep, principal: AdminDep) -> PeerView:
    """Suspend every exchange with a pinned peer (docs/operations.md): its envelopes are
    refused, nothing new is sent to it, and its queued deliveries wait."""
    peer = service.suspend_peer(
        session,
        authority_id=body.authority_id,
        reason=body.reason,
        actor=f"client:{principal.name}",
    )
    return PeerView.of(peer)


@router.post("/resume")
def resume_peer(
    body: ResumePeer, session: SessionDep, node: NodeDep, principal: AdminDep
) -> PeerView:
    """Resume exchanges with a suspended peer: its waiting deliveries go."""
    peer = service.resume_peer(
        session, authority_id=body.authority_id, actor=f"client:{principal.name}"
    )
    wake_after_commit(session, node.outbox_signal)  # its deliveries go now, not at a poll
    return PeerView.of(peer)

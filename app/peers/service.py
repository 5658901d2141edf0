"""Pinning peers: fetch the identity document, check its signature and the fingerprint."""

from __future__ import annotations

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.log import record
from app.crypto.encoding import utc_now
from app.crypto.identity import IdentityError, PeerIdentity, parse_identity_document
from app.crypto.keys import fingerprints_match, normalise_fingerprint
from app.errors import BadRequest, Conflict, NotFound
from app.models import Peer
from app.peers.client import check_peer_url, fetch_identity
from app.peers.keys import apply_rotation, remember_current_keys


class FingerprintMismatch(BadRequest):
    code = "fingerprint_mismatch"


def verify_identity(document: object, *, expected_fingerprint: str) -> PeerIdentity:
    try:
        identity = parse_identity_document(document)
    except IdentityError as exc:
        raise BadRequest(str(exc), code="invalid_identity_document") from exc
    if len(normalise_fingerprint(expected_fingerprint)) != 64:
        raise BadRequest("a fingerprint is 64 hexadecimal digits", code="invalid_fingerprint")
    if not fingerprints_match(expected_fingerprint, identity.fingerprint):
        raise FingerprintMismatch(
            "the node at this URL presents a different key than the fingerprint you were "
            "given; do not pin it, and check the fingerprint with the peer's operator"
        )
    return identity


def pin_peer(
    session: Session,
    *,
    identity: PeerIdentity,
    url: str,
    own_authority: str,
    actor: str = "node",
) -> Peer:
    if identity.authority_id == own_authority:
        raise BadRequest("a node cannot pin itself", code="self_pin")
    peer = session.scalar(select(Peer).where(Peer.authority_id == identity.authority_id))
    now = utc_now()
    if peer is not None and peer.fingerprint != identity.fingerprint:
        # Re-adding a peer that rotated: accepted only along its chain from our pin.
        path = identity.rotation_path(peer.signing_key)
        if not path:
            raise Conflict(
                f"{identity.authority_id} is already pinned with another signing key; "
                "remove it first or rotate keys through a signed rotation",
                code="peer_key_conflict",
            )
        apply_rotation(session, peer, identity, path, actor=actor, repinned=True)
    if peer is None:
        peer = Peer(authority_id=identity.authority_id, added_at=now)
        session.add(peer)
    peer.name = identity.name
    peer.public_url = url
    peer.fingerprint = identity.fingerprint
    peer.signing_kid = identity.signing.kid
    peer.signing_key = identity.signing.public_key
    peer.encryption_kid = identity.encryption.kid
    peer.encryption_key = identity.encryption.public_key
    peer.log_kid = identity.log.kid
    peer.log_key = identity.log.public_key
    peer.identity_document = identity.document
    peer.identity_signature = identity.signature
    peer.updated_at = now
    session.flush()
    remember_current_keys(session, peer, now)
    return peer


def get_peer(session: Session, authority_id: str) -> Peer:
    peer = session.scalar(select(Peer).where(Peer.authority_id == authority_id))
    if peer is None:
        raise NotFound(f"{authority_id} is not a pinned peer", code="unknown_peer")
    return peer


def list_peers(session: Session) -> list[Peer]:
    return list(session.scalars(select(Peer).order_by(Peer.authority_id)))


def add_peer(
    session: Session,
    *,
    url: str,
    fingerprint: str,
    own_authority: str,
    allow_insecure_http: bool,
    http: httpx.Client,
    actor: str,
) -> Peer:
    """Fetch the peer's identity document, check it against the fingerprint, and pin it."""
    base_url = check_peer_url(url, allow_insecure_http=allow_insecure_http)
    identity = verify_identity(fetch_identity(http, base_url), expected_fingerprint=fingerprint)
    existed = session.scalar(select(Peer.id).where(Peer.authority_id == identity.authority_id))
    peer = pin_peer(
        session, identity=identity, url=base_url, own_authority=own_authority, actor=actor
    )
    record(
        session,
        actor=actor,
        action="peer.changed" if existed else "peer.added",
        peer=peer.authority_id,
        details={"url": base_url, "fingerprint": peer.fingerprint},
    )
    return peer

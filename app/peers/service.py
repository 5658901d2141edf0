"""Pinning peers: fetch the identity document, check its signature and the fingerprint."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.audit.log import record
from app.crypto.encoding import utc_now
from app.crypto.identity import (
    IdentityError,
    PeerIdentity,
    check_issued_at,
    check_not_own_keys,
    issued_at_of,
    parse_identity_document,
)
from app.crypto.keys import NodeKeys, fingerprints_match, normalise_fingerprint
from app.crypto.rotation import RotationError, check_path_times
from app.delivery import outbox
from app.errors import BadRequest, Conflict, NotFound
from app.models import InboundTransfer, OutboxItem, Peer
from app.oneline import is_one_line
from app.peers.client import check_peer_url, fetch_identity
from app.peers.keys import (
    ENCRYPTION,
    apply_rotation,
    remember_current_keys,
    retire_dropped_encryption_key,
    revoke_current_keys,
    was_revoked,
)


class FingerprintMismatch(BadRequest):
    code = "fingerprint_mismatch"


HEX_DIGITS = frozenset("0123456789abcdef")


def check_fingerprint(fingerprint: str) -> None:
    """Before any call to the peer: a typo is the operator's to correct, not something to
    ask the peer (`peer_unreachable`) or blame on its operator (`fingerprint_mismatch`)."""
    digits = normalise_fingerprint(fingerprint)
    if not set(digits) <= HEX_DIGITS:
        raise BadRequest(
            "a fingerprint is 64 hexadecimal digits (0-9, a-f), grouped or not by spaces, "
            "':' or '-': this one holds other characters; copy it again from what the "
            "peer's operator read to you",
            code="invalid_fingerprint",
        )
    if len(digits) != 64:
        raise BadRequest(
            "a fingerprint is 64 hexadecimal digits (0-9, a-f), grouped or not by spaces, "
            f"':' or '-': this one has {len(digits)}; copy it again from what the peer's "
            "operator read to you",
            code="invalid_fingerprint",
        )


def verify_identity(document: object, *, expected_fingerprint: str) -> PeerIdentity:
    check_fingerprint(expected_fingerprint)
    try:
        identity = parse_identity_document(document)
    except IdentityError as exc:
        raise BadRequest(str(exc), code="invalid_identity_document") from exc
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
    own_keys: NodeKeys,
    clock_skew: timedelta,
    actor: str = "node",
) -> Peer:
    """Pin `identity` at `url`, or re-pin a pinned peer along its signed rotation chain
    (whose links may be dated at most `clock_skew` ahead of this node's clock)."""
    if identity.authority_id == own_authority:
        raise BadRequest("a node cannot pin itself", code="self_pin")
    refuse_own_keys(identity, own_keys)
    now = utc_now()
    try:
        check_issued_at(identity, now=now, skew=clock_skew)
    except IdentityError as exc:
        raise BadRequest(str(exc), code="invalid_identity_document") from exc
    peer = session.scalar(select(Peer).where(Peer.authority_id == identity.authority_id))
    # When the pinned document was issued, unless it is later than the clock allows (one
    # pinned before that was checked): then it tells nothing.
    pinned_issued = (
        None if peer is None else issued_at_of(peer.identity_document, now=now, skew=clock_skew)
    )
    if peer is not None and peer.fingerprint == identity.fingerprint:
        _refuse_stale(session, peer, identity, pinned_issued)
    # Pinned again under the same signing key: an encryption key it no longer publishes was
    # not rotated away (no signed statement says until when it stays valid), only dropped.
    dropped_encryption_kid = (
        peer.encryption_kid
        if peer is not None
        and peer.fingerprint == identity.fingerprint
        and peer.encryption_kid != identity.encryption.kid
        else None
    )
    if peer is not None and peer.fingerprint != identity.fingerprint:
        # Re-adding a peer that rotated: accepted only along its chain from our pin.
        path = identity.rotation_path(peer.signing_key)
        if path:
            try:
                check_path_times(path, now=now, skew=clock_skew, since=pinned_issued)
            except RotationError as exc:
                raise BadRequest(str(exc), code="invalid_identity_document") from exc
        if not path:
            raise Conflict(
                f"{identity.authority_id} is already pinned with another signing key: it must "
                "rotate through a signed rotation, or, if its key was compromised, "
                "`entraide peers replace-key` with the new fingerprint read out of band",
                code="peer_key_conflict",
            )
        apply_rotation(session, peer, identity, path, actor=actor, repinned=True)
    if peer is None:
        peer = Peer(authority_id=identity.authority_id, added_at=now)
        session.add(peer)
    _take_identity(session, peer, identity, url, now)
    if dropped_encryption_kid is not None:
        retire_dropped_encryption_key(session, peer.authority_id, dropped_encryption_kid, now)
    return peer


def refuse_own_keys(identity: PeerIdentity, own_keys: NodeKeys) -> None:
    try:
        check_not_own_keys(identity, own_keys)
    except IdentityError as exc:
        raise BadRequest(str(exc), code="own_keys") from exc


def _refuse_stale(
    session: Session, peer: Peer, identity: PeerIdentity, pinned_issued: datetime | None
) -> None:
    """An identity document signed with the pinned key, with keys other than those pinned,
    older than the one pinned or publishing a key of the peer's that was dropped: a stale
    copy (an old mirror, an old instance, an address an attacker serves it from). The
    fingerprint cannot tell it from the current one, and taking it would seal to a key the
    peer gave up (perhaps because it leaked)."""
    served = f"the node at this address serves an identity document of {peer.authority_id}"
    check = "a stale copy, not the node itself: check the address with its operator"
    same_keys = (identity.encryption.kid, identity.log.kid) == (peer.encryption_kid, peer.log_kid)
    if same_keys:
        return  # nothing to roll back (each replica of a node issues its own at its start)
    if pinned_issued is not None and identity.issued_at < pinned_issued:
        raise StaleIdentity(
            f"{served} issued {identity.issued_at.isoformat(timespec='seconds')}, older than "
            f"the one pinned (issued {pinned_issued.isoformat(timespec='seconds')}): {check}"
        )
    if was_revoked(session, peer.authority_id, ENCRYPTION, identity.encryption.kid):
        raise StaleIdentity(f"{served} with an encryption key it dropped: {check}")


class StaleIdentity(Conflict):
    code = "stale_identity"


def _take_identity(
    session: Session, peer: Peer, identity: PeerIdentity, url: str, now: datetime
) -> None:
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


def replace_peer_key(
    session: Session,
    *,
    url: str,
    fingerprint: str,
    own_keys: NodeKeys,
    allow_insecure_http: bool,
    clock_skew: timedelta,
    http: httpx.Client,
    actor: str,
) -> Peer:
    """A pinned peer's signing key was compromised: a rotation cannot answer that (the thief
    can sign one too). Its operator made new keys and read you the new fingerprint out of
    band; this pins them and revokes the old ones, which verify nothing new again, whatever
    time it claims, while what was received under them before stays verifiable."""
    check_fingerprint(fingerprint)
    base_url = check_peer_url(url, allow_insecure_http=allow_insecure_http)
    identity = verify_identity(fetch_identity(http, base_url), expected_fingerprint=fingerprint)
    peer = session.scalar(
        select(Peer).where(Peer.authority_id == identity.authority_id).with_for_update()
    )
    if peer is None:
        raise NotFound(
            f"{identity.authority_id} is not pinned: `entraide peers add`", code="unknown_peer"
        )
    if peer.fingerprint == identity.fingerprint:
        raise Conflict(
            f"{identity.authority_id} already has this key pinned: nothing to replace",
            code="same_key",
        )
    refuse_own_keys(identity, own_keys)
    now = utc_now()
    try:
        check_issued_at(identity, now=now, skew=clock_skew)
    except IdentityError as exc:
        raise BadRequest(str(exc), code="invalid_identity_document") from exc
    old_fingerprint, old_signing_kid = peer.fingerprint, peer.signing_kid
    revoke_current_keys(session, peer, now)
    # Transfers it announced were checked under the keys now revoked (and their parts may
    # come signed by them): dropped (what they received is then cleaned up). The peer sends
    # again.
    dropped = _drop_transfers(session, peer.authority_id)
    _take_identity(session, peer, identity, base_url, now)
    record(
        session,
        actor=actor,
        action="peer.key_replaced",
        peer=peer.authority_id,
        details={
            "old_fingerprint": old_fingerprint,
            "new_fingerprint": peer.fingerprint,
            "old_signing_kid": old_signing_kid,
            "new_signing_kid": peer.signing_kid,
            "transfers_dropped": dropped,
        },
    )
    return peer


class PeerSuspended(Conflict):
    code = "peer_suspended"


def refuse_if_suspended(authority_id: str, suspended_at: datetime | None) -> None:
    """Nothing new is sealed for a peer while exchanges with it are suspended."""
    if suspended_at is not None:
        raise PeerSuspended(
            f"exchanges with {authority_id} are suspended (since "
            f"{suspended_at.isoformat(timespec='seconds')}): nothing can be sent to it until "
            "an administrator resumes them"
        )


def suspend_peer(session: Session, *, authority_id: str, reason: str, actor: str) -> Peer:
    """Stop every exchange with a pinned peer, without unpinning it: its envelopes are
    refused (`peer_suspended`, which its node retries), nothing new is sealed for it, and
    its queued deliveries wait. Its keys stay, so what was exchanged before stays
    verifiable; transfers it announced are dropped (sent again after a resumption)."""
    reason = reason.strip()
    if not reason or len(reason) > 500 or not is_one_line(reason):
        raise BadRequest(
            "say in one line of at most 500 characters, without control characters, why "
            "exchanges are suspended",
            code="invalid_reason",
        )
    peer = _locked_peer(session, authority_id)
    if peer.suspended_at is not None:
        raise Conflict(
            f"exchanges with {authority_id} are already suspended", code="already_suspended"
        )
    now = utc_now()
    peer.suspended_at, peer.suspended_reason, peer.updated_at = now, reason, now
    # Its deliveries wait out of the due range (the claim, which also skips a suspended
    # peer's rows, would otherwise sort through them at every round): due again on resuming.
    waiting = len(
        session.scalars(
            update(OutboxItem)
            .where(
                OutboxItem.peer_authority == peer.authority_id,
                OutboxItem.state.in_((outbox.QUEUED, outbox.RETRY)),
            )
            .values(next_attempt_at=now + outbox.SUSPENDED_FOR)
            .returning(OutboxItem.id)
        ).all()
    )
    dropped = _drop_transfers(session, peer.authority_id)
    record(
        session,
        actor=actor,
        action="peer.suspended",
        peer=peer.authority_id,
        details={"reason": reason, "transfers_dropped": dropped, "deliveries_held": waiting},
    )
    return peer


def resume_peer(session: Session, *, authority_id: str, actor: str) -> Peer:
    """Exchanges with the peer go on: its queued deliveries are posted again."""
    peer = _locked_peer(session, authority_id)
    if peer.suspended_at is None:
        raise Conflict(f"exchanges with {authority_id} are not suspended", code="not_suspended")
    suspended_at, now = peer.suspended_at, utc_now()
    peer.suspended_at, peer.suspended_reason, peer.updated_at = None, None, now
    session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.peer_authority == peer.authority_id,
            OutboxItem.state.in_((outbox.QUEUED, outbox.RETRY)),
        )
        .values(next_attempt_at=now)
    )
    record(
        session,
        actor=actor,
        action="peer.resumed",
        peer=peer.authority_id,
        details={"suspended_at": suspended_at.isoformat()},
    )
    return peer


def _drop_transfers(session: Session, authority_id: str) -> int:
    """The inbound transfers a peer announced (what they received is then cleaned up)."""
    return len(
        session.scalars(
            delete(InboundTransfer)
            .where(InboundTransfer.sender_authority == authority_id)
            .returning(InboundTransfer.id)
        ).all()
    )


def _locked_peer(session: Session, authority_id: str) -> Peer:
    peer = session.scalar(select(Peer).where(Peer.authority_id == authority_id).with_for_update())
    if peer is None:
        raise NotFound(f"{authority_id} is not a pinned peer", code="unknown_peer")
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
    own_keys: NodeKeys,
    allow_insecure_http: bool,
    clock_skew: timedelta,
    http: httpx.Client,
    actor: str,
) -> Peer:
    """Fetch the peer's identity document, check it against the fingerprint, and pin it."""
    check_fingerprint(fingerprint)
    base_url = check_peer_url(url, allow_insecure_http=allow_insecure_http)
    identity = verify_identity(fetch_identity(http, base_url), expected_fingerprint=fingerprint)
    existed = session.scalar(select(Peer.id).where(Peer.authority_id == identity.authority_id))
    peer = pin_peer(
        session,
        identity=identity,
        url=base_url,
        own_authority=own_authority,
        own_keys=own_keys,
        clock_skew=clock_skew,
        actor=actor,
    )
    record(
        session,
        actor=actor,
        action="peer.changed" if existed else "peer.added",
        peer=peer.authority_id,
        details={"url": base_url, "fingerprint": peer.fingerprint},
    )
    return peer

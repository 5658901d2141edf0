"""Peers' keys over time: the history of what was pinned, and signed rotations.

A peer that rotates its keys (docs/protocol.md §5.4) is picked up at the next contact: an
envelope signed with a key id we have not pinned, or a receipt signed by one, makes us fetch
the peer's identity document from its pinned URL (with the peer timeout), walk the signed
chain from the pinned signing key to the new keys, and re-pin, recording `peer.keys_changed`.
A document that does not chain back to the pin is refused, audited, and changes nothing.

The keys a peer used before stay in `peer_keys`, so envelopes and receipts stored earlier are
still checked against the key that was valid when they arrived.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

import httpx
from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from app.audit.log import record
from app.auth.throttle import counter_row
from app.crypto.encoding import DecodeError, parse_time, utc_now
from app.crypto.envelope import HEX_ID, EnvelopeError, parse_header
from app.crypto.identity import (
    IdentityError,
    PeerIdentity,
    check_issued_at,
    check_not_own_keys,
    issued_at_of,
    parse_identity_document,
)
from app.crypto.keys import NodeKeys
from app.crypto.receipts import (
    Receipt,
    ReceiptError,
    SignedReceipt,
    check_received_at,
    verify_receipt,
)
from app.crypto.rotation import Rotation, RotationError, check_path_times
from app.db import unit_of_work
from app.errors import PeerError
from app.models import Peer, PeerKey
from app.node import Node
from app.peers.client import fetch_identity, peer_http_client

log = logging.getLogger(__name__)

SIGNING = "signing"
ENCRYPTION = "encryption"


def _history(session: Session, authority: str, purpose: str, kid: str) -> PeerKey | None:
    return session.scalar(
        select(PeerKey).where(
            PeerKey.peer_authority == authority, PeerKey.purpose == purpose, PeerKey.kid == kid
        )
    )


def _remember(
    session: Session,
    authority: str,
    purpose: str,
    public_key: bytes,
    kid: str,
    *,
    pinned_at: datetime,
    superseded_at: datetime | None,
) -> PeerKey:
    row = _history(session, authority, purpose, kid)
    if row is None:
        row = PeerKey(
            peer_authority=authority,
            purpose=purpose,
            kid=kid,
            public_key=public_key,
            pinned_at=pinned_at,
        )
        session.add(row)
    row.superseded_at = superseded_at
    return row


def was_revoked(session: Session, authority: str, purpose: str, kid: str) -> bool:
    """Whether `kid` is one of `authority`'s keys that was dropped or revoked."""
    row = _history(session, authority, purpose, kid)
    return row is not None and row.revoked_at is not None


def revoke_current_keys(session: Session, peer: Peer, now: datetime) -> None:
    """Keep `peer`'s current keys in its history as revoked, with every key it had before:
    replaced by an operator because they were compromised. The archive received under them
    stays verifiable; nothing new is accepted with them, whatever time it claims
    (`peer_signing_key`)."""
    for purpose, public_key, kid in (
        (SIGNING, peer.signing_key, peer.signing_kid),
        (ENCRYPTION, peer.encryption_key, peer.encryption_kid),
    ):
        existing = _history(session, peer.authority_id, purpose, kid)
        row = _remember(
            session, peer.authority_id, purpose, public_key, kid,
            pinned_at=existing.pinned_at if existing else now, superseded_at=now,
        )  # fmt: skip
        row.revoked_at = now
    # And every earlier key of the peer: a thief who held one may have signed the rotations
    # that followed it (with whatever `rotated_at` it liked). Only the archive reads them.
    session.flush()
    for row in session.scalars(
        select(PeerKey).where(
            PeerKey.peer_authority == peer.authority_id, PeerKey.revoked_at.is_(None)
        )
    ):
        row.revoked_at = now
        row.superseded_at = row.superseded_at or now
    session.flush()


def retire_dropped_encryption_key(
    session: Session, authority: str, kid: str, now: datetime
) -> None:
    """A peer pinned again with a new encryption key (same signing key, no rotation): from now
    on an envelope naming the old one as its sender's key is refused (docs/protocol.md
    section 5.3, step 19). What was exchanged under it stays readable: the archive is opened
    with this node's own keys, never the peer's encryption key."""
    row = _history(session, authority, ENCRYPTION, kid)
    if row is not None:
        row.superseded_at = row.superseded_at or now
        row.revoked_at = row.revoked_at or now
        session.flush()


def remember_current_keys(session: Session, peer: Peer, now: datetime) -> None:
    """Record a freshly pinned peer's keys in its history."""
    _remember(
        session, peer.authority_id, SIGNING, peer.signing_key, peer.signing_kid,
        pinned_at=now, superseded_at=None,
    )  # fmt: skip
    _remember(
        session, peer.authority_id, ENCRYPTION, peer.encryption_key, peer.encryption_kid,
        pinned_at=now, superseded_at=None,
    )  # fmt: skip
    session.flush()


def apply_rotation(
    session: Session,
    peer: Peer,
    identity: PeerIdentity,
    path: list[Rotation],
    *,
    actor: str,
    repinned: bool = False,
) -> None:
    """Re-pin `peer` to `identity`'s keys along a verified `path` from the pinned key.
    `repinned`: an operator pins the peer again (`pin_peer`), which also takes its log key."""
    now = utc_now()
    authority = peer.authority_id
    old_signing_kid, old_encryption_kid = peer.signing_kid, peer.encryption_kid
    for link in path:
        # Each generation the path passes through was valid until its successor's rotation.
        for purpose, public_key, kid in (
            (SIGNING, link.old.signing, link.old.signing_kid),
            (ENCRYPTION, link.old.encryption, link.old.encryption_kid),
        ):
            existing = _history(session, authority, purpose, kid)
            _remember(
                session, authority, purpose, public_key, kid,
                pinned_at=existing.pinned_at if existing else now,
                superseded_at=link.rotated_at,
            )  # fmt: skip
    peer.fingerprint = identity.fingerprint
    peer.name = identity.name
    peer.signing_kid = identity.signing.kid
    peer.signing_key = identity.signing.public_key
    peer.encryption_kid = identity.encryption.kid
    peer.encryption_key = identity.encryption.public_key
    # A log key never rotates (protocol.md §5.4): witnesses check every checkpoint of the
    # peer's log with the one pinned. A rotation that also changes it is followed for the
    # other keys only; an operator who pins the peer again takes the new log key (§5.3).
    log_key_kept = identity.log.public_key != peer.log_key and not repinned
    if log_key_kept:
        log.warning(
            "%s rotated its keys and published another log key: the pinned one is kept",
            authority,
        )
    peer.identity_document = identity.document
    peer.identity_signature = identity.signature
    peer.updated_at = now
    remember_current_keys(session, peer, now)
    record(
        session,
        actor=actor,
        action="peer.keys_changed",
        peer=authority,
        details={
            "old_signing_kid": old_signing_kid,
            "new_signing_kid": peer.signing_kid,
            "old_encryption_kid": old_encryption_kid,
            "new_encryption_kid": peer.encryption_kid,
            "rotations": len(path),
            "fingerprint": peer.fingerprint,
            **(
                {"log_key": "kept: the rotation changed it, which §5.4 forbids"}
                if log_key_kept
                else {}
            ),
        },
    )


def _due(session: Session, authority: str, interval: timedelta, now: datetime) -> bool:
    """At most one fetch per peer per interval, across processes: anyone can send an
    envelope claiming a new key id, and each must not cost us a request to the peer."""
    row = counter_row(session, f"peer-refresh:{authority}", now)
    if row.failures and now - row.window_start < interval:
        return False
    row.window_start, row.failures = now, 1
    return True


def refresh_peer_keys(
    node: Node,
    authority: str,
    *,
    actor: str = "node",
    http: httpx.Client | None = None,
    force: bool = False,
) -> Peer | None:
    """Fetch the peer's identity document and follow a signed rotation from the pin.

    Runs in transactions of its own, never while the caller holds one (the fetch can take
    the whole peer timeout). Returns the peer as pinned afterwards, or None when nothing
    could be fetched or the document was refused.
    """
    now = utc_now()
    interval = timedelta(seconds=node.settings.peer_refresh_seconds)
    with unit_of_work(node.sessions) as session:
        peer = session.scalar(select(Peer).where(Peer.authority_id == authority))
        # A suspended peer's rotations are followed only when an operator asks (`force`):
        # it may be suspended because its keys are no longer trusted.
        suspended = peer is not None and peer.suspended_at is not None and not force
        if peer is None or suspended or (not force and not _due(session, authority, interval, now)):
            return None
        url, pinned, pinned_document = peer.public_url, peer.signing_key, peer.identity_document
    skew = timedelta(seconds=node.settings.clock_skew_seconds)
    try:
        if http is None:
            with peer_http_client(node.settings) as client:
                document = fetch_identity(client, url)
        else:
            document = fetch_identity(http, url)
        identity = parse_identity_document(document)
        if identity.authority_id != authority:
            raise IdentityError("the document at the pinned URL is another authority's")
        check_not_own_keys(identity, node.keys)
        path = identity.rotation_path(pinned)
        if path is None:
            raise IdentityError("the new keys are not signed by a chain from the pinned key")
        if path:  # the document is taken only along a rotation: its dates, then
            checked_at = utc_now()
            check_issued_at(identity, now=checked_at, skew=skew)
            since = issued_at_of(pinned_document, now=checked_at, skew=skew)
            check_path_times(path, now=checked_at, skew=skew, since=since)
    except PeerError as exc:
        log.warning("could not fetch %s's identity document: %s", authority, exc.code)
        return None
    except (IdentityError, RotationError) as exc:
        with unit_of_work(node.sessions) as session:
            record(
                session,
                actor=actor,
                action="peer.keys_changed",
                outcome="rotation_refused",
                peer=authority,
                details={"reason": str(exc)},
            )
        log.warning("refused a key change for %s: %s", authority, exc)
        return None
    with unit_of_work(node.sessions) as session:
        peer = session.scalar(select(Peer).where(Peer.authority_id == authority).with_for_update())
        if peer is None or (peer.suspended_at is not None and not force):
            return None  # suspended meanwhile
        if path and peer.signing_key == pinned:  # else another process re-pinned first
            apply_rotation(session, peer, identity, path, actor=actor)
        session.flush()
        return peer


# --- which key checks what ----------------------------------------------------------------


@dataclass(frozen=True)
class PinnedKeys:
    """A peer's current keys as pinned: what checking its envelopes and sealing to it need,
    read with one Core query (`pinned_keys`) rather than a whole `Peer` through the ORM."""

    authority_id: str
    signing_kid: str
    signing_key: bytes
    encryption_kid: str
    encryption_key: bytes
    suspended_at: datetime | None


_PEERS = cast(Table, Peer.__table__)
_PINNED = select(
    _PEERS.c.authority_id,
    _PEERS.c.signing_kid,
    _PEERS.c.signing_key,
    _PEERS.c.encryption_kid,
    _PEERS.c.encryption_key,
    _PEERS.c.suspended_at,
)


def pinned_keys(session: Session, authority_id: str) -> PinnedKeys | None:
    row = session.connection().execute(_PINNED.where(_PEERS.c.authority_id == authority_id)).first()
    return None if row is None else PinnedKeys(*row)


def peer_signing_key(
    session: Session, peer: Peer | PinnedKeys, kid: str, *, signed_at: datetime | None
) -> bytes | None:
    """The pinned key `kid` of `peer`, if it was valid at `signed_at` (None: any time, for
    what is already stored)."""
    if hmac.compare_digest(kid, peer.signing_kid):
        return peer.signing_key
    row = _history(session, peer.authority_id, SIGNING, kid)
    if row is None:
        return None
    if row.revoked_at is not None and signed_at is not None:
        return None  # compromised: a thief can claim any time it likes
    if row.superseded_at is not None and signed_at is not None and signed_at > row.superseded_at:
        return None
    return row.public_key


def peer_encryption_kid_known(session: Session, peer: Peer | PinnedKeys, kid: str) -> bool:
    if hmac.compare_digest(kid, peer.encryption_kid):
        return True
    row = _history(session, peer.authority_id, ENCRYPTION, kid)
    return row is not None and row.revoked_at is None  # a new envelope's: never a revoked one


def stored_envelope_signer(
    session: Session, keys: NodeKeys, *, outbound: bool, sender: str, header: bytes, parts: int
) -> bytes | None:
    """The key that signed a stored envelope, as pinned when it was sealed or received."""
    try:
        sig_kid = parse_header(header, parts).from_sig_kid
    except EnvelopeError:
        return None
    if outbound:
        return keys.signing_public_for(sig_kid)
    peer = session.scalar(select(Peer).where(Peer.authority_id == sender))
    if peer is None:
        return None
    return peer_signing_key(session, peer, sig_kid, signed_at=None)


def stored_receipt_signer(
    session: Session, keys: NodeKeys, *, outbound: bool, peer: str, kid: str
) -> bytes | None:
    """The key that signed a stored receipt: the peer's (pinned then) for a message we sent,
    ours for one we received."""
    if not outbound:
        return keys.signing_public_for(kid)
    pinned = session.scalar(select(Peer).where(Peer.authority_id == peer))
    return None if pinned is None else peer_signing_key(session, pinned, kid, signed_at=None)


def verify_peer_receipt(
    node: Node,
    http: httpx.Client,
    signed: SignedReceipt,
    *,
    authority: str,
    signer_public: bytes,
    signer_kid: str,
    msg_id: str,
    envelope_hash: str,
    from_authority: str,
    sealed_at: datetime,
) -> Receipt:
    """Verify a receipt with the pinned key; if it names another key, the peer may have
    rotated: follow its signed rotation and verify with the new pin. `sealed_at`, when our
    envelope was sealed (its `created_at`), lets a receipt signed before a rotation verify
    with the key of then (never one the peer had already rotated away from when we sealed),
    and bounds the time the receipt may claim (`check_received_at`, the rule custody proofs
    are checked by): a receipt dated outside it is refused as any bad receipt is."""
    receipt = _verified_receipt(
        node,
        http,
        signed,
        authority=authority,
        signer_public=signer_public,
        signer_kid=signer_kid,
        msg_id=msg_id,
        envelope_hash=envelope_hash,
        from_authority=from_authority,
        sealed_at=sealed_at,
    )
    return check_received_at(receipt, created_at=sealed_at, now=utc_now())


def _verified_receipt(
    node: Node,
    http: httpx.Client,
    signed: SignedReceipt,
    *,
    authority: str,
    signer_public: bytes,
    signer_kid: str,
    msg_id: str,
    envelope_hash: str,
    from_authority: str,
    sealed_at: datetime,
) -> Receipt:
    expected = {
        "msg_id": msg_id,
        "envelope_hash": envelope_hash,
        "from_authority": from_authority,
        "to_authority": authority,
    }
    try:
        return verify_receipt(
            signed, signer_public=signer_public, signer_kid=signer_kid, **expected
        )
    except ReceiptError:
        claimed = claimed_signer_kid(signed)
        if claimed is None or claimed == signer_kid:
            raise
    # A receipt the peer stored before it rotated (our earlier post's answer was lost, this
    # repeat is answered with the stored receipt): signed by a key of the peer's history,
    # valid when the receipt says it was signed (never a revoked key).
    earlier = _earlier_signing_key(
        node, authority, claimed, received_at=claimed_received_at(signed), sealed_at=sealed_at
    )
    if earlier is not None:
        return verify_receipt(signed, signer_public=earlier, signer_kid=claimed, **expected)
    peer = refresh_peer_keys(node, authority, http=http)
    if peer is None or peer.signing_kid != claimed:
        raise ReceiptError("the receipt is signed by a key the peer's identity does not vouch for")
    return verify_receipt(
        signed, signer_public=peer.signing_key, signer_kid=peer.signing_kid, **expected
    )


def _earlier_signing_key(
    node: Node,
    authority: str,
    kid: str,
    *,
    received_at: datetime | None,
    sealed_at: datetime | None,
) -> bytes | None:
    """A key of the peer's history that was current both when we sealed the envelope and
    when the receipt says the peer received it, which cannot be before we sealed it (within
    the clock skew we allow): a retired key cannot sign a receipt for an envelope sealed
    after its retirement, whatever time it claims."""
    if received_at is None or sealed_at is None:
        return None
    skew = timedelta(seconds=node.settings.clock_skew_seconds)
    if received_at < sealed_at - skew:
        return None
    with unit_of_work(node.sessions) as session:
        pinned = pinned_keys(session, authority)
        if pinned is None or peer_signing_key(session, pinned, kid, signed_at=sealed_at) is None:
            return None
        return peer_signing_key(session, pinned, kid, signed_at=received_at)


def claimed_received_at(signed: SignedReceipt) -> datetime | None:
    """The receipt's own claim of when it was signed, read without trusting it (the
    signature, checked after, covers it)."""
    try:
        body = json.loads(signed.body)
        return parse_time(body["received_at"]) if isinstance(body, dict) else None
    except (ValueError, RecursionError, KeyError, TypeError, DecodeError):
        return None


def claimed_signer_kid(signed: SignedReceipt) -> str | None:
    """The receipt's own claim of its signer, read without trusting it."""
    try:
        body = json.loads(signed.body)
    except (ValueError, RecursionError):
        return None
    kid = body.get("signer_kid") if isinstance(body, dict) else None
    # A key id's own form only: anything else would reach the key lookups' comparisons
    # (hmac.compare_digest refuses non-ASCII text with a TypeError).
    return kid if isinstance(kid, str) and HEX_ID.fullmatch(kid) else None

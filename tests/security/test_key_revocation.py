"""Revoking a compromised peer's keys (`entraide peers replace-key`) revokes every key it had:
a thief who held an earlier one may have signed the rotations after it. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.crypto.receipts import Receipt
from app.db import make_engine, make_session_factory, unit_of_work
from app.delivery import outbox
from app.delivery.outbox import Claim
from app.delivery.settle import Outcome, _without_revoked_signers
from app.models import Peer, PeerKey
from app.peers.keys import ENCRYPTION, SIGNING, peer_signing_key, revoke_current_keys
from tests.audit.test_witness import PEER, _peer
from tests.conftest import Databases


def test_every_key_of_a_compromised_peer_is_revoked(databases: Databases) -> None:
    url = databases.new("revoke", migrated=True)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    stolen, rotated = NodeKeys.generate(), NodeKeys.generate()
    now = utc_now()
    try:
        with unit_of_work(sessions) as session:
            peer = _peer(rotated)  # pinned now: the thief's rotation from the stolen key
            peer.signing_kid = rotated.signing_kid
            session.add(peer)
            session.add(
                PeerKey(
                    peer_authority=PEER,
                    purpose=SIGNING,
                    kid=stolen.signing_kid,
                    public_key=stolen.signing_public,
                    pinned_at=now - timedelta(days=30),
                    superseded_at=now + timedelta(days=3650),  # a rotated_at of its choosing
                )
            )
        with unit_of_work(sessions) as session:
            pinned = session.get(Peer, peer.id)
            assert pinned is not None
            assert peer_signing_key(session, pinned, stolen.signing_kid, signed_at=now)
            revoke_current_keys(session, pinned, now)
        with unit_of_work(sessions) as session:
            # The stolen key verifies nothing new, whatever time it claims ...
            assert peer_signing_key(session, pinned, stolen.signing_kid, signed_at=now) is None
            # ... while what is already stored under it still does.
            archived = peer_signing_key(session, pinned, stolen.signing_kid, signed_at=None)
            assert archived == stolen.signing_public
            revoked = set(
                session.scalars(select(PeerKey.kid).where(PeerKey.revoked_at.is_not(None)))
            )
            assert revoked >= {stolen.signing_kid, rotated.signing_kid}
    finally:
        engine.dispose()


def _delivered(authority: str, signer_kid: str) -> tuple[Claim, Outcome]:
    now = utc_now()
    receipt = Receipt("0" * 32, "0" * 64, "FR/MJ", authority, now, "accepted", signer_kid, None)
    claim = Claim(1, 1, authority, 1, None, now)
    return claim, Outcome(outbox.DELIVERED, receipt=receipt)


def test_another_peers_revoked_key_of_the_same_id_blocks_no_receipt(
    databases: Databases,
) -> None:
    """A key id is one peer's: a hostile peer publishing an honest peer's signing key as its
    own encryption key, then re-pinned with a new one (its old one revoked), turned every
    receipt of the honest peer into a retry "signed by a revoked key" (from review)."""
    url = databases.new("revoke-scope", migrated=True)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    honest, hostile = NodeKeys.generate(), NodeKeys.generate()
    now = utc_now()
    try:
        with unit_of_work(sessions) as session:
            session.add(_peer(honest))
            session.add(
                PeerKey(
                    peer_authority="XX/EVIL",
                    purpose=ENCRYPTION,
                    kid=honest.signing_kid,  # the honest peer's signing key, as its own
                    public_key=honest.signing_public,
                    pinned_at=now - timedelta(days=1),
                    revoked_at=now,
                )
            )
            session.add(
                PeerKey(
                    peer_authority="XX/EVIL",
                    purpose=SIGNING,
                    kid=hostile.signing_kid,
                    public_key=hostile.signing_public,
                    pinned_at=now - timedelta(days=1),
                    revoked_at=now,
                )
            )
        with unit_of_work(sessions) as session:
            results = _without_revoked_signers(
                session,
                [_delivered(PEER, honest.signing_kid), _delivered("XX/EVIL", hostile.signing_kid)],
            )
        assert [outcome.state for _, outcome in results] == [outbox.DELIVERED, outbox.RETRY]
    finally:
        engine.dispose()

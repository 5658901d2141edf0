"""Revoking a compromised peer's keys (`entraide peers replace-key`) revokes every key it had:
a thief who held an earlier one may have signed the rotations after it. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.models import Peer, PeerKey
from app.peers.keys import SIGNING, peer_signing_key, revoke_current_keys
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

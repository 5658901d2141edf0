"""Deliveries held back while their peer's row cannot be read.

From review: one peer's row holding a value the database cannot give back (app/peers/damage.py)
failed every delivery round, since a round reads the rows of the peers it claimed for, so
deliveries to every other peer stopped too. After a round fails so, the worker looks for such
rows; each peer found is audited (`peer.unreadable`) and logged once, with the column, never
the value, and its deliveries are left out of the claims, untried and unchanged, while the
others go on. Once a heartbeat period the held rows are read again: one that reads again (the
value put back) has its deliveries claimed from then on.

Kept in the worker's memory: nothing of a delivery is changed, so nothing is lost with it; a
worker started afresh finds the row again with one failed round, and audits it once itself.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.log import Event, record_many
from app.clock import Every
from app.db import driver_error_name, read_snapshot, unit_of_work
from app.delivery.outbox import PENDING
from app.errors import StoredDataCorrupt
from app.models import OutboxItem
from app.peers.damage import DamagedPeer, find_damaged_peers

log = logging.getLogger(__name__)


class HeldPeers:
    def __init__(self, sessions: sessionmaker[Session], *, every_seconds: float) -> None:
        self._sessions = sessions
        self._held: dict[str, DamagedPeer] = {}  # by authority
        self._recheck = Every(every_seconds)

    def authorities(self) -> Collection[str]:
        """The peers whose deliveries the claims leave out."""
        return self._held.keys()

    def hold_damaged(self) -> int:
        """After a round failed on a value that cannot be read: hold the deliveries of each
        peer whose row holds one, not held yet. Returns the peers newly held."""
        try:
            with read_snapshot(self._sessions) as session:
                found = {
                    peer.authority: peer
                    for peer in find_damaged_peers(session)
                    # One whose authority cannot be read matches no delivery's peer.
                    if peer.authority is not None and peer.authority not in self._held
                }
            if found:
                with unit_of_work(self._sessions) as session:
                    _record(session, found)
        except Exception as exc:  # the round failed already; the next one looks again
            log.error("the peers' rows could not be checked (%s)", driver_error_name(exc))
            return 0
        for authority, peer in found.items():
            self._held[authority] = peer
            log.error(
                "deliveries to %s held: a value stored in column %s of its row cannot be "
                "read (stored value damaged); deliveries to other peers go on; put the value "
                "back from a backup (docs/operations.md §5): they resume once the row reads "
                "again",
                authority,
                ", ".join(f"'{column}'" for column in peer.columns),
            )
        return len(found)

    def release_repaired(self) -> None:
        """Once a period while any is held: those whose row reads again are held no more."""
        if not self._held or not self._recheck.due():
            return
        held = {peer.row_id: authority for authority, peer in self._held.items()}
        try:
            with read_snapshot(self._sessions) as session:
                damaged = {peer.row_id for peer in find_damaged_peers(session, ids=list(held))}
        except Exception as exc:  # held until a later look succeeds
            log.warning("the held peers' rows could not be checked (%s)", driver_error_name(exc))
            return
        for row_id, authority in held.items():
            if row_id not in damaged:
                del self._held[authority]
                log.warning("deliveries to %s resume: its row reads again", authority)


def _record(session: Session, peers: dict[str, DamagedPeer]) -> None:
    waiting = dict(
        session.execute(
            select(OutboxItem.peer_authority, func.count())
            .where(OutboxItem.peer_authority.in_(list(peers)), OutboxItem.state.in_(PENDING))
            .group_by(OutboxItem.peer_authority)
        )
        .tuples()
        .all()  # a list: a result has keys() of its own, which dict() would take
    )
    record_many(
        session,
        [
            Event(
                actor="node",
                action="peer.unreadable",
                outcome=StoredDataCorrupt.code,
                peer=authority,
                details={
                    "columns": list(peer.columns),
                    "deliveries_held": waiting.get(authority, 0),
                },
            )
            for authority, peer in peers.items()
        ],
    )

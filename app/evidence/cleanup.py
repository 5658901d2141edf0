"""Removing what abandoned uploads and transfers leave in the blob store.

A blob is kept while any row names it: a stored message's part (`blob_parts`), an upload of
a draft (`evidence_uploads`) or a part already received of an inbound transfer. A staging
upload is kept while its draft is open or its inbound transfer is live: a transfer whose
envelope expired more than the grace period ago was abandoned by its sender, and what it
received goes, with its row (were it announced again, it would be refused as expired).
Everything else older than `evidence_orphan_hours` goes; the grace period covers a blob
finalised whose row is not yet committed.

`OrphanSweep` runs it from a node's background loop, at most once per period, after
discarding the open drafts idle for `evidence_draft_days` (app/evidence/drafts.py): the pass
reads rows (only the columns it needs: a transfer's row holds its manifest part, megabytes),
removes files and abandoned transfers' rows, and is safe to run in several processes at once
(a file or row already removed by another is skipped).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.clock import Every
from app.crypto import envelope as env
from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.evidence import drafts
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.inbound import announced_header
from app.evidence.node_store import blob_store
from app.models import BlobPart, EvidenceDraft, EvidenceUpload, InboundTransfer
from app.node import Node

log = logging.getLogger(__name__)
SWEEP_EVERY_SECONDS = 3600.0


def cleanup_orphans(
    session: Session, store: DirectoryBlobStore, *, older_than_hours: float
) -> tuple[int, int]:
    """Returns (uploads removed, blobs removed).

    Its reads must see one moment: a transfer that completes between them moves its parts
    from the transfer's row to `blob_parts`, and a read of `blob_parts` before the move and
    of the transfers after it would find neither. SQLite's unit of work is the only writer;
    PostgreSQL's READ COMMITTED would show each statement a newer database, so the sweep
    reads one snapshot (REPEATABLE READ; a row it deletes that another changed meanwhile
    fails the sweep, which runs again in an hour)."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    referenced = set(session.scalars(select(BlobPart.digest)))
    referenced.update(
        digest for digest in session.scalars(select(EvidenceUpload.digest)) if digest is not None
    )
    open_drafts = set(
        session.scalars(select(EvidenceDraft.id).where(EvidenceDraft.state == "open"))
    )
    transfers: set[str] = set()
    unreadable = False
    abandoned_before = utc_now() - timedelta(hours=older_than_hours)
    abandoned: list[str] = []
    rows = session.execute(
        select(InboundTransfer.msg_id, InboundTransfer.header, InboundTransfer.parts_done)
    )
    for msg_id, raw, parts_done in rows:
        try:
            header = announced_header(raw)
        except env.EnvelopeError:
            # Which blobs it received cannot be told: none is removed this time, and the
            # operator hears of it (the sweep goes on removing abandoned uploads).
            log.error("evidence cleanup: transfer %s has an unreadable header", msg_id)
            transfers.add(msg_id)
            unreadable = True
            continue
        if header.expires_at < abandoned_before:
            # Expired long ago: no part can arrive for it now (inbound.part_target), nor can
            # it be announced again (_check_time). Its row goes with what it received.
            abandoned.append(msg_id)
            continue
        transfers.add(msg_id)
        # Parts already received of a transfer still under way: no row names them until the
        # last part arrives, which may be days later on a slow or broken link.
        referenced.update(header.parts[index].sha256 for index in range(1, parts_done + 1))
    for start in range(0, len(abandoned), 500):
        session.execute(
            delete(InboundTransfer).where(
                InboundTransfer.msg_id.in_(abandoned[start : start + 500])
            )
        )

    def upload_is_live(upload_id: str) -> bool:
        direction, _, rest = upload_id.partition("-")
        owner = rest.rpartition("-")[0]
        return (direction == "out" and owner in open_drafts) or (
            direction == "in" and owner in transfers
        )

    return store.cleanup(
        is_referenced=(lambda _digest: True) if unreadable else referenced.__contains__,
        upload_is_live=upload_is_live,
        older_than_seconds=older_than_hours * 3600,
    )


class OrphanSweep:
    """`cleanup_orphans` for a node's background loop: `run_due()` on every turn of the loop
    sweeps when a period has passed since the last sweep (the first one runs at once)."""

    def __init__(
        self,
        node: Node,
        *,
        every_seconds: float = SWEEP_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self._every = Every(every_seconds, clock)

    def run_due(self) -> tuple[int, int] | None:
        """(uploads removed, blobs removed), or None when no sweep was due."""
        if not self._every.due():
            return None
        settings = self.node.settings
        store = blob_store(settings)
        try:
            self.discard_idle_drafts(store)
        except Exception as exc:  # the orphan sweep below must run all the same
            log.error("evidence cleanup could not discard idle drafts (%s)", type(exc).__name__)
        with unit_of_work(self.node.sessions) as session:
            removed = cleanup_orphans(
                session, store, older_than_hours=settings.evidence_orphan_hours
            )
        if any(removed):
            log.info(
                "evidence cleanup removed %d abandoned uploads and %d unreferenced blobs",
                *removed,
            )
        return removed

    def discard_idle_drafts(self, store: DirectoryBlobStore) -> int:
        """One draft per transaction, its files removed once it is committed: a sweep holds
        the staging files of one draft at a time, never thousands."""
        idle_days, now = self.node.settings.evidence_draft_days, utc_now()
        with unit_of_work(self.node.sessions) as session:
            candidates = drafts.idle_draft_ids(session, idle_days=idle_days, now=now)
        count = 0
        for draft_id in candidates:
            with contextlib.ExitStack() as held:
                with unit_of_work(self.node.sessions) as session:
                    discarded = drafts.discard_if_idle(
                        session, store, held, draft_id=draft_id, idle_days=idle_days, now=now
                    )
                if discarded is not None:
                    drafts.remove_discarded(store, discarded)
                    count += 1
        # This process's idle writers of what was just removed let its space go.
        drafts.WRITERS.purge()
        if count:
            log.info("evidence cleanup discarded %d drafts idle for too long", count)
        return count

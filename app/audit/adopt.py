"""Adopting a log that has no record of what the log key signed (app/audit/anchor.py).

A node from before the record (`log-signed.json`), or one whose record was lost, signs
nothing until its log is adopted: verified as it is, against its own signed checkpoints and
MACs, then said so in the log, signed, and its head recorded, as `entraide restore` records
a restored log. `entraide audit checkpoint --adopt` does it on an operator's word;
`entraide migrate` does it by itself for a database from before the record (the upgrade the
record was not there for), and nowhere else: a record missing beside a log of a release that
kept one was deleted, and stays an alarm.

"From before the record" is decided by what the log key signed, not by the schema alone: a
database writer sets `alembic_version` (`alembic downgrade`), and could otherwise put back an
older copy of the log, delete the record beside it (where it lives in the data folder, as
docker-compose's `ar` node keeps it) and have the operator's next `entraide migrate` adopt
the rolled-back log (from review).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.anchor import Signed
from app.audit.checkpoints import (
    OUR_NOTE_BYTES,
    SignedCheckpoint,
    log_origin,
    opened_checkpoint,
    readable_note,
    sign_checkpoint,
    stored_note,
)
from app.audit.log import lock_head, record
from app.audit.mac import mac_key
from app.audit.service import verify_database
from app.db import read_snapshot, unit_of_work
from app.errors import EntraideError
from app.models import AuditCheckpoint
from app.node import Node

# The schema when the record came (2026-11-28 21:39, with no migration of its own). A database
# at an earlier revision was last run by a release that kept none; one at this revision may
# have been run by one that did, so its missing record is not taken for an old node's.
RECORD_INTRODUCED_AT = "7e4d2a9b1c55"


class LogNotAdopted(EntraideError):
    """The log was not adopted: a record exists, or the log does not verify, or it changed
    while it was verified."""

    status_code = 409
    code = "log_not_adopted"


class RecordWasKept(LogNotAdopted):
    """Not adopted by `entraide migrate`: what the log key signed shows that a release that
    kept the record ran this log (or shows nothing at all), so the missing record was deleted
    or lost, not never written; only the operator adopts over that."""


# What says a checkpoint was signed by a release that kept the record: any extension line.
# The record came with a84f2ef (2026-11-28 21:39 UTC); the node signed no extension line before
# c6962c3 (2026-11-29 12:16, `time …`), and 12b69c9 (2026-11-29 23:07) added `entry-macs`
# (`git log -S TIME_EXTENSION`, `-S MACS_EXTENSION`): every release that signed a line kept the
# record. Not the time the line says: a release signs by its clock, and a line, whatever it
# says, already settles it. Entry MACs (12b69c9) would say it too, but the column goes with
# `alembic downgrade` past a7c3e5f19b42, which the writer has to run anyway. Releases between
# a84f2ef and c6962c3 kept a record and signed no line: a log of theirs rolled back, record
# deleted, is not told from an older one here (nor is a copy of a database from before the
# upgrade, put back with the record deleted: nothing the key signed differs).


def kept_a_record(session: Session, *, authority_id: str, log_public: bytes) -> str | None:
    """Why this log cannot be from before the record, as its own signed checkpoints say, or
    None. None of them verifying under the log key says nothing either way, and is not adopted
    by itself: every release since checkpoints came (40ab73d, 2026-11-27) signs one at
    `init`, and a writer who deleted them all with the record would leave no trace of a
    release that kept one."""
    origin = log_origin(authority_id)
    rows = session.scalars(select(stored_note(session)).order_by(AuditCheckpoint.size))
    signed = 0
    for stored in rows:
        note = readable_note(stored)
        # None of ours, as latest_signed passes them over: too long, or not text at all.
        if note is None or len(note) > OUR_NOTE_BYTES:
            continue
        opened = opened_checkpoint(note, origin, log_public)
        if opened is None:
            continue
        if opened.extensions:
            return (
                f"its checkpoint of {opened.size} entries was signed by a release that kept "
                f"the record (its note says {', '.join(map(repr, opened.extensions))})"
            )
        signed += 1
    if not signed:
        return "no checkpoint in the database verifies under this node's log key"
    return None


def adopt_log(
    node: Node, *, actor: str, details: Mapping[str, object] | None = None
) -> SignedCheckpoint:
    """Verify the log (in a snapshot: the node may go on appending), then, if what it holds
    now extends what verified, say so in the log (`audit.log_adopted`, with `details`), sign
    it, and record that as what the log key signed."""
    if node.log_anchor.read() is not None:
        raise LogNotAdopted(
            f"{node.log_anchor.path} exists: nothing to adopt (a log that does not extend it "
            "is restored from a backup, docs/operations.md §8)"
        )
    with read_snapshot(node.sessions) as session:
        report = verify_database(
            session,
            authority_id=node.authority_id,
            log_public=node.keys.log_public,
            mac_key=mac_key(node.keys.log),
        )
    if report.first is not None:
        raise LogNotAdopted(
            f"the audit log does not verify, so it is not adopted: entry {report.first.idx}: "
            f"{report.first.message}"
        )
    verified = Signed(report.entries, report.root)
    with unit_of_work(node.sessions) as session:
        head = lock_head(session)
        changed = node.log_anchor.problem(session, head.size, head.root_hash, signed=verified)
        if changed is not None:
            raise LogNotAdopted(f"the audit log changed since it was verified: {changed}")
        record(
            session,
            actor=actor,
            action="audit.log_adopted",
            details={"size": verified.size, "root": verified.root.hex(), **(details or {})},
        )
        checkpoint = sign_checkpoint(session, authority_id=node.authority_id, log_key=node.keys.log)
    node.log_anchor.reset(checkpoint.size, checkpoint.root_hash)
    return checkpoint


def adopt_from_before_the_record(
    node: Node, *, actor: str, schema_before: list[str]
) -> SignedCheckpoint:
    """`entraide migrate`'s adoption: only a log whose signed checkpoints are all of releases
    before the record (RecordWasKept otherwise), then as `adopt_log`."""
    with read_snapshot(node.sessions) as session:
        kept = kept_a_record(
            session, authority_id=node.authority_id, log_public=node.keys.log_public
        )
    if kept is not None:
        raise RecordWasKept(kept)
    return adopt_log(node, actor=actor, details={"schema_before": schema_before})

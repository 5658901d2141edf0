"""Adopting a log that has no record of what the log key signed (app/audit/anchor.py).

A node from before the record (`log-signed.json`), or one whose record was lost, signs
nothing until its log is adopted: verified as it is, against its own signed checkpoints and
MACs, then said so in the log, signed, and its head recorded, as `entraide restore` records
a restored log. `entraide audit checkpoint --adopt` does it on an operator's word;
`entraide migrate` does it by itself for a database whose schema predates the record (the
upgrade the record was not there for), and nowhere else: a record missing beside a log of
this version's schema was deleted, and stays an alarm.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.audit.anchor import Signed
from app.audit.checkpoints import SignedCheckpoint, sign_checkpoint
from app.audit.log import lock_head, record
from app.audit.mac import mac_key
from app.audit.service import verify_database
from app.db import read_snapshot, unit_of_work
from app.errors import EntraideError
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

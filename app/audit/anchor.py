"""What this node's log key has signed, kept beside its keys, outside the database.

A checkpoint is signed over whatever the database's log head says. Someone who can write to
the database but holds no key could cut the log back to an older checkpoint (deleting the
later checkpoints with the entries), or rewrite it from there, and the node would sign the
result: `audit verify --db` and an export would verify, and only a peer or an auditor holding
one of the deleted checkpoints could tell. So every checkpoint's size and root is also
written to a file outside the database (`log-signed.json` in the keys folder, or
`ENTRAIDE_SIGNED_LOG_FILE` where that folder is read-only; mode 0600, replaced atomically, only
ever forward), and no checkpoint is signed, nor a live log verified, unless the log extends
it: the same size and root, or a consistency proof from it that verifies.

Restoring a backup moves the log back on purpose: `entraide restore` records the restored
head in its place (`reset`). A missing record where the database holds checkpoints is an alarm
too (deleting the file would otherwise switch the check off): a node from before the record,
or one whose record was lost, adopts its log with `entraide audit checkpoint --adopt`, which
verifies the log first and is audited (app/audit/adopt.py; `entraide migrate` does it by itself
for a log whose signed checkpoints are all from before the record).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.merkle import EMPTY_ROOT, verify_consistency
from app.audit.service import prove_consistency
from app.config import Settings
from app.durable import sync_folder
from app.errors import EntraideError
from app.models import AuditCheckpoint

log = logging.getLogger(__name__)

RECORD_FILE = "log-signed.json"


class LogRolledBack(EntraideError):
    """The database's log does not extend what this node signed: never input, an alarm."""

    status_code = 500
    code = "audit_log_rolled_back"


@dataclass(frozen=True)
class Signed:
    size: int
    root: bytes


@dataclass(frozen=True)
class RolledBackTo:
    """A rollback as alarmed: the record the log failed, and the log's size and root then."""

    signed: Signed | None
    size: int
    root: bytes


class SignedLogAnchor:
    def __init__(
        self, path: Path, *, moved_from: Path | None = None, keys_dir: Path | None = None
    ) -> None:
        self.path = path
        # The node's keys folder: a log with nothing in it and no record is a node not yet
        # initialised (no keys: `doctor` says that), not an alarm.
        self.keys_dir = keys_dir
        # The record kept before ENTRAIDE_SIGNED_LOG_FILE moved it: read until the new one
        # exists (setting the variable must not drop what the node already signed).
        self.moved_from = moved_from
        # The problem last logged as an alarm, until a checkpoint is signed again: the worker
        # tries every round (twice a second by default), and logged the same CRITICAL line
        # each time, about 90 a minute, until the operator acted (from review).
        self._alarmed: object = None

    @classmethod
    def of(cls, settings: Settings) -> SignedLogAnchor:
        in_keys = settings.keys_dir / RECORD_FILE
        if settings.signed_log_file is None:
            return cls(in_keys, keys_dir=settings.keys_dir)
        return cls(settings.signed_log_file, moved_from=in_keys, keys_dir=settings.keys_dir)

    def read(self) -> Signed | None:
        found = self._read(self.path)
        if found is None and self.moved_from is not None:
            return self._read(self.moved_from)
        return found

    @staticmethod
    def _read(path: Path) -> Signed | None:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            return Signed(int(document["size"]), bytes.fromhex(document["root"]))
        except (FileNotFoundError, NotADirectoryError):
            return None  # nothing signed yet, or lost: `problem` tells which
        except PermissionError:
            raise  # not damage: the command runs as a user who may not read it (doctor says)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LogRolledBack(
                f"{path} cannot be read ({type(exc).__name__}); it records what this "
                "node's log key signed: restore it from its backup"
            ) from exc

    def problem(
        self, session: Session, size: int, root: bytes, *, signed: Signed | None = None
    ) -> str | None:
        """Why the log of `size` entries under `root` does not extend what was signed (the
        record as read now, or `signed`, read before the caller read the log: a record read
        after could be of a checkpoint newer than that log)."""
        signed = signed if signed is not None else self.read()
        if signed is None:
            return self._missing(session, size)
        if size < signed.size:
            return (
                f"the log holds {size} entries, but this node signed a checkpoint of "
                f"{signed.size}: entries were removed from the database"
            )
        if size == signed.size:
            if hmac.compare_digest(root, signed.root):
                return None
            return f"the log's first {size} entries are not those this node signed"
        try:
            proof = [
                bytes.fromhex(item)
                for item in prove_consistency(session, first=signed.size, second=size)["proof"]
            ]
        except EntraideError as exc:  # a subtree the proof needs is missing
            return f"the log cannot be proved to extend what this node signed ({exc.detail})"
        if verify_consistency(signed.size, size, signed.root, root, proof):
            return None
        return f"the log's first {signed.size} entries are not those this node signed"

    def writable(self) -> bool:
        """Whether the record's folder (or the nearest one that exists: the node creates the
        rest) takes new files: the record is replaced by a rename."""
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)

    def _missing(self, session: Session, size: int) -> str | None:
        """No record: an alarm wherever one can be written. `init` writes it before the
        log's first entry, so no log is without one; deleted, lost, or a node from before
        the record (whose operator adopts the log). Only a log that holds entries or
        checkpoints was an alarm before, and a writer who deleted those too, with the
        record, made a log that looked new (from review). Where no record can be written,
        the node cannot tell a rolled-back log and signs on (doctor warns)."""
        if not self.writable():
            return None
        signed = session.scalar(select(func.count()).select_from(AuditCheckpoint)) or 0
        if not signed and not size and not self._initialised():
            return None
        if signed:
            held = f"the database holds {signed} signed checkpoint(s)"
        elif size:
            held = f"the log holds {size} entries and no signed checkpoint (deleted with it?)"
        else:
            held = (
                "`entraide init` wrote one before the log's first entry (the log, its "
                "checkpoints and the record were all deleted?)"
            )
        return (
            f"there is no record at {self.path} of what this node's log key signed, though "
            f"{held}: it was deleted or lost, or this node predates it; put it back from its "
            "backup, or adopt the log as it is: `entraide audit checkpoint --adopt` verifies "
            "it first"
        )

    def _initialised(self) -> bool:
        from app.crypto.keys import keys_exist  # app.crypto.keys reads settings: not at import

        return self.keys_dir is None or keys_exist(self.keys_dir)

    def check(self, session: Session, size: int, root: bytes) -> None:
        try:
            signed = self.read()
        except LogRolledBack as exc:  # unreadable
            self.alarm(("unreadable", exc.detail), exc.detail)
            raise
        found = self.problem(session, size, root, signed=signed)
        if found is not None:
            self.alarm(self._rolled_back(signed, size, root), found)
            raise LogRolledBack(found)

    def _rolled_back(self, signed: Signed | None, size: int, root: bytes) -> RolledBackTo:
        """The problem a log of `size` entries under `root` is, against `signed`: the one last
        alarmed while the log only grew from it (a log that no longer extends the record
        never will again, and a missing record stays missing, however many entries are
        appended meanwhile), a new one once it went back further or was rewritten at the
        same size. Keyed on the record alone, a second, larger rollback after the first was
        never logged (from review)."""
        last = self._alarmed
        if (
            isinstance(last, RolledBackTo)
            and last.signed == signed
            and (size > last.size or (size == last.size and hmac.compare_digest(root, last.root)))
        ):
            return last
        return RolledBackTo(signed, size, root)

    def alarm(self, problem: object, message: str) -> None:
        """Log `message` as critical once for each distinct `problem`, not again while it
        lasts (each caller still refuses to sign: `doctor` and `audit verify --db` say it
        whenever they run, and `entraide_audit_last_checkpoint_age_seconds` keeps growing)."""
        if problem == self._alarmed:
            return
        self._alarmed = problem
        log.critical(
            "audit log rolled back or rewritten: %s; no checkpoint is signed until it is "
            "resolved (docs/operations.md §8)",
            message,
        )

    def remember(self, size: int, root: bytes) -> None:
        """After the checkpoint's commit: forward only (another process may have recorded a
        later one meanwhile; a record left a little behind only checks a little less)."""
        self._alarmed = None  # signed again: a problem from now on is a new one
        try:
            signed = self.read()
        except LogRolledBack:
            signed = None  # unreadable: replaced by this good one
        if signed is not None and signed.size >= size:
            return
        self.reset(size, root)

    def start(self) -> bool:
        """A new log's record, before its first entry: nothing signed yet, and every log
        extends the empty one. From then on a missing record is an alarm, whatever else
        was deleted with it. False where it cannot be written (the node then runs without
        one, as `doctor` says; `init` goes on, from review)."""
        try:
            self.reset(0, EMPTY_ROOT)
        except OSError as exc:
            log.warning(
                "could not write the record of what the log key signed at %s (%s): this "
                "node cannot tell a rolled-back audit log from the database alone",
                self.path,
                exc.strerror,
            )
            return False
        return True

    def reset(self, size: int, root: bytes) -> None:
        document = json.dumps({"v": 1, "size": size, "root": root.hex()}).encode()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.unlink(missing_ok=True)
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(document)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)
        sync_folder(self.path.parent)  # the rename too, or a power cut may undo it

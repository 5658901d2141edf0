"""`entraide backup` and `entraide restore`.

A backup is one gzipped tar file, written 0600:

    manifest.json          format, node, schema revision, row counts, SHA-256 of every member,
                           the public keys and the audit checkpoint signed just before the copy
    manifest.sig           Ed25519 signature of manifest.json by the node's signing key
    database/<table>.jsonl every row of every table (app.backup.dump)
    keys/node.json         the node's identity file (authority id, name, public URL)
    keys/identity.json     the signed identity document: the public keys
    keys/private.sealed    only with --include-private-keys: a tar of the keys folder, sealed
                           under a passphrase (app.backup.sealed)

The database holds only ciphertext and routing metadata, so a backup without the private keys
reveals no request content. Restoring goes into a fresh node (an empty database; an empty keys
folder, or the backed-up node's own keys), then checks the whole audit log against its signed
checkpoints and against the checkpoint in the manifest, and records the restore in the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from alembic import command
from alembic.util.exc import CommandError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.audit.anchor import RECORD_FILE, LogRolledBack, SignedLogAnchor
from app.audit.checkpoints import sign_checkpoint
from app.audit.log import record, record_alone
from app.audit.mac import mac_key
from app.audit.note import Checkpoint, NoteError, split_note
from app.audit.service import verify_database
from app.audit.verify import Report
from app.backup.dump import current_revisions, dump_database, holds_data, load_database
from app.backup.sealed import PassphraseError, seal, unseal
from app.config import Settings
from app.crypto.encoding import b64d, b64e, format_time, utc_now
from app.crypto.identity import build_identity_document
from app.crypto.keyfile import write_private
from app.crypto.keys import (
    IDENTITY_FILE,
    KEY_FILES,
    RESTORE_STAGING_PREFIX,
    RETIRED_DIR,
    ROTATIONS_FILE,
    NodeKeys,
    keys_exist,
    keys_folder_lock,
    load_keys,
)
from app.crypto.signing import sign, verify
from app.db import make_engine, unit_of_work
from app.durable import sync_folder
from app.migrate import alembic_config, pending, upgrade
from app.node import Node, key_passphrase, load_node

FORMAT = "entraide-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
DATABASE_DIR = "database"
NODE_MEMBER = "keys/node.json"
IDENTITY_MEMBER = "keys/identity.json"
PRIVATE_MEMBER = "keys/private.sealed"
DOMAIN_BACKUP = b"entraide/v1/backup-manifest\x00"
MAX_MANIFEST_BYTES = 1024 * 1024
CHUNK = 1024 * 1024

log = logging.getLogger(__name__)


class BackupError(Exception):
    """A backup that cannot be made or restored; the message says why, in plain words."""


@dataclass(frozen=True)
class BackupSummary:
    path: Path
    tables: dict[str, int]
    private_keys: bool
    schema_revisions: list[str]
    checkpoint: bool = True  # False: copied without a signed checkpoint (see create_backup)
    # Values the database could not give as stored, copied as their bytes (app/backup/dump.py).
    damaged: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RestoreSummary:
    authority_id: str
    tables: dict[str, int]
    keys_restored: bool
    report: Report
    recorded: bool = True  # False: the log was too damaged to take the restore's entry
    # Values the backup copied as their bytes (BackupSummary.damaged), restored so.
    damaged: list[dict[str, Any]] = field(default_factory=list)
    # When the backup was taken, as its manifest says (what `peers recover` starts from).
    backup_created_at: str = "?"


def _public_keys(keys: NodeKeys) -> dict[str, str]:
    return {
        "signing": b64e(keys.signing_public),
        "encryption": b64e(keys.encryption_public),
        "log": b64e(keys.log_public),
        "fingerprint": keys.fingerprint,
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _names_the_node(relative: Path) -> bool:
    """A file of the keys folder that says whose node it is: its identity, keys and rotation
    chain (not the signed-log record, which changes at every checkpoint, nor a README)."""
    parts = relative.parts
    return parts[0] == RETIRED_DIR or relative.name in {
        IDENTITY_FILE,
        ROTATIONS_FILE,
        *KEY_FILES.values(),
    }


def _refuse_linked_keys(keys_dir: Path) -> None:
    """Key material that is a symbolic link (a secret mounted from elsewhere) would not be
    in the backup (links are never followed into it): refused before anything is copied."""
    for path in sorted(keys_dir.rglob("*")):
        if path.is_symlink() and _names_the_node(path.relative_to(keys_dir)):
            raise BackupError(
                f"{path} is not a file of its own (a symbolic link): its key would not be in "
                "the backup; back up where it comes from, or copy it into the keys folder"
            )


def _private_keys_tar(keys_dir: Path, signed_log_file: Path | None = None) -> bytes:
    """Every regular file of the keys folder (current and retired keys), but node.json, and
    the record of what the log key signed (`signed_log_file`, ENTRAIDE_SIGNED_LOG_FILE) as
    the keys folder's `log-signed.json`, where it is restored and read from until the new
    file exists: kept elsewhere (docker-compose.yml), it was missing from the keys backup
    the documentation says to put it back from (from review)."""
    _refuse_linked_keys(keys_dir)
    files = [
        (path, path.relative_to(keys_dir).as_posix())
        for path in sorted(keys_dir.rglob("*"))
        if not path.is_symlink() and path.is_file() and path.name != IDENTITY_FILE
    ]
    if signed_log_file is not None and signed_log_file.is_file():
        files = [(path, name) for path, name in files if name != RECORD_FILE]
        files.append((signed_log_file, RECORD_FILE))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, name in files:
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def _check_keys_unchanged(settings: Settings, keys: NodeKeys) -> None:
    """The keys about to be copied are the node's own, files of their own (from review): a
    key file that is a symbolic link (a secret mount) was left out without a word, and the
    backup, said to hold the private keys, restored none; keys rotated since this backup
    began would be copied under a manifest naming and signed by the old ones, a backup no
    restore accepts. Either is refused now, not found at restore."""
    _refuse_linked_keys(settings.keys_dir)
    now = load_keys(settings.keys_dir, passphrase=key_passphrase(settings))
    if (now.signing_public, now.encryption_public) != (keys.signing_public, keys.encryption_public):
        raise BackupError(
            "the node's keys changed while the backup ran (a rotation?): run it again"
        )


def _checkpoint_before_copy(session: Session, node: Node, *, private_keys: bool, actor: str) -> str:
    record(
        session,
        actor=actor,
        action="backup.created",
        details={"private_keys": private_keys},
    )
    return sign_checkpoint(
        session, authority_id=node.authority_id, log_key=node.keys.log, anchor=node.log_anchor
    ).note


def _record_failed_backup(node: Node, exc: BaseException, actor: str) -> None:
    try:
        record_alone(
            node.sessions,
            actor=actor,
            action="backup.created",
            outcome="failed",
            details={"error": type(exc).__name__},
        )
    except Exception as failure:  # the backup's own error is the one to report
        log.error("could not record the failed backup (%s)", type(failure).__name__)


def create_backup(
    settings: Settings,
    *,
    out: Path,
    include_private_keys: bool,
    passphrase: bytes | None,
    actor: str = "node",
) -> BackupSummary:
    """`actor`: who asked for it (the command names its operator: a backup may hold the
    node's private keys, and its entry said only `node`, from review)."""
    if out.exists():
        raise BackupError(f"{out} exists; refusing to overwrite it")
    if include_private_keys and passphrase is None:
        raise PassphraseError(
            "--include-private-keys needs a passphrase: --passphrase-file FILE or "
            "ENTRAIDE_BACKUP_PASSPHRASE"
        )
    if not out.parent.is_dir():  # an unmounted backup volume must not fill the root disk
        raise BackupError(f"{out.parent} is not a folder: create it (or mount it) first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise BackupError(f"cannot write into {out.parent}")
    if include_private_keys:  # before the database is dumped and the log told of a backup
        _refuse_linked_keys(settings.keys_dir)
    node = load_node(settings)
    # One set of keys for the whole backup: the node follows a rotation made meanwhile
    # (app/crypto/keyring.py), and a manifest naming one set signed by another, or keys
    # copied under a manifest naming others, is a backup no restore accepts.
    keys = node.keys
    try:
        # The copy covers a signed checkpoint: a restore proves the log it brings back extends
        # it. A database still one schema behind the code (backed up before an upgrade) is
        # copied as it is, without writing to it.
        checkpoint: str | None = None
        if not pending(node.engine, settings.database_url):
            try:
                with unit_of_work(node.sessions) as session:
                    checkpoint = _checkpoint_before_copy(
                        session, node, private_keys=include_private_keys, actor=actor
                    )
            except Exception as exc:
                # A log too damaged to take an entry (its head behind its entries, say) is
                # evidence to keep: copied as it is, without a checkpoint; its restore will
                # say what is wrong with it. The log writes through the driver's cursor, so
                # its errors come unwrapped.
                # Only that: a locked database or any other failure is not a reason to write
                # a backup without its checkpoint.
                if not isinstance(exc, (IntegrityError, _driver_error(node, "IntegrityError"))):
                    raise
                log.warning(
                    "the audit log could not take the backup's entry (%s): backing it up as "
                    "it is, without a checkpoint; run `entraide audit verify --db`",
                    type(exc).__name__,
                )
        try:
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".entraide-backup-") as folder:
                staging = Path(folder)
                (staging / DATABASE_DIR).mkdir()
                (staging / "keys").mkdir()

                def open_member(name: str) -> IO[bytes]:
                    return (staging / DATABASE_DIR / name).open("wb")

                with tempfile.TemporaryDirectory(dir=out.parent, prefix=".entraide-db-") as scratch:
                    database = dump_database(
                        settings.database_url, open_member, scratch=Path(scratch)
                    )
                shutil.copyfile(settings.keys_dir / IDENTITY_FILE, staging / NODE_MEMBER)
                document = build_identity_document(node.identity, keys, issued_at=utc_now())
                (staging / IDENTITY_MEMBER).write_text(json.dumps(document, indent=1) + "\n")
                private: dict[str, Any] | None = None
                if include_private_keys:
                    assert passphrase is not None  # noqa: S101  # checked above
                    # Not in the middle of a rotation: its chain and its keys together.
                    with keys_folder_lock(settings.keys_dir):
                        _check_keys_unchanged(settings, keys)
                        keys_tar = _private_keys_tar(settings.keys_dir, settings.signed_log_file)
                    sealed, private = seal(keys_tar, passphrase)
                    (staging / PRIVATE_MEMBER).write_bytes(sealed)
                members = sorted(
                    path.relative_to(staging).as_posix()
                    for path in staging.rglob("*")
                    if path.is_file()
                )
                manifest = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "created_at": format_time(utc_now()),
                    "authority_id": node.authority_id,
                    "database": database,
                    "audit_checkpoint": checkpoint,
                    "public_keys": _public_keys(keys),
                    "private_keys": private,
                    "files": {name: _sha256_file(staging / name) for name in members},
                }
                manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
                signature = sign(keys.signing, DOMAIN_BACKUP, manifest_bytes)
                partial = out.with_name(out.name + ".partial")
                # Never an existing file's mode, nor a link planted in a shared folder.
                partial.unlink(missing_ok=True)
                descriptor = os.open(
                    partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                )
                try:
                    with os.fdopen(descriptor, "wb") as raw:
                        with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                            _add_bytes(tar, MANIFEST, manifest_bytes)
                            _add_bytes(tar, SIGNATURE, b64e(signature).encode())
                            for name in members:
                                tar.add(
                                    str(staging / name),
                                    arcname=name,
                                    recursive=False,
                                    filter=_private,
                                )
                        raw.flush()
                        os.fsync(raw.fileno())
                    os.replace(partial, out)
                except BaseException:
                    # A full disk, say: the database and the sealed keys are not left behind.
                    partial.unlink(missing_ok=True)
                    raise
        except BaseException as exc:
            if checkpoint is not None:  # its entry says a backup was made: it was not
                _record_failed_backup(node, exc, actor)
            raise
    finally:
        node.close()
    return BackupSummary(
        path=out,
        tables=database["tables"],
        private_keys=include_private_keys,
        schema_revisions=database["schema_revisions"],
        checkpoint=checkpoint is not None,
        damaged=database["damaged"],
    )


def _private(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(utc_now().timestamp())
    tar.addfile(info, io.BytesIO(data))


# --- restore ------------------------------------------------------------------------------


class _Archive:
    """Reads only the members the manifest lists, each checked against its hash first."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.members = {member.name: member for member in tar.getmembers() if member.isreg()}
        manifest_bytes = self._read(MANIFEST, limit=MAX_MANIFEST_BYTES)
        try:
            manifest = json.loads(manifest_bytes)
            self.signature = b64d(self._read(SIGNATURE, limit=1024).decode(), length=64)
        except ValueError as exc:
            raise BackupError("the backup's manifest is not readable") from exc
        if not isinstance(manifest, dict):
            raise BackupError("this file is not an Entraide backup (its manifest is no object)")
        self.manifest: dict[str, Any] = manifest
        self.manifest_bytes = manifest_bytes
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise BackupError("this file is not an Entraide backup (format 1)")
        files = self.manifest.get("files")
        if not isinstance(files, dict):
            raise BackupError("the backup's manifest lists no files")
        self.files: dict[str, str] = files
        for name, expected in self.files.items():
            if self._digest(name) != expected:
                raise BackupError(f"{name} in the backup is damaged (its SHA-256 differs)")

    def _member(self, name: str) -> tarfile.TarInfo:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or name not in self.members:
            raise BackupError(f"the backup lacks {name}")
        return self.members[name]

    def _open(self, name: str) -> IO[bytes]:
        handle = self.tar.extractfile(self._member(name))
        if handle is None:
            raise BackupError(f"the backup lacks {name}")
        return handle

    def _read(self, name: str, *, limit: int) -> bytes:
        with self._open(name) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise BackupError(f"{name} in the backup is too large")
        return data

    def _digest(self, name: str) -> str:
        digest = hashlib.sha256()
        with self._open(name) as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def read(self, name: str) -> bytes:
        if name not in self.files:
            raise BackupError(f"the backup lacks {name}")
        with self._open(name) as handle:
            return handle.read()

    def lines(self, name: str) -> Iterator[bytes]:
        if name not in self.files:
            raise BackupError(f"the backup lacks {name}")
        with self._open(name) as handle:
            yield from handle


def _check_public_keys(node: Node, manifest: dict[str, Any], source: str) -> None:
    if _public_keys(node.keys) != manifest.get("public_keys"):
        raise BackupError(
            f"the keys {source} are not the keys of the node this backup was made from "
            f"({manifest.get('authority_id')}), as they stood when it was made: another "
            "node's, or this node's after a key rotation made since this backup. A backup is "
            "restored with the keys it was made with: restore on its own (into an empty keys "
            "folder) the keys backup taken after that rotation, whose data are newer than "
            "this backup's; or give --keys-from a keys backup taken before that rotation, "
            "then rotate the keys again at once (docs/operations.md §5)"
        )


def _write_private_keys(
    keys_dir: Path, archive: _Archive, passphrase: bytes | None, *, shown: Path | None = None
) -> None:
    """`shown`: the keys folder the operator named (`keys_dir` may be a staging folder)."""
    if PRIVATE_MEMBER not in archive.files:
        raise BackupError(
            f"{shown or keys_dir} holds no keys and this backup has no private keys: put the "
            "node's keys there first, or restore a backup made with --include-private-keys"
        )
    if passphrase is None:
        raise PassphraseError(
            "this backup's private keys need its passphrase: --passphrase-file FILE or "
            "ENTRAIDE_BACKUP_PASSPHRASE"
        )
    params = archive.manifest.get("private_keys")
    if not isinstance(params, dict):
        raise BackupError("the backup's manifest lacks the private keys' parameters")
    blob = unseal(archive.read(PRIVATE_MEMBER), passphrase, params)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            if not member.isreg() or path.is_absolute() or ".." in path.parts:
                raise BackupError(f"unexpected entry {member.name!r} among the private keys")
            source = tar.extractfile(member)
            if source is None:
                continue
            target = keys_dir.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle, source:
                handle.write(source.read())
                handle.flush()
                os.fsync(handle.fileno())


def _restore_keys(
    settings: Settings,
    archive: _Archive,
    passphrase: bytes | None,
    keys_archive: _Archive | None = None,
) -> list[Path]:
    """Put the backed-up node's keys in place (or check those present). Returns the files
    written (none when the node's own keys were there). `keys_archive`: another backup of
    the same node holding its private keys (the documented routine keeps them apart from the
    nightly backups), whose keys must be the ones `archive` was signed with."""
    keys_dir = settings.keys_dir
    written: list[Path] = []
    if not keys_exist(keys_dir):
        # Stage next to the keys folder, check, then move: a wrong passphrase or a damaged
        # backup leaves the keys folder as it was.
        keys_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=keys_dir.parent, prefix=RESTORE_STAGING_PREFIX) as tmp:
            staged = Path(tmp) / "keys"
            _write_private_keys(staged, keys_archive or archive, passphrase, shown=keys_dir)
            write_private(staged / IDENTITY_FILE, archive.read(NODE_MEMBER))
            probe = load_node(settings.model_copy(update={"keys_dir": staged}))
            try:
                # Every check before any key is moved in: a refused backup leaves no keys.
                where = "in the backup" if keys_archive is None else "in the keys backup"
                _check_public_keys(probe, archive.manifest, where)
                _check_manifest_signature(probe, archive)
                if keys_archive is not None:  # and that file is the node's own, unaltered
                    _check_manifest_signature(probe, keys_archive)
            finally:
                probe.close()
            # Checked as staged, installed as staged: a file left in the keys folder (the
            # identity or rotation chain of another node, once its keys were deleted) would
            # win over the one checked, and a node be restored under another's name (from
            # review). An identical one is fine; a different one stops the restore.
            clashes = [
                str(keys_dir / path.relative_to(staged))
                for path in sorted(staged.rglob("*"))
                if path.is_file()
                and _names_the_node(path.relative_to(staged))
                and (keys_dir / path.relative_to(staged)).exists()
                and (keys_dir / path.relative_to(staged)).read_bytes() != path.read_bytes()
            ]
            if clashes:
                raise BackupError(
                    f"{', '.join(clashes)} already there and not the backup's: move them out "
                    f"of {keys_dir}, then restore again"
                )
            keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(OSError):  # one there already (the checkout's keys/)
                keys_dir.chmod(0o700)
            for path in sorted(staged.rglob("*")):
                target = keys_dir / path.relative_to(staged)
                if path.is_dir():
                    target.mkdir(exist_ok=True, mode=0o700)
                elif not target.exists():
                    os.replace(path, target)
                    written.append(target)
            # Durable before the database's rows are loaded: a power cut must not leave a
            # restored database whose keys (retired ones among them) were never on disk.
            for folder in sorted({keys_dir, *(target.parent for target in written)}):
                sync_folder(folder)
        return written
    if not (keys_dir / IDENTITY_FILE).exists():
        write_private(keys_dir / IDENTITY_FILE, archive.read(NODE_MEMBER))
        written.append(keys_dir / IDENTITY_FILE)
    node = load_node(settings)
    try:
        _check_public_keys(node, archive.manifest, f"in {keys_dir}")
        _check_manifest_signature(node, archive)
    except BaseException:
        _remove(written)
        raise
    finally:
        node.close()
    return written


def _check_manifest_signature(node: Node, archive: _Archive) -> None:
    if not verify(
        node.keys.signing_public, DOMAIN_BACKUP, archive.manifest_bytes, archive.signature
    ):
        raise BackupError("the backup's manifest is not signed by the node's key")


def _remove(paths: list[Path]) -> None:
    for path in reversed(paths):
        path.unlink(missing_ok=True)


def _restore_database(settings: Settings, archive: _Archive) -> dict[str, int]:
    database = archive.manifest.get("database")
    if not isinstance(database, dict):
        raise BackupError("the backup's manifest describes no database")
    revisions = database.get("schema_revisions")
    tables = database.get("tables")
    if not isinstance(revisions, list) or len(revisions) != 1 or not isinstance(tables, dict):
        raise BackupError("the backup's manifest has no single schema revision")
    url = settings.database_url
    engine = make_engine(url)
    try:
        current = current_revisions(engine)
        if current and current != revisions:
            # The schema exists, empty (checked before), at another revision: start over.
            command.downgrade(alembic_config(url), "base")
        try:
            upgrade(url, revisions[0])
        except CommandError as exc:
            raise BackupError(
                f"the backup's schema revision {revisions[0]} is unknown to this version of "
                "Entraide; restore it with the version that made it, or a newer one"
            ) from exc
        load_database(engine, lambda name: archive.lines(f"{DATABASE_DIR}/{name}"), tables)
    finally:
        engine.dispose()
    upgrade(url, "head")
    return {str(name): int(count) for name, count in tables.items()}


def check_target_empty(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    try:
        busy = holds_data(engine)
    finally:
        engine.dispose()
    if busy:
        raise BackupError(
            "the database already holds data (" + ", ".join(busy) + "); restore into an "
            "empty database (create a new one, or drop this one's tables)"
        )


def _new_sqlite_file(url: str) -> Path | None:
    """The SQLite file a restore would create, if it does not exist yet."""
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url.removeprefix("sqlite:///"))
    return None if path.exists() or str(path) == ":memory:" else path


def _damaged(archive_path: Path, exc: BaseException) -> BackupError:
    return BackupError(
        f"{archive_path} is damaged or truncated ({type(exc).__name__}); use another copy of "
        "this backup"
    )


_BROKEN = (tarfile.TarError, EOFError, zlib.error)


@contextlib.contextmanager
def _opened(archive_path: Path) -> Iterator[_Archive]:
    """A backup file read whole, every member checked against its manifest."""
    try:
        tar = tarfile.open(archive_path, mode="r:gz")
    except _BROKEN as exc:
        raise _damaged(archive_path, exc) from exc
    except OSError as exc:
        raise BackupError(f"cannot read {archive_path}: {exc.strerror or exc}") from exc
    with tar:
        try:
            # Read to its end (every member's hash is checked here): a file cut short or
            # altered in transit fails in the compressed stream, before anything is written.
            archive = _Archive(tar)
        except (*_BROKEN, OSError) as exc:
            raise _damaged(archive_path, exc) from exc
        yield archive


def restore_backup(
    settings: Settings,
    *,
    archive_path: Path,
    passphrase: bytes | None,
    actor: str,
    keys_from: Path | None = None,
    move_log_back: bool = False,
) -> RestoreSummary:
    """`keys_from`: a backup of the same node with its private keys, for a backup without
    them restored where the keys folder is empty (a replacement machine). `move_log_back`:
    the operator's word that the record of what the log key signed, ahead of the backup,
    is to be moved back to it (`_refuse_moving_back`)."""
    with contextlib.ExitStack() as stack:
        archive = stack.enter_context(_opened(archive_path))
        keys_archive = stack.enter_context(_opened(keys_from)) if keys_from else None
        created = _new_sqlite_file(settings.database_url)
        written: list[Path] = []
        try:
            check_target_empty(settings)
            if keys_archive is not None and keys_exist(settings.keys_dir):
                raise BackupError(
                    f"{settings.keys_dir} holds keys already: --keys-from is for an empty "
                    "keys folder (leave it out to restore with the keys there)"
                )
            written = _restore_keys(settings, archive, passphrase, keys_archive)
            if not move_log_back:
                _refuse_moving_back(settings, archive.manifest, written)
            tables = _restore_database(settings, archive)
        except BaseException:
            # Refused: "changes nothing" includes not leaving keys, nor an empty database
            # file where there was none (a schema the backup's revision refused, say).
            _remove(written)
            if created is not None:
                for suffix in ("", "-wal", "-shm"):
                    created.with_name(created.name + suffix).unlink(missing_ok=True)
            raise
        keys_restored = any(path.name != IDENTITY_FILE for path in written)
    node = load_node(settings)
    try:
        with unit_of_work(node.sessions) as session:
            report = verify_database(
                session,
                authority_id=node.authority_id,
                log_public=node.keys.log_public,
                earlier=archive.manifest.get("audit_checkpoint"),
                mac_key=mac_key(node.keys.log),
            )
        recorded = record_restore(
            node,
            report,
            backup_created_at=str(archive.manifest.get("created_at")),
            keys_restored=keys_restored,
            actor=actor,
        )
    finally:
        node.close()
    return RestoreSummary(
        authority_id=node.authority_id,
        tables=tables,
        keys_restored=keys_restored,
        report=report,
        recorded=recorded,
        damaged=_damaged_in(archive.manifest),
        backup_created_at=str(archive.manifest.get("created_at")),
    )


def _refuse_moving_back(settings: Settings, manifest: dict[str, Any], written: list[Path]) -> None:
    """A restore moves the record of what the log key signed (`log-signed.json`) back to
    the backup's log, signs over it, and records that. A record that says the key signed as
    much as the backup holds, or more, may be a live node's: a restore drill on its host,
    with its keys folder, made the live node find its own log "rolled back" (even a quiet
    one, whose record was the backup's own: the restore signs one entry more), and sign
    nothing more, while the same key signed a second history, a fork its peers report as a
    split view (from review). Refused unless the operator says that is the point. A record
    this restore just wrote (from the backup's keys, into an empty keys folder), or one
    older than the backup (no node that made this backup has it), is no live node's."""
    anchor = SignedLogAnchor.of(settings)
    found = anchor.path if anchor.path.exists() or anchor.moved_from is None else anchor.moved_from
    if found in written:
        return
    try:
        signed = anchor.read()
    except LogRolledBack as exc:
        raise BackupError(f"{exc.detail}; or add --move-log-back to replace it") from exc
    if signed is None:
        return
    at_backup = _backup_checkpoint(manifest)
    if at_backup is not None and signed.size < at_backup.size:
        return  # older than the backup (an older keys backup's)
    backup_holds = f"{at_backup.size} entries" if at_backup is not None else "an unsigned log"
    raise BackupError(
        f"{anchor.path} records that this node's log key signed a log of {signed.size} "
        f"entries; the backup's was signed at {backup_holds}. Restoring signs over the "
        "backup's log and moves that record to it: a node still running with these keys "
        "would find its own log rolled back and sign nothing more. To put this node back to "
        "the backup, add "
        "--move-log-back (and tell your peers, docs/operations.md §5). For a restore drill, "
        "use a copy of the keys folder (cp -a) and a signed-log file of its own, never the "
        "live node's, then add --move-log-back"
    )


def _backup_checkpoint(manifest: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint the backup's log was signed at, as its manifest (signed) holds it."""
    note = manifest.get("audit_checkpoint")
    if not isinstance(note, str):
        return None
    try:
        text, _ = split_note(note)
        return Checkpoint.parse(text)
    except NoteError:
        return None


def _damaged_in(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    database = manifest.get("database")
    damaged = database.get("damaged") if isinstance(database, dict) else None
    if not isinstance(damaged, list):
        return []
    return [found for found in damaged if isinstance(found, dict)]


def record_restore(
    node: Node, report: Report, *, backup_created_at: str, keys_restored: bool, actor: str
) -> bool:
    """Recorded either way: a restore whose log fails is a fact for the next auditor too.
    Only a log that verified gets a checkpoint signed over it. False if the log was too
    damaged to take the entry (its head behind its entries, say): the failed verification
    is then the whole story, and the command says so."""
    details: dict[str, object] = {
        "backup_created_at": backup_created_at,
        "entries": report.entries,
        "keys_restored": keys_restored,
    }
    if report.first is not None:
        details["first_problem"] = report.first.message
    signed = None
    try:
        with unit_of_work(node.sessions) as session:
            record(
                session,
                actor=actor,
                action="node.restored",
                outcome="ok" if report.ok else "log_failed",
                details=details,
            )
            if report.ok:
                # The log moved back to the backup's on purpose: what was signed since is
                # no longer this node's to extend (app/audit/anchor.py). Signed without the
                # record, which is then replaced by this checkpoint, once it is committed.
                signed = sign_checkpoint(
                    session, authority_id=node.authority_id, log_key=node.keys.log
                )
        if signed is not None:
            node.log_anchor.reset(signed.size, signed.root_hash)
    except Exception as exc:
        # The log writes through the driver's own cursor: its errors come unwrapped.
        if report.ok or not isinstance(exc, (SQLAlchemyError, _driver_error(node, "Error"))):
            raise
        return False
    return True


def _driver_error(node: Node, name: str) -> type[Exception]:
    """The driver's own exception class `name` (PEP 249)."""
    error: type[Exception] = getattr(node.engine.dialect.dbapi, name, SQLAlchemyError)
    return error

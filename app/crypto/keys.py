"""Node key material: generation, files on disk, key ids and fingerprints.

A node holds three independent key pairs (DESIGN.md section 4): an Ed25519 signing key
(envelopes, receipts, identity documents), an X25519 encryption key (content-key wraps) and
an Ed25519 audit-log key (checkpoints). Separate keys keep a compromise or a rotation of one
purpose from touching the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.crypto.encoding import format_time, key_id, parse_time, sha256, utc_now
from app.crypto.keyfile import (
    KeyFileError,
    encode_key_file,
    read_key_file,
    write_private,
)
from app.crypto.rotation import Rotation, RotationError, make_rotation, parse_rotation
from app.durable import sync_folder

KEY_FILES = {"signing": "signing.key", "encryption": "encryption.key", "log": "log.key"}
IDENTITY_FILE = "node.json"
# Public: every rotation statement this node made, oldest first (docs/protocol.md §5.4).
ROTATIONS_FILE = "rotations.json"
# Retired private encryption keys, kept (protected like the others) so archived envelopes
# sealed to them stay readable.
RETIRED_DIR = "retired"
# Where `entraide restore` unseals a backup's keys, beside the keys folder, before it moves
# them in (app/backup/service.py); a restore killed meanwhile leaves one behind (doctor).
RESTORE_STAGING_PREFIX = ".entraide-keys-"

__all__ = ["KeyFileError", "NodeKeys", "RetiredKey", "key_id", "load_keys", "save_keys"]


def fingerprint(signing_public_key: bytes) -> str:
    """SHA-256 of the node's signing public key, read out to peers to pin the node."""
    return sha256(signing_public_key).hex()


def format_fingerprint(value: str) -> str:
    """Groups of four hex digits, so two people can compare it over the phone."""
    return " ".join(value[i : i + 4] for i in range(0, len(value), 4)).upper()


def normalise_fingerprint(text: str) -> str:
    return "".join(ch for ch in text if ch not in " :-").lower()


def fingerprints_match(expected: str, actual: str) -> bool:
    return hmac.compare_digest(
        normalise_fingerprint(expected).encode(), normalise_fingerprint(actual).encode()
    )


@dataclass(frozen=True)
class NodeIdentity:
    authority_id: str
    name: str
    public_url: str


@dataclass(frozen=True)
class RetiredKey:
    """An encryption key replaced by a rotation: opens archives forever, and still accepts
    new envelopes from peers that have not seen the rotation until `accept_until`."""

    private: PrivateKey
    retired_at: datetime
    accept_until: datetime

    @property
    def kid(self) -> str:
        return key_id(bytes(self.private.public_key))


@dataclass(frozen=True)
class NodeKeys:
    signing: SigningKey
    encryption: PrivateKey
    log: SigningKey
    retired: tuple[RetiredKey, ...] = ()
    rotations: tuple[Rotation, ...] = ()
    # By purpose, the created and expiry times of the files these keys were read from:
    # what a running node reports as the age of the keys it uses (not of the files now on
    # disk, which a rotation it could not load has replaced). Empty for generated keys.
    dates: dict[str, KeyDates] = field(default_factory=dict, compare=False, hash=False)

    @property
    def signing_public(self) -> bytes:
        return bytes(self.signing.verify_key)

    @property
    def encryption_public(self) -> bytes:
        return bytes(self.encryption.public_key)

    @property
    def log_public(self) -> bytes:
        return bytes(self.log.verify_key)

    @property
    def signing_kid(self) -> str:
        return key_id(self.signing_public)

    @property
    def encryption_kid(self) -> str:
        return key_id(self.encryption_public)

    @property
    def log_kid(self) -> str:
        return key_id(self.log_public)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signing_public)

    def encryption_key_for(self, kid: str) -> PrivateKey | None:
        """Current or retired: an archived envelope opens with whichever key it was sealed to."""
        if hmac.compare_digest(kid, self.encryption_kid):
            return self.encryption
        for retired in self.retired:
            if hmac.compare_digest(kid, retired.kid):
                return retired.private
        return None

    def accepts_encryption_kid(self, kid: str, now: datetime) -> bool:
        """May a new envelope be sealed to `kid`? The current key, or a retired one within
        its overlap period (peers that have not yet seen our rotation)."""
        if hmac.compare_digest(kid, self.encryption_kid):
            return True
        return any(
            hmac.compare_digest(kid, retired.kid) and now < retired.accept_until
            for retired in self.retired
        )

    def signing_public_for(self, kid: str) -> bytes | None:
        """Our signing public key named `kid`, current or rotated away (own stored envelopes)."""
        if hmac.compare_digest(kid, self.signing_kid):
            return self.signing_public
        for rotation in self.rotations:
            if hmac.compare_digest(kid, rotation.old.signing_kid):
                return rotation.old.signing
        return None

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(SigningKey.generate(), PrivateKey.generate(), SigningKey.generate())


KeyDates = tuple[datetime | None, datetime | None]  # created, expires


def file_dates(document: dict[str, object]) -> KeyDates:
    """A key file's public `created_at` and `expires_at` members (None if absent or bad)."""
    found: list[datetime | None] = []
    for member in ("created_at", "expires_at"):
        value = document.get(member)
        try:
            found.append(parse_time(value) if isinstance(value, str) and value else None)
        except ValueError:
            found.append(None)
    return found[0], found[1]


def keys_exist(keys_dir: Path) -> bool:
    return any((keys_dir / name).exists() for name in KEY_FILES.values())


# As for a backup's passphrase (app/backup/sealed.py): Argon2id slows each guess, it cannot
# make a short passphrase long. Checked where one is chosen (init, protect), not when keys
# are read or rotated: a node protected before this rule still starts and rotates.
MIN_KEY_PASSPHRASE_CHARS = 12


def _chosen(passphrase: bytes) -> bytes:
    if len(passphrase.decode("utf-8", "replace")) < MIN_KEY_PASSPHRASE_CHARS:
        raise KeyFileError(
            f"the key passphrase must have at least {MIN_KEY_PASSPHRASE_CHARS} characters"
        )
    return passphrase


def save_keys(keys_dir: Path, keys: NodeKeys, *, passphrase: bytes | None = None) -> None:
    """Write new key files (never over existing ones), protected if a passphrase is given."""
    if passphrase is not None:
        _chosen(passphrase)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode applies only to a folder it makes: one already there (the checkout's own
    # `keys/`, 0755 from git) is closed too, or the node's own checks refuse it at once.
    with contextlib.suppress(OSError):  # not ours to change: `doctor` says what to run
        keys_dir.chmod(0o700)
    secrets = {
        "signing": bytes(keys.signing),
        "encryption": bytes(keys.encryption),
        "log": bytes(keys.log),
    }
    for kind, secret in secrets.items():
        write_private(
            keys_dir / KEY_FILES[kind], encode_key_file(kind, secret, passphrase=passphrase)
        )


def _read_secret(path: Path, kind: str, passphrase: bytes | None) -> bytes:
    return read_key_file(path, kind=kind, passphrase=passphrase)[0]


def _load_rotations(keys_dir: Path) -> tuple[Rotation, ...]:
    path = keys_dir / ROTATIONS_FILE
    if not path.exists():
        return ()
    try:
        wire = json.loads(path.read_bytes())
        if not isinstance(wire, list):
            raise KeyFileError(f"{path} is not a list of rotation statements")
        return tuple(parse_rotation(item) for item in wire)
    except (ValueError, RecursionError, RotationError) as exc:
        raise KeyFileError(f"{path} is not a valid rotation chain: {exc}") from exc


def _load_retired(keys_dir: Path, passphrase: bytes | None) -> tuple[RetiredKey, ...]:
    folder = keys_dir / RETIRED_DIR
    if not folder.exists():
        return ()
    retired = []
    for path in sorted(folder.glob("encryption-*.key")):
        secret, document = read_key_file(path, kind="encryption", passphrase=passphrase)
        try:
            retired.append(
                RetiredKey(
                    private=PrivateKey(secret),
                    retired_at=parse_time(document.get("retired_at")),
                    accept_until=parse_time(document.get("accept_until")),
                )
            )
        except ValueError as exc:
            raise KeyFileError(f"{path} lacks valid retired_at and accept_until") from exc
    return tuple(retired)


def load_keys(keys_dir: Path, *, passphrase: bytes | None = None) -> NodeKeys:
    # A rotation in another process can put its keys in place between our reads of the
    # key files and of the chain: a mismatch is read again before it is an error.
    for _ in range(LOAD_ATTEMPTS - 1):
        keys = _load(keys_dir, passphrase)
        if _named_by_chain(keys):
            return keys
        time.sleep(0.2)
    keys = _load(keys_dir, passphrase)
    if not _named_by_chain(keys):
        raise KeyFileError(
            f"the keys in {keys_dir} are not the ones its last rotation introduced, read "
            f"{LOAD_ATTEMPTS} times: a rotation under way would have ended by now; if this "
            "persists, the folder was changed by hand or partly restored: restore the whole "
            "keys folder from its latest backup"
        )
    return keys


LOAD_ATTEMPTS = 3


def _named_by_chain(keys: NodeKeys) -> bool:
    if not keys.rotations:
        return True
    last = keys.rotations[-1].new
    return last.signing == keys.signing_public and last.encryption == keys.encryption_public


def _load(keys_dir: Path, passphrase: bytes | None) -> NodeKeys:
    if any(_staged(keys_dir).values()):
        finish_interrupted_rotation(keys_dir, passphrase)
    secrets: dict[str, bytes] = {}
    dates: dict[str, KeyDates] = {}
    for kind, name in KEY_FILES.items():
        secrets[kind], document = read_key_file(keys_dir / name, kind=kind, passphrase=passphrase)
        dates[kind] = file_dates(document)
    return NodeKeys(
        signing=SigningKey(secrets["signing"]),
        encryption=PrivateKey(secrets["encryption"]),
        log=SigningKey(secrets["log"]),
        retired=_load_retired(keys_dir, passphrase),
        rotations=_load_rotations(keys_dir),
        dates=dates,
    )


def rotate_keys(
    keys_dir: Path, *, authority_id: str, passphrase: bytes | None, overlap: timedelta
) -> tuple[NodeKeys, NodeKeys]:
    """Replace the signing and encryption keys; the old signing key signs the new ones.

    Order matters for a crash: the retired key is saved first (nothing is lost; saved again
    as it is by a rotation tried again), then the new keys staged beside the current ones
    (`*.key.next`), then the chain that names them, then the staged keys put in place. An
    interruption before the chain leaves the old keys in use (the staged ones are written
    over by the next rotation); after it, the next `load_keys` puts the staged keys in place
    (`finish_interrupted_rotation`):
    either way, the node never runs with keys its chain does not name. The log key is not
    rotated: peers witness checkpoints with it.
    """
    with keys_folder_lock(keys_dir):
        return _rotate(keys_dir, authority_id=authority_id, passphrase=passphrase, overlap=overlap)


def _rotate(
    keys_dir: Path, *, authority_id: str, passphrase: bytes | None, overlap: timedelta
) -> tuple[NodeKeys, NodeKeys]:
    old = load_keys(keys_dir, passphrase=passphrase)
    now = utc_now()
    new_signing, new_encryption = SigningKey.generate(), PrivateKey.generate()
    rotation = make_rotation(
        authority_id=authority_id,
        seq=len(old.rotations) + 1,
        old_signing=old.signing,
        old_encryption=old.encryption,
        new_signing=new_signing,
        new_encryption=new_encryption,
        rotated_at=now,
        accepted_until=now + overlap,
    )
    retired_dir = keys_dir / RETIRED_DIR
    retired_dir.mkdir(exist_ok=True, mode=0o700)
    write_private(  # the same key again if an earlier attempt saved it and stopped
        retired_dir / f"encryption-{old.encryption_kid}.key",
        encode_key_file(
            "encryption",
            bytes(old.encryption),
            passphrase=passphrase,
            extra={"retired_at": format_time(now), "accept_until": format_time(now + overlap)},
        ),
        replace=True,
    )
    staged = _staged_paths(keys_dir)
    for kind, secret in (("signing", bytes(new_signing)), ("encryption", bytes(new_encryption))):
        write_private(
            staged[kind], encode_key_file(kind, secret, passphrase=passphrase), replace=True
        )
    sync_folder(keys_dir)  # the staged keys are on disk before any chain names them
    chain = [item.to_wire() for item in (*old.rotations, rotation)]
    write_private(
        keys_dir / ROTATIONS_FILE, json.dumps(chain, indent=1).encode() + b"\n", replace=True
    )
    _put_in_place(keys_dir, staged)
    return old, load_keys(keys_dir, passphrase=passphrase)


_held = threading.local()  # keys folders this thread holds the lock of (it is re-entered)


@contextmanager
def keys_folder_lock(keys_dir: Path) -> Iterator[None]:
    """The commands that change key files (`keys rotate`, `keys protect`, finishing a
    rotation) one at a time: a rotation's staged keys are not yet named by its chain, and
    another command must not take them for a leftover (from review). Advisory (flock) on a
    lock file in the folder; a folder that takes no new file (read-only) takes no change
    either, so nothing to lock."""
    held: set[str] = getattr(_held, "folders", set())
    _held.folders = held
    name = str(keys_dir.resolve())
    if name in held:
        yield
        return
    descriptor = _locked(keys_dir / LOCK_FILE)
    if descriptor is None:
        yield
        return
    held.add(name)
    try:
        yield
    finally:
        held.discard(name)
        os.close(descriptor)


def _locked(path: Path) -> int | None:
    """A descriptor holding the lock at `path`; None where none can be had (a read-only
    folder, a file system without flock): changes then go unlocked, as before the lock."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


STAGED_SUFFIX = ".next"  # a rotation's new key, written before the chain names it
LOCK_FILE = ".lock"  # keys_folder_lock


def _staged_paths(keys_dir: Path) -> dict[str, Path]:
    return {
        kind: keys_dir / (KEY_FILES[kind] + STAGED_SUFFIX) for kind in ("signing", "encryption")
    }


def _staged(keys_dir: Path) -> dict[str, bool]:
    return {kind: path.exists() for kind, path in _staged_paths(keys_dir).items()}


def rotation_staged(keys_dir: Path) -> bool:
    """New keys of a rotation stopped half way (or under way) wait beside the current ones."""
    return any(_staged(keys_dir).values())


def _put_in_place(keys_dir: Path, staged: dict[str, Path]) -> None:
    for kind, path in staged.items():
        try:
            os.replace(path, keys_dir / KEY_FILES[kind])
        except FileNotFoundError:
            pass  # put in place already (another process loading the keys meanwhile)
    sync_folder(keys_dir)


def finish_interrupted_rotation(
    keys_dir: Path, passphrase: bytes | None, *, drop_unnamed: bool = False
) -> None:
    """A rotation stopped with new keys staged (`rotate_keys`): those its chain names go in
    place (it stopped after the chain was written: peers may already follow it). Any other
    is left alone: a rotation stopped before its chain (the old keys stay in use, and the
    next rotation writes over it), or one under way in another process right now, whose
    keys deleting would leave its chain naming keys that exist nowhere (from review).
    `drop_unnamed` (`protect_keys`, run by an operator, never beside a rotation) removes
    them: unprotected private keys nothing will use."""
    with keys_folder_lock(keys_dir):
        _finish(keys_dir, passphrase, drop_unnamed=drop_unnamed)


def _finish(keys_dir: Path, passphrase: bytes | None, *, drop_unnamed: bool) -> None:
    rotations = _load_rotations(keys_dir)
    named = rotations[-1].new if rotations else None
    staged = _staged_paths(keys_dir)
    keep: dict[str, Path] = {}
    try:
        for kind, path in staged.items():
            if not path.exists():
                continue
            try:
                secret = _read_secret(path, kind, passphrase)
            except (KeyFileError, FileNotFoundError):
                if not path.exists():
                    continue  # put in place meanwhile by another process
                raise
            public = (
                bytes(SigningKey(secret).verify_key)
                if kind == "signing"
                else bytes(PrivateKey(secret).public_key)
            )
            expected = None if named is None else getattr(named, kind)
            if expected is not None and hmac.compare_digest(public, expected):
                keep[kind] = path
            elif drop_unnamed:
                path.unlink(missing_ok=True)
        if keep:
            _put_in_place(keys_dir, keep)
    except OSError as exc:
        raise KeyFileError(
            f"a key rotation in {keys_dir} was interrupted, and completing it needs write "
            f"access to that folder ({exc.strerror}): run `entraide keys show` once with it"
        ) from exc


def protect_keys(keys_dir: Path, *, passphrase: bytes, current: bytes | None = None) -> int:
    """Rewrite every private key file under `passphrase` (from plain, or from `current`)."""
    _chosen(passphrase)
    with keys_folder_lock(keys_dir):
        return _protect(keys_dir, passphrase=passphrase, current=current)


def _protect(keys_dir: Path, *, passphrase: bytes, current: bytes | None) -> int:
    # A rotation stopped half way first: its keys in place (then protected), or, never named
    # by its chain, removed (else they would stay on disk unprotected); and the temporary
    # file of a write that failed, which may hold a private key in clear.
    finish_interrupted_rotation(keys_dir, current, drop_unnamed=True)
    for leftover in (*keys_dir.glob("*.new"), *(keys_dir / RETIRED_DIR).glob("*.new")):
        leftover.unlink(missing_ok=True)
    paths = [(keys_dir / name, kind) for kind, name in KEY_FILES.items()]
    paths += [(path, "encryption") for path in sorted((keys_dir / RETIRED_DIR).glob("*.key"))]
    for path, kind in paths:
        secret, document = read_key_file(path, kind=kind, passphrase=current)
        # Its dates stay: the key is the same (its age is what rotation advice reads).
        extra: dict[str, object] = {
            key: document[key]
            for key in ("created_at", "retired_at", "accept_until")
            if key in document
        }
        write_private(
            path, encode_key_file(kind, secret, passphrase=passphrase, extra=extra), replace=True
        )
    return len(paths)


def save_identity(keys_dir: Path, identity: NodeIdentity) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    document = {
        "authority_id": identity.authority_id,
        "name": identity.name,
        "public_url": identity.public_url,
    }
    # Synced as the keys are: `init` records them in the database right after.
    write_private(
        keys_dir / IDENTITY_FILE, (json.dumps(document, indent=1) + "\n").encode(), replace=True
    )


def load_identity(keys_dir: Path) -> NodeIdentity:
    path = keys_dir / IDENTITY_FILE
    if not path.exists():
        raise KeyFileError(f"{path} does not exist; run `entraide init` first")
    try:
        document = json.loads(path.read_text())
        return NodeIdentity(
            authority_id=str(document["authority_id"]),
            name=str(document["name"]),
            public_url=str(document["public_url"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a valid node identity file") from exc


def retired_files(keys_dir: Path) -> list[Path]:
    """The retired keys' files (`RETIRED_DIR`), for checks of every key file the node has."""
    return sorted(path for path in (keys_dir / RETIRED_DIR).glob("*") if path.is_file())

"""Key files on disk: plain (v1) or protected by a passphrase (v2), never readable by others.

    v1  {"v": 1, "kind", "created_at", "secret": b64(32 bytes)}
    v2  {"v": 2, "kind", "created_at",
         "kdf": {"alg": "argon2id13", "opslimit", "memlimit", "salt": b64(16)},
         "nonce": b64(24), "box": b64(secretbox(kind || 0x00 || secret))}

The passphrase is stretched with Argon2id (libsodium's crypto_pwhash) into a secretbox key;
the kind is sealed with the secret, so a protected signing key cannot be passed off as an
encryption key by renaming files. Either form may carry extra public metadata members
(a retired key's `retired_at` and `accept_until`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.pwhash import argon2id
from nacl.secret import SecretBox
from nacl.utils import random

from app.crypto.encoding import DecodeError, b64d, b64e, format_time, is_int, utc_now
from app.durable import sync_folder

KDF_ALG = "argon2id13"
# 64 MiB and 3 passes: about 0.15 s per file on a small server, so a node with a handful of
# key files starts in about a second. Stored per file, so stronger settings can come later.
OPSLIMIT = 3
MEMLIMIT = 64 * 1024 * 1024
MAX_OPSLIMIT = argon2id.OPSLIMIT_SENSITIVE
MAX_MEMLIMIT = argon2id.MEMLIMIT_SENSITIVE
SALT_BYTES = argon2id.SALTBYTES
SECRET_BYTES = 32
MAX_KEY_FILE_BYTES = 4096


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed, too widely readable or locked."""


def check_private_mode(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )


def write_private(path: Path, content: bytes, *, replace: bool = False) -> None:
    """Create a 0600 file. O_EXCL: never overwrite a key by accident; `replace` writes a
    temporary file and renames it over the old one, so a crash leaves one or the other.
    Durable when this returns: the bytes synced, then the folder that names the file (a
    power cut could otherwise lose the entry of a file whose bytes were on disk: a retired
    encryption key, say, that archived requests need; from review)."""
    target = path.with_name(path.name + ".new") if replace else path
    if replace and target.exists():
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(target, path)
        sync_folder(path.parent)
    except BaseException:
        # Never a partial or temporary key file left behind (a full disk): it may hold a
        # private key that no later command knows to protect or remove (from review).
        target.unlink(missing_ok=True)
        raise


def _box_key(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return bytes(
        argon2id.kdf(SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit)
    )


def encode_key_file(
    kind: str,
    secret: bytes,
    *,
    passphrase: bytes | None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    document: dict[str, Any] = {"kind": kind, "created_at": format_time(utc_now())}
    document.update(extra or {})
    if passphrase is None:
        document.update({"v": 1, "secret": b64e(secret)})
    else:
        salt = random(SALT_BYTES)
        nonce = random(SecretBox.NONCE_SIZE)
        box = SecretBox(_box_key(passphrase, salt, OPSLIMIT, MEMLIMIT))
        sealed = box.encrypt(kind.encode() + b"\x00" + secret, nonce).ciphertext
        document.update(
            {
                "v": 2,
                "kdf": {
                    "alg": KDF_ALG,
                    "opslimit": OPSLIMIT,
                    "memlimit": MEMLIMIT,
                    "salt": b64e(salt),
                },
                "nonce": b64e(nonce),
                "box": b64e(bytes(sealed)),
            }
        )
    return json.dumps(document, indent=1, sort_keys=True).encode()


def decode_key_file(
    data: bytes, *, kind: str, passphrase: bytes | None, name: str = "key file"
) -> tuple[bytes, dict[str, Any]]:
    """The 32-byte secret and the file's members. Raises KeyFileError, and nothing else."""
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{name} is too large to be a key file")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise KeyFileError(f"{name} is not a valid key file") from exc
    if not isinstance(document, dict) or document.get("kind") != kind:
        raise KeyFileError(f"{name} is not a {kind} key file")
    version = document.get("v")
    try:
        if is_int(version) and version == 1:
            return b64d(document.get("secret"), length=SECRET_BYTES), document
        if is_int(version) and version == 2:
            return _unseal(document, kind=kind, passphrase=passphrase, name=name), document
    except DecodeError as exc:
        raise KeyFileError(f"{name} is not a valid key file") from exc
    raise KeyFileError(f"{name} has an unknown key file version")


def _unseal(document: dict[str, Any], *, kind: str, passphrase: bytes | None, name: str) -> bytes:
    kdf = document.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("alg") != KDF_ALG:
        raise KeyFileError(f"{name} uses an unknown key derivation")
    opslimit, memlimit = kdf.get("opslimit"), kdf.get("memlimit")
    if not (isinstance(opslimit, int) and isinstance(memlimit, int)) or not (
        is_int(opslimit) and is_int(memlimit)
    ):
        raise KeyFileError(f"{name} has invalid key derivation parameters")
    if not (argon2id.OPSLIMIT_MIN <= opslimit <= MAX_OPSLIMIT) or not (
        argon2id.MEMLIMIT_MIN <= memlimit <= MAX_MEMLIMIT
    ):
        raise KeyFileError(f"{name} has key derivation parameters out of range")
    salt = b64d(kdf.get("salt"), length=SALT_BYTES)
    nonce = b64d(document.get("nonce"), length=SecretBox.NONCE_SIZE)
    sealed = b64d(document.get("box"))
    if passphrase is None:
        raise KeyFileError(
            f"{name} is protected by a passphrase; set ENTRAIDE_KEY_PASSPHRASE or "
            "ENTRAIDE_KEY_PASSPHRASE_FILE"
        )
    try:
        plain = SecretBox(_box_key(passphrase, salt, opslimit, memlimit)).decrypt(sealed, nonce)
    except CryptoError as exc:
        # Never say more: which part was wrong would help whoever is guessing.
        raise KeyFileError(f"{name} does not open with the configured passphrase") from exc
    prefix = kind.encode() + b"\x00"
    if not plain.startswith(prefix) or len(plain) != len(prefix) + SECRET_BYTES:
        raise KeyFileError(f"{name} is not a {kind} key file")
    return bytes(plain[len(prefix) :])


def read_key_file(
    path: Path, *, kind: str, passphrase: bytes | None
) -> tuple[bytes, dict[str, Any]]:
    if not path.exists():
        raise KeyFileError(f"{path} does not exist; run `entraide init` first")
    check_private_mode(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path} cannot be read: {exc.strerror}") from exc
    return decode_key_file(data, kind=kind, passphrase=passphrase, name=str(path))


def read_passphrase(value: str | None, file: Path | None) -> bytes | None:
    """The passphrase from ENTRAIDE_KEY_PASSPHRASE, or the first line of its file."""
    if value is not None and file is not None:
        raise KeyFileError("set ENTRAIDE_KEY_PASSPHRASE or ENTRAIDE_KEY_PASSPHRASE_FILE, not both")
    if file is not None:
        if not file.exists():
            raise KeyFileError(f"the passphrase file {file} does not exist")
        check_private_mode(file)
        lines = file.read_bytes().splitlines()
        try:
            value = lines[0].decode("utf-8") if lines else ""
        except UnicodeDecodeError as exc:
            raise KeyFileError(f"the passphrase file {file} is not UTF-8 text") from exc
    if value is None:
        return None
    if not value:
        raise KeyFileError("the key passphrase is empty")
    return value.encode()


def stored_plain(path: Path) -> bool:
    """Is this key file of the plain form (version 1), its secret readable by whoever reads
    the file? False for a protected one, or one that cannot be read as a key file at all."""
    try:
        document = json.loads(path.read_bytes()[:MAX_KEY_FILE_BYTES])
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("v") == 1

"""Private keys in a backup: sealed under a passphrase (Argon2id, then XSalsa20-Poly1305).

The passphrase comes from a file (`--passphrase-file`, readable only by its owner) or from
ENTRAIDE_BACKUP_PASSPHRASE; never from the command line, where `ps` and shell histories
would show it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.pwhash import argon2id
from nacl.secret import SecretBox
from nacl.utils import random

from app.crypto.encoding import b64d, b64e

PASSPHRASE_ENV = "ENTRAIDE_BACKUP_PASSPHRASE"  # noqa: S105  # a variable name, not a secret
MIN_PASSPHRASE_CHARS = 12
KDF = "argon2id13"
# libsodium's "moderate" profile: 256 MiB and 3 passes, about half a second. A backup is
# made and opened rarely, and it is the copy most likely to be stolen.
OPSLIMIT = argon2id.OPSLIMIT_MODERATE
MEMLIMIT = argon2id.MEMLIMIT_MODERATE


class PassphraseError(ValueError):
    """No passphrase, a weak one, or the wrong one."""


def read_passphrase(path: Path | None, *, choosing: bool = True) -> bytes | None:
    """The passphrase from `path`, or else from the environment. `choosing`: one that
    seals a new backup, held to the minimum length; to open one (restore), any length: a
    short one is then simply the wrong one, and told so when it does not open the keys (it
    was told "must have at least 12 characters", advice on choosing one; from an operator's
    walkthrough)."""
    if path is not None:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PassphraseError(f"{path} is readable by group or others; run: chmod 600 {path}")
        text = path.read_text().rstrip("\r\n")
    else:
        text = os.environ.get(PASSPHRASE_ENV, "")
        if not text:
            return None
    if choosing and len(text) < MIN_PASSPHRASE_CHARS:
        raise PassphraseError(
            f"the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters"
        )
    return text.encode()


def _box(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> SecretBox:
    key = argon2id.kdf(SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit)
    return SecretBox(key)


def seal(data: bytes, passphrase: bytes) -> tuple[bytes, dict[str, Any]]:
    salt = random(argon2id.SALTBYTES)
    sealed = bytes(_box(passphrase, salt, OPSLIMIT, MEMLIMIT).encrypt(data))
    return sealed, {"kdf": KDF, "opslimit": OPSLIMIT, "memlimit": MEMLIMIT, "salt": b64e(salt)}


def unseal(sealed: bytes, passphrase: bytes, params: dict[str, Any]) -> bytes:
    opslimit, memlimit = params.get("opslimit"), params.get("memlimit")
    if (
        params.get("kdf") != KDF
        or not isinstance(opslimit, int)
        or not isinstance(memlimit, int)
        or not argon2id.OPSLIMIT_MIN <= opslimit <= argon2id.OPSLIMIT_SENSITIVE
        or not argon2id.MEMLIMIT_MIN <= memlimit <= argon2id.MEMLIMIT_SENSITIVE
    ):
        raise PassphraseError("the backup's key-derivation parameters are not supported")
    salt = b64d(params.get("salt"), length=argon2id.SALTBYTES)
    try:
        return bytes(_box(passphrase, salt, opslimit, memlimit).decrypt(sealed))
    except CryptoError as exc:
        raise PassphraseError(
            "the passphrase does not open the backup's private keys (or they were altered)"
        ) from exc

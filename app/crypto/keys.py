"""Node key material: generation, files on disk, key ids and fingerprints.

A node holds three independent key pairs (DESIGN.md section 4): an Ed25519 signing key
(envelopes, receipts, identity documents), an X25519 encryption key (content-key wraps) and
an Ed25519 audit-log key (checkpoints). Separate keys keep a compromise or a rotation of one
purpose from touching the others.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.crypto.encoding import DecodeError, b64d, b64e, format_time, sha256, utc_now

KEY_FILES = {"signing": "signing.key", "encryption": "encryption.key", "log": "log.key"}
IDENTITY_FILE = "node.json"


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed or too widely readable."""


def key_id(public_key: bytes) -> str:
    """First 16 bytes of SHA-256 of the raw public key, lower-case hex."""
    return sha256(public_key)[:16].hex()


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
class NodeKeys:
    signing: SigningKey
    encryption: PrivateKey
    log: SigningKey

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
        return self.encryption if hmac.compare_digest(kid, self.encryption_kid) else None

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(SigningKey.generate(), PrivateKey.generate(), SigningKey.generate())


def _write_private(path: Path, content: bytes) -> None:
    # O_EXCL: never overwrite an existing key; 0600 from creation, so there is no window in
    # which the file is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)


def _check_private_mode(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )


def keys_exist(keys_dir: Path) -> bool:
    return any((keys_dir / name).exists() for name in KEY_FILES.values())


def save_keys(keys_dir: Path, keys: NodeKeys) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = format_time(utc_now())
    secrets = {
        "signing": bytes(keys.signing),
        "encryption": bytes(keys.encryption),
        "log": bytes(keys.log),
    }
    for kind, secret in secrets.items():
        document = {"v": 1, "kind": kind, "created_at": created, "secret": b64e(secret)}
        _write_private(keys_dir / KEY_FILES[kind], json.dumps(document, indent=1).encode())


def _read_secret(path: Path, kind: str) -> bytes:
    if not path.exists():
        raise KeyFileError(f"{path} does not exist; run `entraide init` first")
    _check_private_mode(path)
    try:
        document = json.loads(path.read_bytes())
        if document.get("v") != 1 or document.get("kind") != kind:
            raise KeyFileError(f"{path} is not a version 1 {kind} key file")
        return b64d(document.get("secret"), length=32)
    except (ValueError, DecodeError, AttributeError) as exc:
        raise KeyFileError(f"{path} is not a valid key file") from exc


def load_keys(keys_dir: Path) -> NodeKeys:
    return NodeKeys(
        signing=SigningKey(_read_secret(keys_dir / KEY_FILES["signing"], "signing")),
        encryption=PrivateKey(_read_secret(keys_dir / KEY_FILES["encryption"], "encryption")),
        log=SigningKey(_read_secret(keys_dir / KEY_FILES["log"], "log")),
    )


def save_identity(keys_dir: Path, identity: NodeIdentity) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    document = {
        "authority_id": identity.authority_id,
        "name": identity.name,
        "public_url": identity.public_url,
    }
    (keys_dir / IDENTITY_FILE).write_text(json.dumps(document, indent=1) + "\n")


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

"""Witness cosignatures (https://c2sp.org/tlog-cosignature, `cosignature/v1`, Ed25519):
making one, and checking the ones a cosigned checkpoint carries.

A witness (a peer, app/audit/witness.py) cosigns a checkpoint it found consistent with
everything it saw of that log before. An auditor holding a checkpoint cosigned by a witness it
trusts knows that the witness saw the same history: `entraide audit verify --cosigned`.

Key string, as for the Go implementations (golang.org/x/mod/sumdb/note's format, key type
0x04)::

    <name>+<key ID, 8 hex digits>+base64(0x04 || 32-byte Ed25519 public key)

The signed message starts with the line `cosignature/v1`, which no checkpoint starts with
(ours start with `entraide.log/...`), so a cosignature can never pass for a log signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from app.audit.note import SIGNATURE_PREFIX, MalformedKey, NoteError, split_key, split_note

COSIGNATURE_HEADER = "cosignature/v1\n"
ALG_COSIGNATURE_V1 = 0x04
_BLOB_SIZE = 4 + 8 + 64  # key ID, big-endian seconds since the epoch, Ed25519 signature


class NoCosignature(NoteError):
    """The note carries no cosignature by any of the witness keys given."""


class BadCosignature(NoteError):
    """A cosignature by a witness key given does not verify."""


def witness_name(authority_id: str) -> str:
    return f"entraide.witness/{authority_id}"


def cosigner_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x04 || public key)[:4]."""
    type_byte = bytes([ALG_COSIGNATURE_V1])
    return hashlib.sha256(name.encode() + b"\n" + type_byte + public_key).digest()[:4]


def _message(checkpoint_text: str, timestamp: int) -> bytes:
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{checkpoint_text}".encode()


def cosign(checkpoint_text: str, *, name: str, key: SigningKey, timestamp: int) -> str:
    """One signature line, `— name base64(key id || u64 timestamp || Ed25519 signature)`."""
    signature = key.sign(_message(checkpoint_text, timestamp)).signature
    blob = cosigner_key_id(name, bytes(key.verify_key)) + timestamp.to_bytes(8, "big") + signature
    return f"{SIGNATURE_PREFIX}{name} {base64.b64encode(blob).decode()}\n"


def verify_cosignature(checkpoint_text: str, line: str, *, name: str, public_key: bytes) -> bool:
    prefix = f"{SIGNATURE_PREFIX}{name} "
    if not line.startswith(prefix):
        return False
    try:
        blob = base64.b64decode(line[len(prefix) :].strip(), validate=True)
    except ValueError:
        return False
    if len(blob) != _BLOB_SIZE or blob[:4] != cosigner_key_id(name, public_key):
        return False
    return _signed(checkpoint_text, blob, public_key)


def _signed(checkpoint_text: str, blob: bytes, public_key: bytes) -> bool:
    timestamp = int.from_bytes(blob[4:12], "big")
    try:
        VerifyKey(public_key).verify(_message(checkpoint_text, timestamp), blob[12:])
    except BadSignatureError:
        return False
    return True


@dataclass(frozen=True)
class Cosigner:
    """A witness key an auditor trusts: its name (`entraide.witness/<authority>`) and key."""

    name: str
    public_key: bytes

    @property
    def key_id(self) -> bytes:
        return cosigner_key_id(self.name, self.public_key)


def format_cosigner_key(name: str, verify_key: VerifyKey) -> str:
    public_key = bytes(verify_key)
    key_b64 = base64.b64encode(bytes([ALG_COSIGNATURE_V1]) + public_key).decode()
    return f"{name}+{cosigner_key_id(name, public_key).hex()}+{key_b64}"


def parse_cosigner_key(vkey: str) -> Cosigner:
    parts = vkey.strip().split("+", 2)  # the base64 part may itself hold a '+'
    if len(parts) != 3:
        raise MalformedKey("a witness key is name+keyid+key")
    name, claimed_id, public_key = split_key(parts, "witness key", ALG_COSIGNATURE_V1)
    cosigner = Cosigner(name, public_key)
    if cosigner.key_id != claimed_id:
        raise MalformedKey("the witness key's ID does not match its name and public key")
    return cosigner


class LogKeyAsWitness(NoteError):
    """A witness key given is the log's own key."""


def refuse_the_log_key(cosigners: Iterable[Cosigner], log_public: bytes) -> None:
    """A witness's cosignature is worth something because another party holds the key: one
    by the log's own key is the log's operator vouching for itself (the `cosignature/v1`
    line keeps it from passing for the log's signature, not for a witness's)."""
    for cosigner in cosigners:
        if hmac.compare_digest(cosigner.public_key, log_public):
            raise LogKeyAsWitness(
                f"the witness key {cosigner.name} is this log's own key: its cosignatures are "
                "the log's operator vouching for itself, not a witness; give the key of "
                "another node's witness (`entraide keys show` on that node)"
            )


@dataclass(frozen=True)
class Cosigned:
    """A verified cosignature: who cosigned, and when it says it did."""

    name: str
    time: datetime


def check_cosignatures(note: str, cosigners: Iterable[Cosigner]) -> list[Cosigned]:
    """The cosignatures `note` carries by the keys in `cosigners`, each verified.

    Lines by other keys are ignored (the log's own signature, witnesses not asked about);
    one by a given key that does not verify fails the whole note, as in `open_note`.
    Raises `NoCosignature` when no given key cosigned it."""
    trusted = {(cosigner.name, cosigner.key_id): cosigner for cosigner in cosigners}
    text, signatures = split_note(note)
    found: list[Cosigned] = []
    for name, signer_id, rest in signatures:
        cosigner = trusted.get((name, signer_id))
        if cosigner is None:
            continue
        blob = signer_id + rest
        if len(blob) != _BLOB_SIZE or not _signed(text, blob, cosigner.public_key):
            raise BadCosignature(f"the cosignature by {name} does not verify")
        seconds = int.from_bytes(blob[4:12], "big")
        try:
            when = datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:  # signed, but no date a clock shows
            raise BadCosignature(f"the cosignature by {name} bears no valid time") from exc
        found.append(Cosigned(name, when))
    if not found:
        raise NoCosignature("the note carries no cosignature by the witness keys given")
    return found

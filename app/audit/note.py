"""Signed notes (https://c2sp.org/signed-note) and tlog checkpoints
(https://c2sp.org/tlog-checkpoint), Ed25519 only, compatible with golang.org/x/mod/sumdb/note.

Key strings::

    verifier key   <name>+<key ID, 8 hex digits>+base64(0x01 || 32-byte public key)
    signer key     PRIVATE+KEY+<name>+<key ID>+base64(0x01 || 32-byte seed)

Exceptions, all raised for input we refuse and never for our own bugs::

    NoteError
    ├── MalformedKey          a key string or key name that does not parse, or whose key ID
    │                         does not belong to its name and public key
    ├── MalformedNote         a note that breaks the signed-note syntax or exceeds our limits
    ├── UnknownKey            a well-formed note with no signature by any trusted key
    ├── BadSignature          a signature by a trusted key that does not verify
    └── MalformedCheckpoint   note text that is not a strict tlog-checkpoint body
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from app.audit.merkle import HASH_SIZE

ALG_ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "  # EM DASH, SPACE
# The spec asks verifiers to accept at least 16 signatures; Go's sumdb/note stops at 100. The
# byte limit bounds the work a peer can make us do; a checkpoint note is a few hundred bytes.
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 64 * 1024

_PUBLIC_KEY_SIZE = 32
_SIGNATURE_SIZE = 64
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")
_TREE_SIZE = re.compile(r"0|[1-9][0-9]*")
_MAX_TREE_SIZE = 2**64 - 1  # sizes are uint64 in every other implementation
# Every ASCII control character but newline; the spec forbids them anywhere in a note.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


class NoteError(Exception):
    """Base of everything this module refuses."""


class MalformedKey(NoteError):
    pass


class MalformedNote(NoteError):
    pass


class UnknownKey(NoteError):
    """No signature on the note is by a key the caller trusts."""


class BadSignature(NoteError):
    """A signature by a trusted key does not verify: the note is refused as a whole."""


class MalformedCheckpoint(NoteError):
    pass


# --- keys ----------------------------------------------------------------------------------------


def key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x01 || public key)[:4]; Go's sumdb/note calls it the key hash."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def _is_valid_name(name: str) -> bool:
    # Non-empty, no Unicode spaces, no '+'; control characters could never appear in a note.
    return (
        bool(name)
        and "+" not in name
        and not any(c.isspace() for c in name)
        and not _CONTROL.search(name)
        and _is_utf8(name)
    )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _b64decode_strict(text: str) -> bytes:
    """Standard padded base64, accepting only the one canonical spelling of each byte string."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise ValueError("not base64") from exc
    if base64.b64encode(raw).decode() != text:
        raise ValueError("not canonical base64")
    return raw


@dataclass(frozen=True)
class Verifier:
    """A trusted Ed25519 note key: a key name and a 32-byte public key."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        if not _is_valid_name(self.name):
            raise MalformedKey(f"invalid key name {self.name!r}")
        if len(self.public_key) != _PUBLIC_KEY_SIZE:
            raise MalformedKey("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def verify(self, text: bytes, signature: bytes) -> bool:
        if len(signature) != _SIGNATURE_SIZE:
            return False
        try:
            VerifyKey(self.public_key).verify(text, signature)
        except BadSignatureError:
            return False
        return True


def split_key(
    parts: list[str], what: str, algorithm: int = ALG_ED25519
) -> tuple[str, bytes, bytes]:
    """``[name, key ID hex, base64 key]`` -> (name, key ID, Ed25519 key bytes); `algorithm`
    is the key's type byte (0x01 for a note signer, 0x04 for a tlog cosigner)."""
    name, id_hex, key_b64 = parts
    if not _is_valid_name(name):
        raise MalformedKey(f"invalid key name in {what}")
    if not _KEY_ID_HEX.fullmatch(id_hex):
        raise MalformedKey(f"key ID in {what} is not 8 lowercase hex digits")
    try:
        raw = _b64decode_strict(key_b64)
    except ValueError as exc:
        raise MalformedKey(f"key in {what} is not canonical base64") from exc
    if len(raw) != 1 + _PUBLIC_KEY_SIZE or raw[0] != algorithm:
        raise MalformedKey(f"{what} is not an Ed25519 key")
    return name, bytes.fromhex(id_hex), raw[1:]


def parse_verifier_key(vkey: str) -> Verifier:
    # The base64 part may itself contain '+', so split only twice.
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise MalformedKey("a verifier key is name+keyid+key")
    name, claimed_id, public_key = split_key(parts, "verifier key")
    verifier = Verifier(name, public_key)
    if verifier.key_id != claimed_id:
        raise MalformedKey("verifier key ID does not match its name and public key")
    return verifier


def format_verifier_key(name: str, verify_key: VerifyKey) -> str:
    verifier = Verifier(name, bytes(verify_key))
    key_b64 = base64.b64encode(bytes([ALG_ED25519]) + verifier.public_key).decode()
    return f"{name}+{verifier.key_id.hex()}+{key_b64}"


def parse_signer_key(skey: str) -> tuple[str, SigningKey]:
    parts = skey.split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise MalformedKey("a signer key is PRIVATE+KEY+name+keyid+key")
    name, claimed_id, seed = split_key(parts[2:], "signer key")
    signing_key = SigningKey(seed)
    # The ID commits to the public key, so it can only be checked after deriving it.
    if key_id(name, bytes(signing_key.verify_key)) != claimed_id:
        raise MalformedKey("signer key ID does not match its name and public key")
    return name, signing_key


def format_signer_key(name: str, signing_key: SigningKey) -> str:
    if not _is_valid_name(name):
        raise MalformedKey(f"invalid key name {name!r}")
    id_hex = key_id(name, bytes(signing_key.verify_key)).hex()
    seed_b64 = base64.b64encode(bytes([ALG_ED25519]) + bytes(signing_key)).decode()
    return f"PRIVATE+KEY+{name}+{id_hex}+{seed_b64}"


# --- notes ---------------------------------------------------------------------------------------


def sign_note(text: str, name: str, signing_key: SigningKey) -> str:
    if not text.endswith("\n"):
        raise MalformedNote("note text must end with a newline")
    if not _is_utf8(text) or _CONTROL.search(text):
        raise MalformedNote("note text must be UTF-8 without control characters")
    if not _is_valid_name(name):
        raise MalformedKey(f"invalid key name {name!r}")
    signature = signing_key.sign(text.encode()).signature
    blob = key_id(name, bytes(signing_key.verify_key)) + signature
    note = f"{text}\n{SIGNATURE_PREFIX}{name} {base64.b64encode(blob).decode()}\n"
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise MalformedNote("note is too long for open_note to accept")
    return note


def open_note(note: str | bytes, verifiers: Iterable[Verifier]) -> tuple[str, list[str]]:
    """Check a note's signatures; return its text and the names of the trusted keys that signed.

    Signatures by keys not in ``verifiers`` are ignored, as the spec requires (other witnesses,
    rotated keys). Raises :class:`UnknownKey` if no trusted key signed, and
    :class:`BadSignature` if any trusted key's signature fails, even when another one verifies.
    """
    trusted = _index_verifiers(verifiers)
    text, signatures = split_note(note)
    raw_text = text.encode()
    signers: list[str] = []
    for name, sig_key_id, signature in signatures:
        verifier = trusted.get((name, sig_key_id))
        if verifier is None:
            continue
        if not verifier.verify(raw_text, signature):
            raise BadSignature(f"signature by {name}+{sig_key_id.hex()} does not verify")
        if name not in signers:
            signers.append(name)
    if not signers:
        raise UnknownKey("the note has no signature by a trusted key")
    return text, signers


def signed_only_by(note: str, verifier: Verifier) -> str:
    """The note with one signature line of `verifier`'s key, the others dropped (a note
    `open_note` accepted with that key: it has one).

    A witness keeps and cosigns a peer's note in this form: a note may carry up to
    MAX_SIGNATURES lines, and one with them all plus our cosignature would be read by no
    one (from review: 99 junk lines made every cosignature of ours on it unverifiable)."""
    text, signatures = split_note(note)
    kept = next(
        (
            f"{SIGNATURE_PREFIX}{name} {base64.b64encode(key_hash + signature).decode()}\n"
            for name, key_hash, signature in signatures
            if (name, key_hash) == (verifier.name, verifier.key_id)
        ),
        None,
    )  # the first: the same line a hundred times was a hundred lines (from review)
    if kept is None:
        raise UnknownKey("the note has no signature by the key")
    return f"{text}\n{kept}"


def split_note(note: str | bytes) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """A note's text and its signature lines as (name, key ID, the rest of the blob), none
    of them checked: `open_note` checks the signers', a cosignature's reader its own."""
    msg = _decode_note(note)
    split = msg.rfind("\n\n")
    if split < 0:
        raise MalformedNote("no blank line before the signatures")
    text, block = msg[: split + 1], msg[split + 2 :]
    if not block.endswith("\n"):
        raise MalformedNote("a note ends with a signature line and a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"more than {MAX_SIGNATURES} signatures")
    return text, [_parse_signature_line(line) for line in lines]


def _index_verifiers(verifiers: Iterable[Verifier]) -> dict[tuple[str, bytes], Verifier]:
    trusted: dict[tuple[str, bytes], Verifier] = {}
    for verifier in verifiers:
        known = trusted.setdefault((verifier.name, verifier.key_id), verifier)
        if known != verifier:
            # Two different keys answering to one name and ID: a configuration error, not input.
            raise ValueError(f"ambiguous verifiers for {verifier.name}+{verifier.key_id.hex()}")
    return trusted


def _decode_note(note: str | bytes) -> str:
    if not isinstance(note, str | bytes):
        raise MalformedNote("a note is text")
    try:
        raw = note.encode() if isinstance(note, str) else note
        if len(raw) > MAX_NOTE_BYTES:
            raise MalformedNote(f"note is longer than {MAX_NOTE_BYTES} bytes")
        msg = raw.decode()
    except UnicodeError as exc:  # lone surrogates in a str, invalid UTF-8 in bytes
        raise MalformedNote("note is not valid UTF-8") from exc
    if _CONTROL.search(msg):
        raise MalformedNote("note contains a control character")
    return msg


def _parse_signature_line(line: str) -> tuple[str, bytes, bytes]:
    """``— name base64(key ID || signature)`` -> (name, key ID, signature)."""
    if not line.startswith(SIGNATURE_PREFIX):
        raise MalformedNote("signature lines start with an em dash and a space")
    name, space, sig_b64 = line[len(SIGNATURE_PREFIX) :].partition(" ")
    if not space or not _is_valid_name(name):
        raise MalformedNote("malformed signature line")
    try:
        blob = _b64decode_strict(sig_b64)
    except ValueError as exc:
        raise MalformedNote("signature is not canonical base64") from exc
    if len(blob) < 5:
        raise MalformedNote("signature is shorter than a key ID and one byte")
    return name, blob[:4], blob[4:]


# --- checkpoints ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint note body; constructing one validates it, so a bad one cannot exist."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for line in (self.origin, *self.extensions):
            if not line or "\n" in line or _CONTROL.search(line) or not _is_utf8(line):
                raise MalformedCheckpoint(f"invalid checkpoint line {line!r}")
        if isinstance(self.size, bool) or not 0 <= self.size <= _MAX_TREE_SIZE:
            raise MalformedCheckpoint(f"invalid tree size {self.size!r}")
        if len(self.root_hash) != HASH_SIZE:
            raise MalformedCheckpoint("the root hash is 32 bytes")

    def format(self) -> str:
        root_b64 = base64.b64encode(self.root_hash).decode()
        return "".join(
            f"{line}\n" for line in (self.origin, str(self.size), root_b64, *self.extensions)
        )

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        if not text.endswith("\n"):
            raise MalformedCheckpoint("checkpoint text ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedCheckpoint("a checkpoint has an origin, a size and a root hash")
        origin, size, root_b64, *extensions = lines
        if not _TREE_SIZE.fullmatch(size):
            raise MalformedCheckpoint("tree size is not a decimal without leading zeros")
        # Before int(): Python refuses to convert more than 4,300 digits (a ValueError, not
        # a NoteError: from review, a damaged stored note stopped every witnessing round).
        if len(size) > len(str(_MAX_TREE_SIZE)):
            raise MalformedCheckpoint(f"tree size is past {_MAX_TREE_SIZE}")
        try:
            root_hash = _b64decode_strict(root_b64)
        except ValueError as exc:
            raise MalformedCheckpoint("root hash is not canonical base64") from exc
        return cls(origin, int(size), root_hash, tuple(extensions))

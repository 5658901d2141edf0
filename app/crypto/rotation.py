"""Key rotation statements: the old signing key vouches for the new keys (docs/protocol.md §5.4).

A statement is canonical JSON signed by the **old** signing key, with its own domain:

    {"v": 1, "type": "entraide.key-rotation", "authority_id", "seq", "rotated_at",
     "old": {"signing": K, "encryption": K}, "new": {"signing": K, "encryption": K},
     "old_encryption_accepted_until"}

The identity document lists every statement the node ever made, oldest first, in
`rotations`. Statement n+1 is signed by the key statement n introduced, and the document
itself is self-signed by the last one, so a peer that pinned any earlier signing key can walk
from its pin to the current keys; a chain that does not start at the pinned key, or one link
not signed by the key before it, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.crypto.encoding import (
    DecodeError,
    b64d,
    b64e,
    canonical_json,
    format_time,
    is_int,
    key_id,
    load_canonical_object,
    parse_time,
)
from app.crypto.signing import DOMAIN_ROTATION, sign, verify

ROTATION_TYPE = "entraide.key-rotation"
ROTATION_FIELDS = {
    "v",
    "type",
    "authority_id",
    "seq",
    "rotated_at",
    "old",
    "new",
    "old_encryption_accepted_until",
}
MAX_ROTATIONS = 32
MAX_STATEMENT_BYTES = 2048


class RotationError(ValueError):
    """A rotation statement or chain that is malformed or not signed by the key before it."""


@dataclass(frozen=True)
class KeyPair:
    """The public signing and encryption keys of one generation."""

    signing: bytes
    encryption: bytes

    @property
    def signing_kid(self) -> str:
        return key_id(self.signing)

    @property
    def encryption_kid(self) -> str:
        return key_id(self.encryption)

    def to_json(self) -> dict[str, Any]:
        return {
            "signing": {"kid": self.signing_kid, "public_key": b64e(self.signing)},
            "encryption": {"kid": self.encryption_kid, "public_key": b64e(self.encryption)},
        }


@dataclass(frozen=True)
class Rotation:
    authority_id: str
    seq: int
    rotated_at: datetime
    old: KeyPair
    new: KeyPair
    old_encryption_accepted_until: datetime
    statement: bytes
    signature: bytes

    def to_wire(self) -> dict[str, str]:
        return {"statement": b64e(self.statement), "signature": b64e(self.signature)}


def make_rotation(
    *,
    authority_id: str,
    seq: int,
    old_signing: SigningKey,
    old_encryption: PrivateKey,
    new_signing: SigningKey,
    new_encryption: PrivateKey,
    rotated_at: datetime,
    accepted_until: datetime,
) -> Rotation:
    old = KeyPair(bytes(old_signing.verify_key), bytes(old_encryption.public_key))
    new = KeyPair(bytes(new_signing.verify_key), bytes(new_encryption.public_key))
    statement = canonical_json(
        {
            "v": 1,
            "type": ROTATION_TYPE,
            "authority_id": authority_id,
            "seq": seq,
            "rotated_at": format_time(rotated_at),
            "old": old.to_json(),
            "new": new.to_json(),
            "old_encryption_accepted_until": format_time(accepted_until),
        }
    )
    signature = sign(old_signing, DOMAIN_ROTATION, statement)
    return parse_rotation({"statement": b64e(statement), "signature": b64e(signature)})


def _key(generation: object, purpose: str) -> bytes:
    if not isinstance(generation, dict) or set(generation) != {"signing", "encryption"}:
        raise RotationError("a rotation's old and new are exactly {signing, encryption}")
    entry = generation[purpose]
    if not isinstance(entry, dict) or set(entry) != {"kid", "public_key"}:
        raise RotationError(f"a rotation's {purpose} key is malformed")
    public_key = b64d(entry["public_key"], length=32)
    if entry["kid"] != key_id(public_key):
        raise RotationError(f"a rotation's {purpose} key id does not match its key")
    return public_key


def parse_rotation(wire: object) -> Rotation:
    """Shape, and the signature by the statement's own `old.signing` key."""
    if not isinstance(wire, dict) or set(wire) != {"statement", "signature"}:
        raise RotationError("a rotation is an object with exactly 'statement' and 'signature'")
    try:
        statement = b64d(wire["statement"])
        signature = b64d(wire["signature"], length=64)
        if len(statement) > MAX_STATEMENT_BYTES:
            raise RotationError("rotation statement too large")
        body = load_canonical_object(statement)
        if set(body) != ROTATION_FIELDS or not is_int(body["v"]) or body["v"] != 1:
            raise RotationError("not a version 1 key rotation statement")
        if body["type"] != ROTATION_TYPE or not isinstance(body["authority_id"], str):
            raise RotationError("not a version 1 key rotation statement")
        seq = body["seq"]
        if not is_int(seq) or not 1 <= seq <= MAX_ROTATIONS:
            raise RotationError("a rotation's seq is invalid")
        old = KeyPair(_key(body["old"], "signing"), _key(body["old"], "encryption"))
        new = KeyPair(_key(body["new"], "signing"), _key(body["new"], "encryption"))
        if not verify(old.signing, DOMAIN_ROTATION, statement, signature):
            raise RotationError("a rotation statement is not signed by the key it replaces")
        return Rotation(
            authority_id=body["authority_id"],
            seq=seq,
            rotated_at=parse_time(body["rotated_at"]),
            old=old,
            new=new,
            old_encryption_accepted_until=parse_time(body["old_encryption_accepted_until"]),
            statement=statement,
            signature=signature,
        )
    except DecodeError as exc:
        raise RotationError(f"malformed rotation statement: {exc}") from exc


def parse_chain(
    wire: object, *, authority_id: str, current_signing: bytes, current_encryption: bytes
) -> tuple[Rotation, ...]:
    """A document's `rotations`: each link signed by the key the link before introduced, the
    last one introducing the document's own keys."""
    if not isinstance(wire, list) or not 1 <= len(wire) <= MAX_ROTATIONS:
        raise RotationError(f"rotations must be a list of 1 to {MAX_ROTATIONS} statements")
    chain = tuple(parse_rotation(item) for item in wire)
    for position, link in enumerate(chain):
        if link.authority_id != authority_id or link.seq != position + 1:
            raise RotationError("a rotation names another authority or is out of sequence")
        if position and link.old != chain[position - 1].new:
            raise RotationError("a rotation does not start from the keys the one before set")
    last = chain[-1].new
    if last.signing != current_signing or last.encryption != current_encryption:
        raise RotationError("the last rotation does not introduce the document's own keys")
    return chain


def path_from(chain: Sequence[Rotation], pinned_signing: bytes) -> list[Rotation] | None:
    """The links from a pinned signing key to the current keys, or None if the chain never
    passes through the pin (a document that is not a rotation of what we pinned)."""
    for position, link in enumerate(chain):
        if link.old.signing == pinned_signing:
            return list(chain[position:])
    return None


# How far back of what it follows a link may be dated: a node dates a rotation by its clock
# when it makes it, after the document we pinned its old key from was issued and after the
# link before it. A day is far more than any correct node's clock is corrected by meanwhile.
ROTATION_TIME_MARGIN = timedelta(hours=24)


# No node made keys, issued an identity document or rotated before this: a date earlier is
# false (and a year 1 ended the keys it replaced before they were made).
EARLIEST_KEY_DATE = datetime(2000, 1, 1, tzinfo=UTC)


def check_path_times(
    path: Sequence[Rotation], *, now: datetime, skew: timedelta, since: datetime | None = None
) -> None:
    """Each link of a path about to be followed was made by now, within the clock skew: a
    node dates a rotation when it makes it (`entraide keys rotate`), and each link's
    `rotated_at` is stored as the end of the replaced keys' validity. A later one is false
    (and a year 9999 read back in a time zone east of UTC is past what the driver reads).
    Nor is a link dated more than a day before what it follows: `since`, when the identity
    document the pinned key was taken from was issued (that key was current then), or the
    link before it (a year 1 would end the replaced keys before they were made)."""
    # The margin is added to the link's date, never taken from the other: a date of year 1
    # minus a day is no date (OverflowError, a 500 instead of a refusal; from review). A
    # link reaching the sums is dated no later than the clock allows, so they cannot overflow.
    previous: Rotation | None = None
    for link in path:
        if link.rotated_at < EARLIEST_KEY_DATE:
            raise RotationError(
                f"rotation {link.seq} is dated {format_time(link.rotated_at)}, earlier than "
                f"any node made keys ({format_time(EARLIEST_KEY_DATE)})"
            )
        if link.rotated_at > now + skew:
            raise RotationError(
                f"rotation {link.seq} is dated {format_time(link.rotated_at)}, later than "
                "this node's clock allows (the clock skew tolerated between nodes)"
            )
        if previous is not None and link.rotated_at + ROTATION_TIME_MARGIN < previous.rotated_at:
            raise RotationError(
                f"rotation {link.seq} is dated {format_time(link.rotated_at)}, more than a day "
                f"before rotation {previous.seq} ({format_time(previous.rotated_at)}), which "
                "introduced the keys it replaces"
            )
        if (
            previous is None
            and since is not None
            and link.rotated_at + ROTATION_TIME_MARGIN < since
        ):
            raise RotationError(
                f"rotation {link.seq} is dated {format_time(link.rotated_at)}, more than a day "
                "before the identity document pinned with the keys it replaces was issued "
                f"({format_time(since)})"
            )
        previous = link

"""The node identity document served at /.well-known/entraide/node.

It binds an authority id, a name and a public URL to the node's three public keys, and is
self-signed with the signing key. Peers pin the SHA-256 fingerprint of that signing key,
read to them out of band, so a forged document (other keys) never matches the pin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app.config import AUTHORITY_ID_PATTERN
from app.crypto.encoding import (
    DecodeError,
    b64d,
    b64e,
    canonical_json,
    format_time,
    is_int,
    load_canonical_object,
    parse_time,
)
from app.crypto.keys import NodeIdentity, NodeKeys, fingerprint, key_id
from app.crypto.rotation import (
    EARLIEST_KEY_DATE,
    Rotation,
    RotationError,
    parse_chain,
    path_from,
)
from app.crypto.signing import DOMAIN_IDENTITY, sign, verify
from app.oneline import is_one_line

IDENTITY_TYPE = "entraide.node-identity"
# Room for the full rotation chain (at most 32 statements of under 1 KiB each, base64).
MAX_IDENTITY_BYTES = 64 * 1024


class IdentityError(ValueError):
    """An identity document that is malformed or whose signature does not verify."""


@dataclass(frozen=True)
class PublishedKey:
    kid: str
    public_key: bytes


@dataclass(frozen=True)
class PeerIdentity:
    authority_id: str
    name: str
    public_url: str
    issued_at: datetime
    signing: PublishedKey
    encryption: PublishedKey
    log: PublishedKey
    document: bytes
    signature: bytes
    rotations: tuple[Rotation, ...] = ()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signing.public_key)

    def rotation_path(self, pinned_signing: bytes) -> list[Rotation] | None:
        """The signed links from a pinned signing key to this document's keys: [] if the pin
        is the current key, None if this document is no rotation of the pinned one."""
        if pinned_signing == self.signing.public_key:
            return []
        return path_from(self.rotations, pinned_signing)


def build_identity_document(
    identity: NodeIdentity, keys: NodeKeys, *, issued_at: datetime
) -> dict[str, str]:
    body: dict[str, Any] = {
        "v": 1,
        "type": IDENTITY_TYPE,
        "authority_id": identity.authority_id,
        "name": identity.name,
        "public_url": identity.public_url,
        "issued_at": format_time(issued_at),
        "keys": {
            "signing": {"kid": keys.signing_kid, "public_key": b64e(keys.signing_public)},
            "encryption": {
                "kid": keys.encryption_kid,
                "public_key": b64e(keys.encryption_public),
            },
            "log": {"kid": keys.log_kid, "public_key": b64e(keys.log_public)},
        },
    }
    if keys.rotations:
        # Only after a rotation: a node that never rotated publishes the original v1 bytes.
        body["rotations"] = [rotation.to_wire() for rotation in keys.rotations]
    document = canonical_json(body)
    return {
        "document": b64e(document),
        "signature": b64e(sign(keys.signing, DOMAIN_IDENTITY, document)),
    }


MAX_NAME_CHARS = 200
MAX_URL_CHARS = 500


def _published_key(keys: dict[str, Any], purpose: str) -> PublishedKey:
    entry = keys.get(purpose)
    if not isinstance(entry, dict):
        raise IdentityError(f"identity document has no {purpose} key")
    public_key = b64d(entry.get("public_key"), length=32)
    kid = entry.get("kid")
    if kid != key_id(public_key):
        raise IdentityError(f"{purpose} key id does not match its public key")
    return PublishedKey(kid=kid, public_key=public_key)


def issued_at_of(
    document: bytes, *, now: datetime | None = None, skew: timedelta = timedelta()
) -> datetime | None:
    """When a stored (already verified) identity document says it was issued; with `now`,
    None for a date later than `now` and `skew` allow (pinned before `check_issued_at`)."""
    try:
        issued = parse_time(load_canonical_object(document).get("issued_at"))
    except DecodeError:
        return None
    return None if now is not None and issued > now + skew else issued


# No node issued a document before this protocol existed: an earlier date is a clock gone
# wrong or a forgery.
EARLIEST_ISSUED_AT = EARLIEST_KEY_DATE


def check_issued_at(identity: PeerIdentity, *, now: datetime, skew: timedelta) -> None:
    """A node dates its identity document by its clock when it starts serving it: a date
    later than this node's clock allows is false. Pinned, a year 9999 would have made every
    later document of the peer look like a stale copy of it (`_refuse_stale`), for good. A
    date before 2000 is as false: pinned, it is the floor of the first rotation's date
    (`check_path_times`), and a year 1 made that floor no floor at all (from review)."""
    if identity.issued_at > now + skew:
        raise IdentityError(
            f"identity document is dated {format_time(identity.issued_at)}, later than this "
            "node's clock allows (the clock skew tolerated between nodes)"
        )
    if identity.issued_at < EARLIEST_ISSUED_AT:
        raise IdentityError(
            f"identity document is dated {format_time(identity.issued_at)}, earlier than "
            f"any node issued one ({format_time(EARLIEST_ISSUED_AT)})"
        )


def check_not_own_keys(identity: PeerIdentity, own: NodeKeys) -> None:
    """A peer that publishes one of this node's own public keys is a copy of this node (a
    keys folder copied to set up another authority's node) or pretends to hold what it
    cannot: pinned, envelopes sealed to it open here and checkpoints signed here pass as its
    own. Each node makes its own keys (`entraide init`)."""
    ours = {own.signing_public, own.encryption_public, own.log_public}
    theirs = (identity.signing, identity.encryption, identity.log)
    if any(key.public_key in ours for key in theirs):
        raise IdentityError(
            f"{identity.authority_id} publishes a public key of this node's own: a copy of "
            "this node's keys folder, not another authority's node (each node makes its own "
            "keys with `entraide init`)"
        )


def parse_identity_document(wire: object) -> PeerIdentity:
    """Check shape and self-signature; the caller still checks the pinned fingerprint."""
    if not isinstance(wire, dict) or set(wire) != {"document", "signature"}:
        raise IdentityError("identity must be an object with 'document' and 'signature'")
    try:
        document = b64d(wire["document"])
        signature = b64d(wire["signature"], length=64)
        if len(document) > MAX_IDENTITY_BYTES:
            raise IdentityError("identity document too large")
        body = load_canonical_object(document)
        if not is_int(body.get("v")) or body.get("v") != 1 or body.get("type") != IDENTITY_TYPE:
            raise IdentityError("not a version 1 Entraide identity document")
        keys = body.get("keys")
        if not isinstance(keys, dict):
            raise IdentityError("identity document has no keys")
        signing = _published_key(keys, "signing")
        if not verify(signing.public_key, DOMAIN_IDENTITY, document, signature):
            raise IdentityError("identity document signature does not verify")
        authority_id, name, url = body.get("authority_id"), body.get("name"), body.get("public_url")
        if not isinstance(authority_id, str) or not re.fullmatch(
            AUTHORITY_ID_PATTERN, authority_id
        ):
            raise IdentityError("identity document has an invalid authority id")
        if not isinstance(name, str) or not isinstance(url, str):
            raise IdentityError("identity document lacks a name or public URL")
        # Printed to operators (`peers list`) and kept in the audit trail: one plain line.
        if not 0 < len(name) <= MAX_NAME_CHARS or not is_one_line(name):
            raise IdentityError(
                f"identity document's name is not one line of 1 to {MAX_NAME_CHARS} "
                "characters without control characters"
            )
        if len(url) > MAX_URL_CHARS or not is_one_line(url):
            raise IdentityError("identity document's public URL is not one plain line")
        encryption = _published_key(keys, "encryption")
        rotations: tuple[Rotation, ...] = ()
        if "rotations" in body:
            rotations = parse_chain(
                body["rotations"],
                authority_id=authority_id,
                current_signing=signing.public_key,
                current_encryption=encryption.public_key,
            )
        return PeerIdentity(
            authority_id=authority_id,
            name=name,
            public_url=url,
            issued_at=parse_time(body.get("issued_at")),
            signing=signing,
            encryption=encryption,
            log=_published_key(keys, "log"),
            document=document,
            signature=signature,
            rotations=rotations,
        )
    except DecodeError as exc:
        raise IdentityError(f"malformed identity document: {exc}") from exc
    except RotationError as exc:
        raise IdentityError(f"invalid key rotation chain: {exc}") from exc

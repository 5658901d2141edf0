"""A MAC on every audit entry, under a key derived from the node's log key.

Hash links are hashes anyone can recompute, so until a checkpoint signs them the newest
entries were protected by no key: whoever could write to the database (but not read the keys
folder) could rewrite them, rebuild the links after them, and the next checkpoint signed the
forgery. Each entry now carries a keyed BLAKE2b of its exact bytes, written in the append
itself, and a checkpoint signs a range only if every entry in it carries a valid one
(app/audit/checkpoints.py); `entraide audit verify --db` checks the entries no checkpoint
covers yet (app/audit/service.py). The MAC is beside the entry, not in its bytes: the leaves,
the proofs and the export stay as they were, and an auditor needs no secret.

The key is derived from the log key's seed with its own personalisation string, so it is
never the signing key itself and no other keyed hash of the node can be mistaken for it.
Every process that appends holds the node's keys (`app.node.Node` sets the key on its session
factory); a session without it cannot append (fail closed: an entry without a MAC would stop
the next checkpoint).

What a checkpoint signs is the head row's root, not the entries: a writer who left the
entries and their MACs alone but put a root of their own making in the head row (with its
compact range) had it signed, then swapped the entry to match (from review). So the last
entry of each append also carries a second MAC, of its bytes and the tree root just after
it (`head_mac`): a checkpoint signs the head's root only if the entry the head ends on
vouches for it, and the root can then only be one the key's holder computed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.signing import SigningKey
from sqlalchemy import LargeBinary, cast, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import AuditEntry

PERSON_MAC_KEY = b"entraide:amkey:1"
PERSON_ENTRY_MAC = b"entraide:amac:v1"
PERSON_HEAD_MAC = b"entraide:ahead:1"
MAC_BYTES = 32
MAC_KEY_INFO = "entraide_audit_mac_key"
"""`Session.info`: the key appends MAC their entries with (set on a node's session factory)."""

MACS_EXTENSION = "entry-macs"
"""A checkpoint note's extension line: every entry appended after this checkpoint carries a
MAC (signed by a node of this version; a checkpoint without it was signed by an earlier one)."""


def mac_key(log_key: SigningKey) -> bytes:
    """The entries' MAC key: keyed BLAKE2b of nothing under the log key's 32-byte seed."""
    return blake2b(
        b"", digest_size=MAC_BYTES, key=bytes(log_key), person=PERSON_MAC_KEY, encoder=RawEncoder
    )


def entry_mac(key: bytes, entry: bytes) -> bytes:
    """The MAC of an entry's exact bytes (which hold its index and the previous leaf hash, so
    a MAC moved to another place or after another entry no longer fits)."""
    return blake2b(
        entry, digest_size=MAC_BYTES, key=key, person=PERSON_ENTRY_MAC, encoder=RawEncoder
    )


def head_mac(key: bytes, entry: bytes, root: bytes) -> bytes:
    """The MAC binding the tree root the log had just after `entry` to it (the root is
    fixed-length, after the entry: no two pairs give one input)."""
    return blake2b(
        entry + root, digest_size=MAC_BYTES, key=key, person=PERSON_HEAD_MAC, encoder=RawEncoder
    )


def macs_of(key: bytes, entry: bytes, root_after: bytes | None = None) -> bytes:
    """The `mac` column of an entry: its MAC, and for the last entry of an append (the one
    the head then ends on) the MAC of the root after it too."""
    mac = entry_mac(key, entry)
    return mac if root_after is None else mac + head_mac(key, entry, root_after)


def mac_matches(key: bytes, entry: bytes, mac: bytes | None) -> bool:
    return (
        mac is not None
        and len(mac) in (MAC_BYTES, 2 * MAC_BYTES)
        and hmac.compare_digest(entry_mac(key, entry), mac[:MAC_BYTES])
    )


def head_matches(key: bytes, entry: bytes, mac: bytes | None, root: bytes) -> bool:
    """Does the entry a head ends on vouch for the head's root?"""
    return (
        mac is not None
        and len(mac) == 2 * MAC_BYTES
        and hmac.compare_digest(head_mac(key, entry, root), mac[MAC_BYTES:])
    )


def append_with(sessions: sessionmaker[Session], log_key: SigningKey) -> sessionmaker[Session]:
    """Every session of this factory MACs the entries it appends with the log key's MAC key."""
    sessions.configure(info={MAC_KEY_INFO: mac_key(log_key)})
    return sessions


PAGE = 2048  # entries read at a time: a checkpoint period's worth is a few pages


@dataclass(frozen=True)
class MacCheck:
    problem: tuple[int, str] | None  # the first entry that fails, and why
    without_mac: int  # entries let off with no MAC (`legacy`)


def check_macs(
    session: Session,
    key: bytes,
    *,
    start: int,
    end: int,
    legacy: bool,
    head_root: bytes | None = None,
) -> MacCheck:
    """Whether entries `start` to `end - 1` are all what the key's holder appended, and with
    `head_root`, whether the last of them vouches for that root (`head_mac`).

    Each must be there and carry the MAC of its bytes. With `legacy`, an entry with no MAC at
    all (NULL: appended by a node of an earlier version, which had none) passes; a MAC that
    does not match never does.
    """
    expected, without_mac = start, 0
    while expected < end:
        rows = session.execute(
            # As bytes even where a row was rewritten as text (SQLite keeps any type it is
            # given, and its driver cannot decode text that is not UTF-8): the MAC too, or a
            # MAC rewritten as text raised TypeError instead of being refused, and stopped
            # every delivery with the worker's round (from review).
            select(
                AuditEntry.idx,
                cast(AuditEntry.entry, LargeBinary),
                cast(AuditEntry.mac, LargeBinary),
            )
            .where(AuditEntry.idx >= expected, AuditEntry.idx < end)
            .order_by(AuditEntry.idx)
            .limit(PAGE)
        ).all()
        if not rows:
            break
        for idx, entry, mac in rows:
            if idx != expected:
                return MacCheck((expected, f"entry {expected} is missing"), without_mac)
            if mac is None and legacy:
                without_mac += 1
            elif mac is None:
                return MacCheck(
                    (
                        idx,
                        f"entry {idx} carries no MAC, and no checkpoint covers it: it was "
                        "written, or its MAC removed, without the log key",
                    ),
                    without_mac,
                )
            elif not mac_matches(key, bytes(entry), bytes(mac)):
                return MacCheck(
                    (
                        idx,
                        f"entry {idx} does not carry its MAC, and no checkpoint covers it: it "
                        "was rewritten or inserted without the log key",
                    ),
                    without_mac,
                )
            if (
                idx == end - 1
                and head_root is not None
                and mac is not None
                and not head_matches(key, bytes(entry), bytes(mac), head_root)
            ):
                return MacCheck(
                    (
                        idx,
                        f"the log head's root is not one entry {idx} was appended under: the "
                        "head was rewritten without the log key",
                    ),
                    without_mac,
                )
            expected += 1
    if expected < end:
        return MacCheck((expected, f"entries {expected} to {end - 1} are missing"), without_mac)
    return MacCheck(None, without_mac)

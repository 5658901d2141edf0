"""The running node's keys, following a rotation made by another process (`keys rotate`).

A node used to keep the keys it started with until a restart: after a rotation it went on
publishing the old identity document and signing with the old key, while its key files and
its peers (told by the CLI's audit entry, or refreshing from a restarted replica) had moved
on. Now every use of the keys first stats the rotation chain (`rotations.json`), which each
rotation rewrites under a new inode; only when that changed are the keys read again (a file
read, and with protected keys an Argon2id derivation per file: never on the steady path).

The reload takes the keys folder's lock, as the commands that change key files do: it waits
for a rotation under way to finish, and two processes (serve and a worker) finishing a
rotation that stopped half way put its staged keys in place one after the other. A reload
that fails (a passphrase no longer configured, a read-only folder with a rotation to finish)
keeps the keys in use, says why in the log, and is tried again after a while or at the next
change: the node stays what it was before the rotation, as it would have without this. The
failure is kept (`state()`), for /readyz, the metrics and `doctor` to say it: a node that goes
on with keys its folder no longer holds must not look as if it had followed (from review).

Only the thread that reloads waits (on the folder's lock, then an Argon2id derivation per key
file with protected keys: over a second); the others go on with the keys in use meanwhile, as
they would have a moment before the rotation, unless they need the new keys (`wait=True`: an
envelope sealed to a key the node does not hold yet).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from app.crypto.encoding import utc_now
from app.crypto.identity import build_identity_document
from app.crypto.keyfile import KeyFileError
from app.crypto.keys import ROTATIONS_FILE, NodeIdentity, NodeKeys, keys_folder_lock, load_keys

log = logging.getLogger(__name__)

# What identifies one state of the rotation chain: inode, modification time, size. The
# chain is replaced by a rename (app/crypto/keyfile.py write_private), so a rotation always
# gives a new inode. None: no rotation yet.
Stamp = tuple[int, int, int] | None

# After a failed reload, how long the keys in use are kept before the files are read again
# (unless the chain changes meanwhile): a reload costs an Argon2id derivation per key file.
RETRY_SECONDS = 60.0


def chain_stamp(keys_dir: Path) -> Stamp:
    try:
        found = os.stat(keys_dir / ROTATIONS_FILE)
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable: differs from any real stamp, so a reload says why
        return (-1, exc.errno or 0, 0)
    return (found.st_ino, found.st_mtime_ns, found.st_size)


@dataclass(frozen=True)
class Generation:
    """One set of keys and the identity document that publishes them, swapped as a whole."""

    keys: NodeKeys
    document: dict[str, str]
    stamp: Stamp


@dataclass(frozen=True)
class ReloadFailure:
    """Why the keys the folder holds now could not be loaded (the keys in use stay)."""

    # The loader's message without the keys folder's path: it is shown on /readyz, which
    # answers without a token. It names files and settings, never key material.
    reason: str
    since: datetime  # the first failure of this run of failures
    at: datetime  # the latest
    stamp: Stamp  # the chain it failed on
    tried: float  # the ring's clock at the latest, for the retry delay
    # How many rotations that chain holds (None: unreadable): `keys rotate` tells a failure
    # of its own rotation from one left by an earlier rotation (from review).
    rotation: int | None = None


@dataclass(frozen=True)
class KeyRingState:
    """What a process serves, read without loading anything (/readyz, metrics)."""

    generation: Generation
    failure: ReloadFailure | None
    # The chain on disk is the one the keys in use came with (False for a moment after a
    # rotation, until the next use of the keys reloads them; and after a failure).
    follows_disk: bool
    reloading: bool


# Told of a reload that brought a longer chain: the keys before and after (app/node.py
# records the rotations in the audit log). It must not raise: the reload is done.
RotationListener = Callable[[NodeKeys, NodeKeys], None]


def chain_length(keys_dir: Path) -> int | None:
    """How many rotations the chain on disk holds (not verified: a count for the metrics);
    None when it cannot be read."""
    try:
        wire = json.loads((keys_dir / ROTATIONS_FILE).read_bytes())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, RecursionError):
        return None
    return len(wire) if isinstance(wire, list) else None


class KeyRing:
    def __init__(
        self,
        keys_dir: Path,
        identity: NodeIdentity,
        keys: NodeKeys,
        *,
        stamp: Stamp,
        passphrase: Callable[[], bytes | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys_dir = keys_dir
        self.identity = identity
        self._passphrase = passphrase
        self._clock = clock
        # Swapped as one, so a reader never sees new keys beside the old failure.
        self._held: tuple[Generation, ReloadFailure | None] = (self._publish(keys, stamp), None)
        self._lock = threading.Lock()
        self.on_rotation: RotationListener | None = None

    @classmethod
    def load(
        cls, keys_dir: Path, identity: NodeIdentity, *, passphrase: Callable[[], bytes | None]
    ) -> KeyRing:
        # The stamp before the read: a rotation between the two is seen at the first use.
        stamp = chain_stamp(keys_dir)
        keys = load_keys(keys_dir, passphrase=passphrase())
        return cls(keys_dir, identity, keys, stamp=stamp, passphrase=passphrase)

    def _publish(self, keys: NodeKeys, stamp: Stamp) -> Generation:
        # Issued now: a peer refuses a document with other keys issued before the one it pins.
        document = build_identity_document(self.identity, keys, issued_at=utc_now())
        return Generation(keys, document, stamp)

    @property
    def failure(self) -> ReloadFailure | None:
        return self._held[1]

    def state(self) -> KeyRingState:
        """The keys in use and how they stand against the folder: one stat, no reload, no
        wait (/readyz must answer while a reload waits for a rotation to end)."""
        generation, failure = self._held
        return KeyRingState(
            generation=generation,
            failure=failure,
            follows_disk=chain_stamp(self.keys_dir) == generation.stamp,
            reloading=self._lock.locked(),
        )

    def current(self, *, wait: bool = False) -> Generation:
        """The keys the folder holds now. One stat when nothing changed; callers that use
        several parts of the keys together (a key and its id) take one generation once.

        When the chain changed, the first thread to see it reloads (and waits for that); the
        others get the keys in use until it is done, unless `wait`: then they wait for it."""
        generation, failure = self._held
        stamp = chain_stamp(self.keys_dir)
        if stamp == generation.stamp or self._waiting(failure, stamp):
            return generation
        if not self._lock.acquire(blocking=wait):
            return generation  # another thread is reloading: the keys in use meanwhile
        try:
            generation, failure = self._held
            stamp = chain_stamp(self.keys_dir)
            if stamp == generation.stamp or self._waiting(failure, stamp):
                return generation
            return self._reload(generation, failure)
        finally:
            self._lock.release()

    def _waiting(self, failure: ReloadFailure | None, stamp: Stamp) -> bool:
        return (
            failure is not None
            and failure.stamp == stamp
            and self._clock() - failure.tried < RETRY_SECONDS
        )

    def _reload(self, before: Generation, failed: ReloadFailure | None) -> Generation:
        try:
            with keys_folder_lock(self.keys_dir):  # a rotation under way ends first
                stamp = chain_stamp(self.keys_dir)
                keys = load_keys(self.keys_dir, passphrase=self._passphrase())
        except (KeyFileError, OSError) as exc:
            now = utc_now()
            self._held = (
                before,
                ReloadFailure(
                    reason=self._without_folder(str(exc)),
                    since=now if failed is None else failed.since,
                    at=now,
                    stamp=chain_stamp(self.keys_dir),
                    tried=self._clock(),
                    rotation=chain_length(self.keys_dir),
                ),
            )
            # The message names files and what to do, never key material.
            log.error(
                "the keys in %s changed but could not be loaded; still using signing key %s "
                "(retried in %.0f s or at the next change): %s",
                self.keys_dir,
                before.keys.signing_kid,
                RETRY_SECONDS,
                exc,
            )
            return before
        generation = self._publish(keys, stamp)
        self._held = (generation, None)
        if keys.signing_public != before.keys.signing_public:
            log.info(
                "keys reloaded after a rotation: signing key %s -> %s, encryption key %s -> %s",
                before.keys.signing_kid,
                keys.signing_kid,
                before.keys.encryption_kid,
                keys.encryption_kid,
            )
        if len(keys.rotations) > len(before.keys.rotations) and self.on_rotation is not None:
            self.on_rotation(before.keys, keys)  # after the swap: the others need not wait
        return generation

    def _without_folder(self, message: str) -> str:
        folder = str(self.keys_dir)
        return message.replace(folder + os.sep, "").replace(folder, "the keys folder")

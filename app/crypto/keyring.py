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
change: the node stays what it was before the rotation, as it would have without this.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
        self._generation = self._publish(keys, stamp)
        self._lock = threading.Lock()
        self._failed: tuple[Stamp, float] | None = None

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

    def current(self) -> Generation:
        """The keys the folder holds now. One stat when nothing changed; callers that use
        several parts of the keys together (a key and its id) take one generation once."""
        generation = self._generation
        stamp = chain_stamp(self.keys_dir)
        if stamp == generation.stamp or self._waiting(stamp):
            return generation
        with self._lock:  # one thread reloads; the others wait for its result
            generation = self._generation
            stamp = chain_stamp(self.keys_dir)
            if stamp == generation.stamp or self._waiting(stamp):
                return generation
            return self._reload(generation)

    def _waiting(self, stamp: Stamp) -> bool:
        failed = self._failed
        return (
            failed is not None and failed[0] == stamp and self._clock() - failed[1] < RETRY_SECONDS
        )

    def _reload(self, before: Generation) -> Generation:
        try:
            with keys_folder_lock(self.keys_dir):  # a rotation under way ends first
                stamp = chain_stamp(self.keys_dir)
                keys = load_keys(self.keys_dir, passphrase=self._passphrase())
        except (KeyFileError, OSError) as exc:
            self._failed = (chain_stamp(self.keys_dir), self._clock())
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
        self._failed = None
        generation = self._publish(keys, stamp)
        self._generation = generation
        if keys.signing_public != before.keys.signing_public:
            log.info(
                "keys reloaded after a rotation: signing key %s -> %s, encryption key %s -> %s",
                before.keys.signing_kid,
                keys.signing_kid,
                before.keys.encryption_kid,
                keys.encryption_kid,
            )
        return generation

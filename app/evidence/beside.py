"""Work a streamed part needs done, run in helper threads beside the cipher.

A part's chunk goes through three passes of about the same cost: the plaintext hash, the
secretstream push or pull, and the ciphertext hash. hashlib releases the GIL while it hashes
a large buffer, as libsodium does while it encrypts, so the hashes can run on the machine's
other core while the calling thread encrypts, decrypts or writes: the part's critical path
becomes the cipher alone instead of the sum of the three (docs/benchmarks.md, evidence).

Updates to one hash run in order, one at a time: `update` waits for the same hash's previous
update before queueing the next, so a hash holds at most one buffer beyond its caller's,
whatever the part's size, and `hexdigest` waits for the last. The blob store flushes what
it has written the same way (app/evidence/blobstore.py). The helper threads never wait on
one another, so a full pool only delays a task, never deadlocks it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

# Below this, handing a buffer to another thread costs more than hashing it here.
BESIDE_MIN_BYTES = 64 << 10
# Per part in flight: two hashes (plaintext and ciphertext); for a couple of parts at once.
HASH_THREADS = 4
# Flushes wait for the disk: a pool of their own, so no hash ever queues behind one.
FLUSH_THREADS = 2

_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _submit(name: str, threads: int, task: Callable[[], None]) -> Future[None]:
    pool = _pools.get(name)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(name)
            if pool is None:
                pool = _pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
    return pool.submit(task)


def run_beside(task: Callable[[], None]) -> Future[None]:
    """Run a hash update in a helper thread; the caller waits for the future before relying
    on it. `task` must not wait for another task (see the module's note)."""
    return _submit("evidence-hash", HASH_THREADS, task)


def flush_beside(task: Callable[[], None]) -> Future[None]:
    """Run a blob store flush in a helper thread of the flush pool."""
    return _submit("evidence-flush", FLUSH_THREADS, task)


class BesideHash:
    """A SHA-256 whose large updates run in a helper thread, in order.

    The buffer given to `update` is `bytes`, never a buffer the caller reuses: it is read by
    the helper thread after `update` returns.
    """

    __slots__ = ("_before_last", "_hash", "_pending")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._before_last: hashlib._Hash | None = None
        self._pending: Future[None] | None = None

    def update(self, data: bytes) -> None:
        self._wait()
        self._before_last = self._hash.copy()  # a few hundred bytes: for `undo_last`
        if len(data) < BESIDE_MIN_BYTES:
            self._hash.update(data)
        else:
            self._pending = run_beside(lambda: self._hash.update(data))

    def undo_last(self) -> None:
        """Forget the last update: its buffer was queued beside a check it then failed."""
        self._wait()
        if self._before_last is None:
            raise RuntimeError("no update to undo")
        self._hash, self._before_last = self._before_last, None

    def hexdigest(self) -> str:
        self._wait()
        return self._hash.hexdigest()

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

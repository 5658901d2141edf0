"""The PUTs receiving a part in this process, so that a stalled one can be taken over.

A part's PUT signature covers its envelope, part and offset, not a time (protocol.md §8.5):
whoever captured one signed PUT (at a TLS-terminating proxy, in a log of request headers)
could replay it while the receiver stays at that offset and trickle bytes that never make a
chunk, within the idle limit: the real sender was refused `409 part_busy` for as long as it
went on (from review). A PUT whose signature verifies, at the offset where the part stands,
takes the part over from one that has stored no chunk for STALLED_IDLE_PERIODS idle limits;
one that stores chunks is never taken over. Within one process only: a PUT held by another
replica behind the same address is waited out as before. This bounds one replay; replays
repeated as each is taken over still hold the part (nothing tells them from the sender's own
PUTs): the remedy is a fresh element in the signature, a protocol change (from review).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

# No whole chunk stored for this many idle limits (120 s by default): a sender at less than
# about 8.7 KiB/s (a 1 MiB chunk in 120 s) could be taken over by a replay of its own PUT.
STALLED_IDLE_PERIODS = 2.0
# How long a taking PUT waits for the stalled one to let the part go.
RELEASE_WAIT_SECONDS = 10.0


@dataclass
class Holder:
    """One PUT receiving a part: cancelled through `scope` when taken over."""

    offset: Callable[[], int]  # where the part stands (whole chunks stored)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    released: anyio.Event = field(default_factory=anyio.Event)
    stored_at: float = field(default_factory=time.monotonic)  # its start, or its last chunk

    def storing(self, sink: Callable[[list[bytes]], None]) -> Callable[[list[bytes]], None]:
        """`sink`, noting when it stores a chunk (it runs in a worker thread)."""

        def noted(batch: list[bytes]) -> None:
            before = self.offset()
            sink(batch)
            if self.offset() != before:
                self.stored_at = time.monotonic()

        return noted

    def stalled(self, seconds: float) -> bool:
        return time.monotonic() - self.stored_at >= seconds


class PartHolders:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Holder] = {}

    def hold(self, name: str, offset: Callable[[], int]) -> Holder:
        holder = Holder(offset)
        with self._lock:
            self._held[name] = holder
        return holder

    def let_go(self, name: str, holder: Holder) -> None:
        with self._lock:
            if self._held.get(name) is holder:
                del self._held[name]
        holder.released.set()

    def stalled(self, name: str, offset: int, seconds: float) -> Holder | None:
        """The PUT holding `name` if it stands at `offset` and stored nothing for `seconds`."""
        with self._lock:
            holder = self._held.get(name)
        if holder is None or holder.offset() != offset or not holder.stalled(seconds):
            return None
        return holder


class PartCompleted(Exception):
    """The PUT taken over completed the part as it let it go."""


async def take_over(holder: Holder) -> bool:
    """Cancel a stalled PUT and wait until it let the part go; False if it did not in time."""
    holder.scope.cancel()
    with anyio.move_on_after(RELEASE_WAIT_SECONDS):
        await holder.released.wait()
        return True
    return False

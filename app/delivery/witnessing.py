"""Witnessing the checkpoints peers' receipts carry, beside the delivery rounds.

Checking a peer's new checkpoint may fetch a consistency proof from that peer: one HTTP call
of up to the peer timeout, or longer from a peer that trickles its answer. Run in the
delivery loop, once per receipt, it let one peer stop every delivery to every peer: a peer
whose proof route answered slowly or not at all was asked again for each receipt of a batch,
one after the other (from review: 20 receipts, 20 proofs asked for, the loop held 10 s at
0.5 s each; at a 30 s timeout and 64 receipts, half an hour). Now the loop hands each note to
a thread of its own and goes on. Per peer only the newest note waits (a receipt repeats the
receiver's latest checkpoint, and a checkpoint proven consistent covers the ones before it),
so a peer has at most one check under way and one waiting, however many receipts it sends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Witnessing:
    """The checks of peers' checkpoint notes, one at a time, in a thread started on first use.

    `check(peer, note)` is True once the note is witnessed (consistent, stored, cosigned):
    the same note is not checked again for that peer, as long as it is the last one."""

    def __init__(self, check: Callable[[str, str], bool]) -> None:
        self._check = check
        self._changed = threading.Condition()
        self._waiting: dict[str, str] = {}  # peer -> its newest note not yet checked
        self._witnessed: dict[str, str] = {}  # peer -> its last note witnessed
        self._checking = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def submit(self, peer: str, note: str) -> None:
        with self._changed:
            if self._stopped or self._witnessed.get(peer) == note:
                return
            self._waiting[peer] = note
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="delivery-witness", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every note submitted was checked within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._waiting and not self._checking, timeout=timeout
            )

    def stop(self, timeout: float) -> None:
        """No new check starts; the one under way gets `timeout` seconds to end (a slow
        peer's proof is not waited for at a stop: the next receipt carries a note again)."""
        with self._changed:
            self._stopped = True
            self._waiting.clear()
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._stopped)
                if self._stopped:
                    return
                peer = next(iter(self._waiting))
                note = self._waiting.pop(peer)
                self._checking = True
            witnessed = False
            try:
                witnessed = self._check(peer, note)
            except Exception as exc:  # a database out of reach: the next receipt tries again
                log.warning(
                    "could not witness %s's checkpoint (%s); its next receipt tries again",
                    peer,
                    type(exc).__name__,
                )
            with self._changed:
                if witnessed:
                    self._witnessed[peer] = note
                self._checking = False
                self._changed.notify_all()

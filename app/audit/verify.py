"""Checking an audit log from its entries and signed checkpoints alone.

The same verifier serves an exported folder (`entraide audit verify DIR`) and the live
database (`--db`). It needs the log's public key and nothing else from the node:

- every checkpoint's signature (C2SP signed note) and origin;
- entries contiguous from 0, each entry's own `idx` equal to its position;
- times that never go backwards;
- the Merkle root recomputed from the entries equal to every checkpoint's root;
- each entry's `prev_leaf` equal to the previous entry's leaf hash, which names the altered
  entry exactly, where a checkpoint mismatch alone only names a range;
- optionally, an earlier checkpoint the auditor saved: today's log must extend it.

Problems are collected, not raised; the first (lowest index) names the first bad entry.

Entries are checked in batches. :func:`check_batch`, a pure function, hashes a batch and
confirms the common case: every entry in its place, linked to the one before, not going back
in time. A batch that passes only extends the tree; one that does not is checked again entry
by entry, which is what names problems. On a machine with idle cores, large logs check their
batches in worker processes while this process reads entries and extends the tree.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import orjson

from app.audit.merkle import CompactRange, covering_subtrees, leaf_hash, subtree_levels
from app.audit.note import Checkpoint, NoteError, Verifier, open_note
from app.crypto.encoding import TIMESTAMP, DecodeError, format_time, parse_time, utc_now


@dataclass(frozen=True, order=True)
class Problem:
    idx: int  # the first entry concerned; checkpoint-only problems use the checkpoint size
    message: str


@dataclass
class Report:
    entries: int = 0
    checkpoints: int = 0
    signed: int = 0  # entries covered by the largest signed checkpoint
    without_mac: int = 0  # (--db) entries after it let off with no MAC: appended before MACs
    root: bytes = b""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return min(self.problems) if self.problems else None


@dataclass(frozen=True)
class _Signed:
    label: str
    checkpoint: Checkpoint

    @property
    def signed_at(self) -> str | None:
        return signed_time(self.checkpoint)


TIME_EXTENSION = "time "
"""A checkpoint's extension line `time <RFC 3339>`: when the node signed it (by its clock)."""


def signed_time(checkpoint: Checkpoint) -> str | None:
    """When a checkpoint says it was signed, as a time a margin can be added to; None for one
    without the line (signed before it was added) or with one that is no such time."""
    for line in checkpoint.extensions:
        moment = line.removeprefix(TIME_EXTENSION)
        if moment != line and TIMESTAMP.fullmatch(moment):
            try:
                parse_time(moment) + FUTURE_MARGIN
            except (DecodeError, OverflowError):
                return None
            return moment
    return None


_MISSING = object()

Stored = list[int | None] | None
"""The stored index of each entry of a batch, where the log keeps one (a database)."""

BATCH_SIZE = 1 << 15
"""Entries per batch, a power of two: a full batch is one perfect subtree of the log. Worker
processes, if any, start with a log's second batch."""


@dataclass(frozen=True)
class Checked:
    """A batch found clean: the subtrees that cover it, and what its first entry must match."""

    subtrees: list[tuple[int, bytes]]
    at_checkpoints: dict[int, list[tuple[int, bytes]]]  # checkpoint size: subtrees up to it
    times_at: dict[int, str]  # checkpoint size: the time of the last entry it covers
    first_time: str
    last_time: str
    first_prev_leaf: object
    last_leaf: str


FUTURE_MARGIN = timedelta(minutes=5)


def _later(moment: str) -> str:
    """`moment` plus the clock difference tolerated between an entry and its signing."""
    return format_time(parse_time(moment) + FUTURE_MARGIN)


def _horizon() -> str:
    """Entry times past this are in the future: the log's times were pushed ahead (a forged
    entry, or a clock set forward), and every later entry takes that time (app/audit/log.py)."""
    return format_time(utc_now() + FUTURE_MARGIN)


# The version of the entries this verifier reads, and app/audit/log.py writes: an entry of
# another is named, never read as if it were one (from review: any `v` passed).
ENTRY_VERSION = 1


def check_batch(
    start: int, entries: Sequence[bytes], stored: Stored, checkpoints: Iterable[int]
) -> Checked | None:
    """Check entries `start`, `start + 1`, ... for the common case and hash their subtrees.

    Clean means: every entry parses, sits at its own index (and at its stored index, if any),
    has a string time no earlier than the previous entry's, and links to the previous
    entry's leaf hash. The caller checks the first entry against the log before it. Anything
    else returns None: the caller then looks closer, entry by entry, and names the problem.
    `start` is a multiple of the batch size, so the batch's subtrees are the log's; for each
    checkpoint size inside the batch it also returns the subtrees up to that size.
    """
    if not entries or (stored is not None and stored != list(range(start, start + len(entries)))):
        return None
    sha256, loads, stamp, horizon = hashlib.sha256, orjson.loads, TIMESTAMP.fullmatch, _horizon()
    leaves: list[bytes] = []
    keep = leaves.append
    position, last_time = start, ""
    last_of = {size - 1 for size in checkpoints}
    times_at: dict[int, str] = {}
    try:
        first = loads(entries[0])
        # The first entry's link is the caller's to check; every later one names the leaf
        # hashed just before it. One pass: hash, parse, compare.
        link = first.get("prev_leaf", _MISSING) if type(first) is dict else _MISSING
        if link is _MISSING:
            return None
        first_prev_leaf = link
        for data in entries:
            fields = loads(data)
            if type(fields) is not dict:
                return None
            time, idx = fields.get("time"), fields.get("idx")
            if (
                type(time) is not str
                or time < last_time
                or time > horizon
                or not stamp(time)
                or type(idx) is not int  # `true` equals 1 in Python: not an index
                or idx != position
                or type(fields.get("v")) is not int
                or fields["v"] != ENTRY_VERSION
                or fields.get("prev_leaf", _MISSING) != link
            ):
                return None
            leaf = sha256(b"\x00" + data).digest()
            keep(leaf)
            link, last_time = leaf.hex(), time
            if position in last_of:
                times_at[position + 1] = time
            position += 1
    except orjson.JSONDecodeError:
        return None
    levels = subtree_levels(leaves)
    return Checked(
        subtrees=covering_subtrees(levels, len(leaves)),
        at_checkpoints={size: covering_subtrees(levels, size - start) for size in checkpoints},
        times_at=times_at,
        first_time=first["time"],
        last_time=last_time,
        first_prev_leaf=first_prev_leaf,
        last_leaf=leaves[-1].hex(),
    )


def _default_workers() -> int:
    """As many worker processes as there are idle cores, if at least two are.

    Handing batches to other processes costs about a fifth more CPU time in all: worth it when
    cores would otherwise sit idle, a loss on a machine that is busy anyway.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    idle = int(cores - os.getloadavg()[0])
    return idle if idle >= 2 else 0


class LogVerifier:
    """Feed entries in order with `feed`, then call `finish`.

    `workers` is how many processes check batches of a large log (default: one per idle
    core; 0 checks everything in this process). They are forked: nothing to import.
    """

    def __init__(
        self,
        verifier: Verifier,
        origin: str,
        notes: Iterable[str],
        earlier: str | None = None,
        *,
        extends: Sequence[tuple[str, str]] = (),
        batch_size: int = BATCH_SIZE,
        workers: int | None = None,
    ) -> None:
        self.report = Report()
        self._origin = origin
        self._verifier = verifier
        self._roots: dict[int, list[_Signed]] = {}
        for number, note in enumerate(notes, 1):
            self._add_checkpoint(f"checkpoint #{number}", note)
        # Checkpoints the auditor brings (saved at an earlier audit, cosigned by a witness,
        # each with its label): the log must extend every one of them.
        brought = [("the earlier checkpoint", earlier)] if earlier is not None else []
        self._brought: list[_Signed] = []
        for label, note in [*brought, *extends]:
            checked = self._check_note(label, note)
            if checked is not None:
                self._brought.append(checked)
                self._roots.setdefault(checked.checkpoint.size, []).append(checked)
        self._compact = CompactRange()
        self._expected = 0
        self._last_time = ""
        self._horizon = _horizon()
        self._last_leaf: str | None = None
        self._chain_breaks: list[int] = []
        self._last_good_checkpoint = 0
        self._latest_signed_at = ""  # the latest signing time of the checkpoints checked
        self._ranges: list[tuple[int, int, str]] = []
        if batch_size < 1 or batch_size & (batch_size - 1):
            raise ValueError("the batch size is a power of two")
        self._batch_size = batch_size
        self._workers = _default_workers() if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: list[bytes] = []
        self._pending_stored: list[int | None] | None = None  # None: no stored indexes
        self._dispatched = 0
        self._in_flight: deque[tuple[int, list[bytes], Stored, Future[Checked | None]]]
        self._in_flight = deque()

    def _problem(self, idx: int, message: str) -> None:
        self.report.problems.append(Problem(idx, message))

    def _check_note(self, label: str, note: str) -> _Signed | None:
        try:
            text, _ = open_note(note, [self._verifier])
            checkpoint = Checkpoint.parse(text)
        except NoteError as exc:
            self._problem(-1, f"{label}: {exc}")
            return None
        if checkpoint.origin != self._origin:
            self._problem(-1, f"{label} is for log {checkpoint.origin!r}, not {self._origin!r}")
            return None
        return _Signed(label, checkpoint)

    def _add_checkpoint(self, label: str, note: str) -> None:
        self.report.checkpoints += 1
        checked = self._check_note(label, note)
        if checked is not None:
            self._roots.setdefault(checked.checkpoint.size, []).append(checked)

    def feed(self, data: bytes, *, stored_idx: int | None = None) -> None:
        self.feed_many([data], None if stored_idx is None else [stored_idx])

    def feed_many(self, entries: Sequence[bytes], stored: Sequence[int] | None = None) -> None:
        """The next entries in order; `stored`: their indexes as stored beside them, if any
        (a database keeps them in a column of their own, an export does not)."""
        if stored is not None and len(stored) != len(entries):
            raise ValueError("one stored index per entry")
        if stored is not None and self._pending_stored is None:
            self._pending_stored = [None] * len(self._pending)
        self._pending.extend(entries)
        if self._pending_stored is not None:
            self._pending_stored.extend(stored if stored is not None else [None] * len(entries))
        while len(self._pending) >= self._batch_size:
            self._dispatch(self._batch_size)

    def _dispatch(self, count: int) -> None:
        entries, self._pending = self._pending[:count], self._pending[count:]
        stored = self._pending_stored
        if stored is not None:
            stored, self._pending_stored = stored[:count], stored[count:]
        start = self._dispatched
        self._dispatched += len(entries)
        checkpoints = [size for size in self._roots if start < size <= self._dispatched]
        pool = self._pool_for(start) if len(entries) == self._batch_size else self._pool
        if pool is None:
            self._fold(start, entries, stored, check_batch(start, entries, stored, checkpoints))
            return
        work = pool.submit(check_batch, start, entries, stored, checkpoints)
        self._in_flight.append((start, entries, stored, work))
        # Bounded read-ahead: a slow check holds back reading, not memory.
        while len(self._in_flight) > 2 * self._workers:
            self._fold_oldest()

    def _pool_for(self, start: int) -> ProcessPoolExecutor | None:
        if self._pool is None and self._workers > 0 and start > 0:  # a second batch: large
            context = multiprocessing.get_context("fork")
            self._pool = ProcessPoolExecutor(self._workers, mp_context=context)
            weakref.finalize(self, self._pool.shutdown, cancel_futures=True)
        return self._pool

    def _fold_oldest(self) -> None:
        start, entries, stored, future = self._in_flight.popleft()
        self._fold(start, entries, stored, future.result())

    def _fold(
        self, start: int, entries: list[bytes], stored: Stored, checked: Checked | None
    ) -> None:
        if (
            checked is not None
            and start == self._expected
            and checked.first_time >= self._last_time
            and checked.first_prev_leaf == self._last_leaf
        ):
            for size, subtrees in sorted(checked.at_checkpoints.items()):
                upto = self._compact.copy()
                for level, digest in subtrees:
                    upto.append_subtree(level, digest)
                self._check_roots(size, upto.root(), checked.times_at.get(size))
            for level, digest in checked.subtrees:
                self._compact.append_subtree(level, digest)
            self._expected += len(entries)
            self._last_time = checked.last_time
            self._last_leaf = checked.last_leaf
            return
        for data, stored_idx in zip(entries, stored or itertools.repeat(None), strict=False):
            self._feed_one(data, stored_idx)

    def _feed_one(self, data: bytes, stored_idx: int | None) -> None:
        position = self._expected
        in_place = True
        if stored_idx is not None and stored_idx != position:
            in_place = False
            if stored_idx > position:
                self._problem(position, f"entries {position} to {stored_idx - 1} are missing")
            else:
                self._problem(stored_idx, f"entry {stored_idx} appears twice")
        try:
            fields = orjson.loads(data)
            claimed = fields["idx"]
            time = fields["time"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._problem(position, f"entry {position} is not a valid audit entry")
            fields, claimed, time = {}, position, None
        if type(claimed) is not int or claimed != position:
            in_place = False
            # An entry out of place: deleted before it (claims more), inserted or moved
            # (claims less, the same index as an earlier one). Name the earlier position.
            first = min(claimed, position) if type(claimed) is int and claimed >= 0 else position
            self._problem(first, f"entry at position {position} claims index {claimed}")
        version = fields.get("v")
        if fields and (type(version) is not int or version != ENTRY_VERSION):
            self._problem(
                position,
                f"entry {position} is of version {version!r:.20}: this verifier reads version "
                f"{ENTRY_VERSION}",
            )
        if fields and not (isinstance(time, str) and TIMESTAMP.fullmatch(time)):
            self._problem(position, f"entry {position}: its time is not a timestamp ({time!r:.40})")
        elif isinstance(time, str) and time < self._last_time:
            self._problem(position, f"entry {position}: time goes backwards ({time})")
        elif isinstance(time, str):
            if time > self._horizon:
                self._problem(position, f"entry {position} is dated in the future ({time})")
            self._last_time = time
        # The hash chain names altered entries; entries out of place are named above.
        if in_place and "prev_leaf" in fields and fields["prev_leaf"] != self._last_leaf:
            self._chain_breaks.append(position)
        leaf = leaf_hash(data)
        self._last_leaf = leaf.hex()
        self._extend(leaf)

    def _extend(self, leaf: bytes) -> None:
        self._compact.append(leaf)
        self._expected += 1
        if self._compact.size in self._roots:
            self._check_roots(self._compact.size, self._compact.root(), self._last_time)

    def _check_roots(self, size: int, root: bytes, last_time: str | None) -> None:
        # Mismatches first: their range starts at the last checkpoint that matched below this
        # size, never at a match of this very size (from review: "entries 5 to 4").
        matched = [item for item in self._roots[size] if item.checkpoint.root_hash == root]
        for item in self._roots[size]:
            if item.checkpoint.root_hash != root:
                self._mismatch(item, matched[0] if matched else None)
        for item in matched:
            self._last_good_checkpoint = item.checkpoint.size
            signed_at = item.signed_at
            if signed_at is None:
                continue
            # Against the latest signing time so far, not this one's alone: a node whose clock
            # ran fast, then was set right, signs the entries that took the fast time (times
            # never go back) after checkpoints it signed at that time already.
            latest = max(signed_at, self._latest_signed_at)
            self._latest_signed_at = latest
            if last_time and last_time > _later(latest):
                # No checkpoint was signed at the time its entries carry: their times were
                # pushed ahead (entry times never go back, so one entry edited to a future date
                # stamps every later one), and no longer say when things happened.
                self._problem(
                    size - 1,
                    f"entry {size - 1} is dated {last_time}, after {item.label} that covers "
                    f"it was signed ({signed_at}), as was every checkpoint before it: the "
                    "log's times were pushed ahead",
                )

    def _mismatch(self, item: _Signed, twin: _Signed | None) -> None:
        size = item.checkpoint.size
        if any(item is brought for brought in self._brought):
            message = f"the log is not consistent with {item.label} of size {size}"
        else:
            message = f"{item.label} (size {size}) does not match the entries"
        if twin is not None:
            # Both verify with the log key: it signed two different logs of this size.
            message += (
                f", which {twin.label} of the same size matches: the log key signed two "
                f"different logs of {size} entries"
            )
        self._ranges.append((self._last_good_checkpoint, size, message))

    def finish(self) -> Report:
        if self._pending:
            self._dispatch(len(self._pending))
        while self._in_flight:
            self._fold_oldest()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        named: int | None = None
        if self._chain_breaks:
            first = self._chain_breaks[0]
            # An altered entry breaks the link to the next one; an altered prev_leaf field
            # breaks its own link and, having changed the entry's hash, the next one too.
            named = max(first if first + 1 in self._chain_breaks else first - 1, 0)
            self._problem(named, f"entry {named} was altered (its hash no longer links)")
        for start, end, message in self._ranges:
            if named is None or not start <= named < end:
                # Every link inside the range is intact, yet its root is not the signed one.
                # Links are hashes anyone can recompute, so it may be any entry of the range
                # that was changed, removed or inserted with the links rebuilt after it, not
                # only its last one (from review: that sent an examiner to the wrong entry).
                where = (
                    f"entry {end - 1} was altered"
                    if end - start == 1
                    else f"entries {start} to {end - 1} were changed, or entries removed or "
                    "inserted there with the links after them rebuilt (the last checkpoint "
                    f"that matches covers {start})"
                )
                self._problem(end - 1, f"{message}: {where}")
        size = self._compact.size
        for item in self._roots.get(0, []):  # never reached by appending: checked here
            if item.checkpoint.root_hash != CompactRange().root():
                self._problem(-1, f"{item.label} (size 0) does not have the empty log's root")
        for checkpoint_size, signed in self._roots.items():
            if checkpoint_size > size:
                for item in signed:
                    self._problem(
                        size,
                        f"{item.label} covers {checkpoint_size} entries but only {size} exist: "
                        f"entries {size} to {checkpoint_size - 1} are missing",
                    )
        self.report.entries = size
        self.report.signed = min(max(self._roots, default=0), size)
        self.report.root = self._compact.root()
        return self.report

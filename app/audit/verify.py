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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from app.audit.merkle import CompactRange, leaf_hash
from app.audit.note import Checkpoint, NoteError, Verifier, open_note


@dataclass(frozen=True, order=True)
class Problem:
    idx: int  # the first entry concerned; checkpoint-only problems use the checkpoint size
    message: str


@dataclass
class Report:
    entries: int = 0
    checkpoints: int = 0
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


class LogVerifier:
    """Feed entries in order with `feed`, then call `finish`."""

    def __init__(
        self, verifier: Verifier, origin: str, notes: Iterable[str], earlier: str | None = None
    ) -> None:
        self.report = Report()
        self._origin = origin
        self._verifier = verifier
        self._roots: dict[int, list[_Signed]] = {}
        for number, note in enumerate(notes, 1):
            self._add_checkpoint(f"checkpoint #{number}", note)
        self._earlier: _Signed | None = None
        if earlier is not None:
            checked = self._check_note("the earlier checkpoint", earlier)
            if checked is not None:
                self._earlier = checked
                self._roots.setdefault(checked.checkpoint.size, []).append(checked)
        self._compact = CompactRange()
        self._expected = 0
        self._last_time = ""
        self._last_leaf: str | None = None
        self._chain_breaks: list[int] = []
        self._last_good_checkpoint = 0
        self._ranges: list[tuple[int, int, str]] = []

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
            fields, claimed, time = {}, position, ""
        if claimed != position:
            in_place = False
            # An entry out of place: deleted before it (claims more), inserted or moved
            # (claims less, the same index as an earlier one). Name the earlier position.
            first = min(claimed, position) if type(claimed) is int and claimed >= 0 else position
            self._problem(first, f"entry at position {position} claims index {claimed}")
        if isinstance(time, str) and time < self._last_time:
            self._problem(position, f"entry {position}: time goes backwards ({time})")
        elif isinstance(time, str):
            self._last_time = time
        # The hash chain names altered entries; entries out of place are named above.
        if in_place and "prev_leaf" in fields and fields["prev_leaf"] != self._last_leaf:
            self._chain_breaks.append(position)
        leaf = leaf_hash(data)
        self._last_leaf = leaf.hex()
        self._compact.append(leaf)
        self._expected += 1
        signed = self._roots.get(self._compact.size)
        if signed:
            root = self._compact.root()
            for item in signed:
                if item.checkpoint.root_hash != root:
                    self._mismatch(item)
                else:
                    self._last_good_checkpoint = item.checkpoint.size

    def _mismatch(self, item: _Signed) -> None:
        size = item.checkpoint.size
        if item is self._earlier:
            message = f"the log is not consistent with the earlier checkpoint of size {size}"
        else:
            message = f"{item.label} (size {size}) does not match the entries"
        self._ranges.append((self._last_good_checkpoint, size, message))

    def finish(self) -> Report:
        named: int | None = None
        if self._chain_breaks:
            first = self._chain_breaks[0]
            # An altered entry breaks the link to the next one; an altered prev_leaf field
            # breaks its own link and, having changed the entry's hash, the next one too.
            named = max(first if first + 1 in self._chain_breaks else first - 1, 0)
            self._problem(named, f"entry {named} was altered (its hash no longer links)")
        for start, end, message in self._ranges:
            if named is None or not start <= named < end:
                # With every link inside the range intact, only the range's last entry can
                # have changed: any earlier one would have broken the link to its successor.
                self._problem(end - 1, f"{message}: entry {end - 1} was altered")
        size = self._compact.size
        for checkpoint_size, signed in self._roots.items():
            if checkpoint_size > size:
                for item in signed:
                    self._problem(
                        size,
                        f"{item.label} covers {checkpoint_size} entries but only {size} exist: "
                        f"entries {size} to {checkpoint_size - 1} are missing",
                    )
        self.report.entries = size
        self.report.root = self._compact.root()
        return self.report

"""RFC 9162 (RFC 6962) Merkle tree over SHA-256: tree hashes, proofs and their verification.

Pure functions over 32-byte hashes. Sizes are leaf counts and indexes zero-based leaf positions;
the tree over leaves ``[start, end)`` is hashed exactly as MTH in RFC 9162 §2.1.1.

Proof generation reads subtree hashes through a callback so that the caller decides where they
come from: :func:`inclusion_proof_from_leaves` and friends hash a list in memory, while a
database-backed log stores the perfect-subtree nodes that :meth:`CompactRange.append` reports
and passes ``range_hasher_from_nodes(lookup)``, which needs O(log n) lookups per range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

RangeHasher = Callable[[int, int], bytes]
"""``(start, end) -> MTH`` of the leaves ``[start, end)``; only ever asked for ranges that are
subtrees of the log (see :func:`range_hasher_from_nodes`)."""

NodeReader = Callable[[int, int], bytes]
"""``(level, index) -> hash`` of the perfect subtree over leaves
``[index << level, (index + 1) << level)``; level 0 is the leaf hashes themselves."""

NodeVisitor = Callable[[int, int, bytes], None]
"""Receives ``(level, index, hash)`` for each perfect-subtree node a :class:`CompactRange`
completes; storing them is what makes :func:`range_hasher_from_nodes` possible."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): where RFC 9162 splits n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


# --- tree hashes ---------------------------------------------------------------------------------


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over all of ``leaf_hashes``, by the recursive definition of RFC 9162 §2.1.1."""
    if not leaf_hashes:
        return EMPTY_ROOT
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def _mth(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    if end - start == 1:
        return leaf_hashes[start]
    mid = start + _split(end - start)
    return node_hash(_mth(leaf_hashes, start, mid), _mth(leaf_hashes, mid, end))


def range_hasher_from_nodes(node: NodeReader) -> RangeHasher:
    """A :data:`RangeHasher` that reads only stored perfect-subtree nodes.

    Every range a proof asks for starts at a multiple of the smallest power of two that covers
    its length, so it splits into at most log2(n) aligned perfect subtrees, largest first (the
    binary digits of its length). Folding them from the right is exactly MTH, because RFC 9162
    always splits off the largest power of two on the left.
    """

    def range_hash(start: int, end: int) -> bytes:
        if not 0 <= start < end:
            raise ValueError(f"empty or negative leaf range [{start}, {end})")
        hashes: list[bytes] = []
        while start < end:
            level = (end - start).bit_length() - 1
            if start & ((1 << level) - 1):
                raise ValueError(f"leaf range starting at {start} is not a subtree of the log")
            hashes.append(node(level, start >> level))
            start += 1 << level
        root = hashes.pop()
        while hashes:
            root = node_hash(hashes.pop(), root)
        return root

    return range_hash


# --- compact range -------------------------------------------------------------------------------


class CompactRange:
    """The right edge of the tree over leaves ``[0, size)``: enough to append and to hash the root.

    It holds one hash per set bit of ``size`` (the perfect subtrees of its binary decomposition,
    largest and leftmost first), so at most 64 hashes for any realistic log, and persists in one
    database row instead of the log re-reading every leaf.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf_hash: bytes, visit: NodeVisitor | None = None) -> None:
        """Add one leaf; ``visit`` sees the leaf and every perfect subtree it completes."""
        if not _is_hash(leaf_hash):
            raise ValueError("a leaf hash is 32 bytes")
        if visit is not None:
            visit(0, self._size, leaf_hash)
        self._push(0, leaf_hash, visit)

    def append_subtree(self, level: int, subtree_hash: bytes) -> None:
        """Add ``2**level`` leaves at once, given the hash of the perfect subtree they form.

        Only where that subtree is one of the log's: the size must be a multiple of its width.
        """
        if not _is_hash(subtree_hash):
            raise ValueError("a subtree hash is 32 bytes")
        if level < 0 or self._size & ((1 << level) - 1):
            raise ValueError(f"a subtree of 2**{level} leaves cannot start at {self._size}")
        self._push(level, subtree_hash, None)

    def _push(self, level: int, merged: bytes, visit: NodeVisitor | None) -> None:
        width = 1 << level
        index = self._size >> level
        # Each trailing 1 bit of the old size is a perfect subtree of the same height as the one
        # being carried; they merge like a binary increment.
        while index & 1:
            merged = node_hash(self._hashes.pop(), merged)
            index >>= 1
            level += 1
            if visit is not None:
                visit(level, index, merged)
        self._hashes.append(merged)
        self._size += width

    def copy(self) -> CompactRange:
        twin = CompactRange()
        twin._size, twin._hashes = self._size, list(self._hashes)
        return twin

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        root = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            root = node_hash(left, root)
        return root

    def to_bytes(self) -> bytes:
        """``size`` as 8 bytes big-endian, then the hashes; the length follows from the size."""
        return self._size.to_bytes(8, "big") + b"".join(self._hashes)

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactRange:
        if len(data) < 8:
            raise ValueError("compact range is shorter than its size field")
        size = int.from_bytes(data[:8], "big")
        body = data[8:]
        if len(body) != size.bit_count() * HASH_SIZE:
            raise ValueError(f"compact range of size {size} has {len(body)} bytes of hashes")
        compact = cls()
        compact._size = size
        compact._hashes = [body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE)]
        return compact


def frontier_from_leaf_hashes(leaf_hashes: Iterable[bytes]) -> CompactRange:
    compact = CompactRange()
    for leaf in leaf_hashes:
        compact.append(leaf)
    return compact


def subtree_levels(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Every complete node over ``leaf_hashes``, level by level: ``levels[k][i]`` is the hash of
    the perfect subtree over leaves ``[i << k, (i + 1) << k)`` of the sequence."""
    sha256 = hashlib.sha256  # node_hash, inline: a verifier hashes millions of these
    levels = [list(leaf_hashes)]
    while len(levels[-1]) > 1:
        below = iter(levels[-1])
        # zip pairs neighbours and leaves out an unpaired last node: it completes nothing.
        pairs = zip(below, below, strict=False)
        levels.append([sha256(b"\x01" + left + right).digest() for left, right in pairs])
    return levels


def covering_subtrees(levels: list[list[bytes]], count: int) -> list[tuple[int, bytes]]:
    """The perfect subtrees, largest first, that together cover the first ``count`` leaves of
    :func:`subtree_levels`: one per set bit of ``count``. They are subtrees of the log, as
    :meth:`CompactRange.append_subtree` needs, when the sequence starts at a multiple of
    ``2**(len(levels) - 1)`` leaves."""
    if not 0 <= count <= len(levels[0]):
        raise ValueError(f"cannot cover {count} of {len(levels[0])} leaves")
    pieces: list[tuple[int, bytes]] = []
    offset = 0
    for level in reversed(range(len(levels))):
        if count - offset >= 1 << level:
            pieces.append((level, levels[level][offset >> level]))
            offset += 1 << level
    return pieces


# --- proof generation (RFC 9162 §2.1.3.1 and §2.1.4.1) --------------------------------------------


def inclusion_proof(index: int, size: int, subtree_hash: RangeHasher) -> list[bytes]:
    """PATH(index, D[size]): sibling hashes from the leaf up to the root."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    start, end = 0, size
    # Walk down from the root; the sibling of each subtree on the path is one proof element.
    while end - start > 1:
        mid = start + _split(end - start)
        if index < mid:
            proof.append(subtree_hash(mid, end))
            end = mid
        else:
            proof.append(subtree_hash(start, mid))
            start = mid
    proof.reverse()
    return proof


def consistency_proof(old_size: int, new_size: int, subtree_hash: RangeHasher) -> list[bytes]:
    """PROOF(old_size, D[new_size]): empty when there is nothing to prove (old size 0 or equal)."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    start, end = 0, new_size
    # SUBPROOF's flag b: while the old tree is still the whole left part, the verifier already
    # has its hash (the old root), so it is left out of the proof.
    old_tree_is_whole = True
    while end != old_size:
        mid = start + _split(end - start)
        if old_size <= mid:
            proof.append(subtree_hash(mid, end))
            end = mid
        else:
            proof.append(subtree_hash(start, mid))
            start = mid
            old_tree_is_whole = False
    if not old_tree_is_whole:
        proof.append(subtree_hash(start, end))
    proof.reverse()
    return proof


def inclusion_proof_from_leaves(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Inclusion proof for ``index`` in the tree over all of ``leaf_hashes``."""
    return inclusion_proof(index, len(leaf_hashes), lambda s, e: _mth(leaf_hashes, s, e))


def consistency_proof_from_leaves(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Consistency proof from size ``old_size`` to the tree over all of ``leaf_hashes``."""
    return consistency_proof(old_size, len(leaf_hashes), lambda s, e: _mth(leaf_hashes, s, e))


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) ------------------------------------------------


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    if not (0 <= index < size and _is_hash(leaf_hash) and _is_hash(root)):
        return False
    if not all(_is_hash(p) for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2 for 0 < old_size < new_size, plus the cases it leaves out.

    Equal sizes are consistent with an empty proof and equal roots. The empty tree precedes
    every tree, but only under its one true root: a checkpoint claiming size 0 with any other
    root is itself evidence of a misbehaving log.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and all(_is_hash(p) for p in proof)):
        return False
    if not 0 <= old_size <= new_size:
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT and (new_size > 0 or new_root == EMPTY_ROOT)
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        # The old tree is a perfect left subtree of the new one: its root starts the path.
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0

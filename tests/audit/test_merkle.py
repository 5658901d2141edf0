from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_proof,
    consistency_proof_from_leaves,
    frontier_from_leaf_hashes,
    inclusion_proof,
    inclusion_proof_from_leaves,
    leaf_hash,
    node_hash,
    range_hasher_from_nodes,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# Known answers from github.com/transparency-dev/merkle (Apache-2.0): the leaf inputs, node
# hashes, roots and compact trees of testonly/constants.go, and the proofs of proof/verify_test.go
# (whose leaf numbers are 1-based; the indexes below are 0-based). Those vectors descend from
# the RFC 6962 tests of google/certificate-transparency.
LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
NODE_HASHES = [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]
ROOTS = [  # indexed by tree size
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
COMPACT_RANGES = [  # (level, index) of each node on the right edge, per tree size
    [],
    [(0, 0)],
    [(1, 0)],
    [(1, 0), (0, 2)],
    [(2, 0)],
    [(2, 0), (0, 4)],
    [(2, 0), (1, 2)],
    [(2, 0), (1, 2), (0, 6)],
    [(3, 0)],
]
INCLUSION_PROOFS = [  # (index, size, proof)
    (0, 8, ["96a296d2", "5f083f0a", "6b47aaf2"]),
    (5, 8, ["bc1a0643", "ca854ea1", "d37ee418"]),
    (2, 3, ["fac54203"]),
    (1, 5, ["6e340b9c", "5f083f0a", "bc1a0643"]),
]
CONSISTENCY_PROOFS = [  # (old size, new size, proof)
    (1, 8, ["96a296d2", "5f083f0a", "6b47aaf2"]),
    (6, 8, ["0ebc5d34", "ca854ea1", "d37ee418"]),
    (2, 5, ["5f083f0a", "bc1a0643"]),
    (6, 7, ["0ebc5d34", "b08693ec", "d37ee418"]),
]
LEAF_HASHES = [leaf_hash(data) for data in LEAF_INPUTS]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def node(level: int, index: int) -> bytes:
    return bytes.fromhex(NODE_HASHES[level][index])


def root(size: int) -> bytes:
    return bytes.fromhex(ROOTS[size])


def expand(prefixes: list[str]) -> list[bytes]:
    """The vectors above abbreviate proof hashes; every one of them is a node of the 8-leaf tree."""
    by_prefix = {h[:8]: bytes.fromhex(h) for level in NODE_HASHES for h in level}
    return [by_prefix[p] for p in prefixes]


def leaves(count: int, seed: int = 0) -> list[bytes]:
    return [leaf_hash(f"entry {seed}/{i}".encode()) for i in range(count)]


def flip(h: bytes, bit: int) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


# --- corrupted proofs, after corruptInclusionProof / corruptConsistencyProof in transparency-dev


def inclusion_probes(
    index: int, size: int, proof: list[bytes], root_hash: bytes, leaf: bytes
) -> Iterator[tuple[str, tuple[bytes, int, int, list[bytes], bytes]]]:
    yield "index - 1", (leaf, index - 1, size, proof, root_hash)
    yield "index + 1", (leaf, index + 1, size, proof, root_hash)
    yield "index ^ 2", (leaf, index ^ 2, size, proof, root_hash)
    yield "size * 2", (leaf, index, size * 2, proof, root_hash)
    yield "size // 2", (leaf, index, size // 2, proof, root_hash)
    yield "wrong leaf", (flip(leaf, 0), index, size, proof, root_hash)
    yield "short leaf", (b"WrongLeaf", index, size, proof, root_hash)
    yield "empty root", (leaf, index, size, proof, EMPTY_ROOT)
    yield "some root", (leaf, index, size, proof, SOME_HASH)
    yield "trailing garbage", (leaf, index, size, [*proof, b""], root_hash)
    yield "trailing root", (leaf, index, size, [*proof, root_hash], root_hash)
    yield "preceding garbage", (leaf, index, size, [b"", *proof], root_hash)
    yield "preceding root", (leaf, index, size, [root_hash, *proof], root_hash)
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = flip(wrong[i], 3)
        yield f"proof[{i}] bit 3", (leaf, index, size, wrong, root_hash)
    if proof:
        yield "removed component", (leaf, index, size, proof[:-1], root_hash)
    if len(proof) > 1:
        yield (
            "inserted component",
            (leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root_hash),
        )


def consistency_probes(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> Iterator[tuple[str, tuple[int, int, bytes, bytes, list[bytes]]]]:
    yield "old size - 1", (old_size - 1, new_size, old_root, new_root, proof)
    yield "old size + 1", (old_size + 1, new_size, old_root, new_root, proof)
    yield "old size ^ 2", (old_size ^ 2, new_size, old_root, new_root, proof)
    yield "new size * 2", (old_size, new_size * 2, old_root, new_root, proof)
    yield "new size // 2", (old_size, new_size // 2, old_root, new_root, proof)
    yield "wrong old root", (old_size, new_size, flip(old_root, 0), new_root, proof)
    yield "wrong new root", (old_size, new_size, old_root, flip(new_root, 0), proof)
    yield "swapped roots", (old_size, new_size, new_root, old_root, proof)
    yield "empty proof", (old_size, new_size, old_root, new_root, [])
    yield "trailing garbage", (old_size, new_size, old_root, new_root, [*proof, b""])
    yield "trailing old root", (old_size, new_size, old_root, new_root, [*proof, old_root])
    yield "trailing new root", (old_size, new_size, old_root, new_root, [*proof, new_root])
    yield "preceding garbage", (old_size, new_size, old_root, new_root, [b"", *proof])
    yield "preceding old root", (old_size, new_size, old_root, new_root, [old_root, *proof])
    yield "preceding new root", (old_size, new_size, old_root, new_root, [new_root, *proof])
    yield "preceding proof[0]", (old_size, new_size, old_root, new_root, [proof[0], *proof])
    yield "truncated proof", (old_size, new_size, old_root, new_root, proof[:-1])
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = flip(wrong[i], 4)
        yield f"proof[{i}] bit 4", (old_size, new_size, old_root, new_root, wrong)


def check_inclusion(
    index: int, size: int, proof: list[bytes], root_hash: bytes, leaf: bytes
) -> None:
    assert verify_inclusion(leaf, index, size, proof, root_hash)
    accepted = [
        d
        for d, args in inclusion_probes(index, size, proof, root_hash, leaf)
        if verify_inclusion(*args)
    ]
    assert accepted == []


def check_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> None:
    assert verify_consistency(old_size, new_size, old_root, new_root, proof)
    if not proof:  # the trivial cases have their own tests
        return
    probes = consistency_probes(old_size, new_size, old_root, new_root, proof)
    assert [d for d, args in probes if verify_consistency(*args)] == []


# --- known answers -------------------------------------------------------------------------------


def test_hashes_match_the_reference_tree() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT == root(0)
    for index, leaf in enumerate(LEAF_HASHES):
        assert leaf == node(0, index)
    for level in range(1, 4):
        for index in range(len(NODE_HASHES[level])):
            children = node(level - 1, 2 * index), node(level - 1, 2 * index + 1)
            assert node_hash(*children) == node(level, index)


@pytest.mark.parametrize("size", range(9))
def test_root_known_answers(size: int) -> None:
    assert root_from_leaf_hashes(LEAF_HASHES[:size]) == root(size)
    compact = frontier_from_leaf_hashes(LEAF_HASHES[:size])
    assert compact.size == size
    assert compact.root() == root(size)
    assert compact.hashes == tuple(node(level, i) for level, i in COMPACT_RANGES[size])


@pytest.mark.parametrize(("index", "size", "expected"), INCLUSION_PROOFS)
def test_inclusion_proof_known_answers(index: int, size: int, expected: list[str]) -> None:
    proof = inclusion_proof_from_leaves(index, LEAF_HASHES[:size])
    assert proof == expand(expected)
    check_inclusion(index, size, proof, root(size), LEAF_HASHES[index])


@pytest.mark.parametrize(("old_size", "new_size", "expected"), CONSISTENCY_PROOFS)
def test_consistency_proof_known_answers(old_size: int, new_size: int, expected: list[str]) -> None:
    proof = consistency_proof_from_leaves(old_size, LEAF_HASHES[:new_size])
    assert proof == expand(expected)
    check_consistency(old_size, new_size, root(old_size), root(new_size), proof)


# --- edge cases ----------------------------------------------------------------------------------


def test_single_leaf_tree() -> None:
    leaf = leaf_hash(b"data")
    assert root_from_leaf_hashes([leaf]) == leaf
    assert inclusion_proof_from_leaves(0, [leaf]) == []
    assert verify_inclusion(leaf, 0, 1, [], leaf)
    assert not verify_inclusion(leaf, 0, 1, [], b"")
    assert not verify_inclusion(b"", 0, 1, [], leaf)
    assert not verify_inclusion(b"", 0, 1, [], b"")


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (-1, 1)])
def test_inclusion_of_a_leaf_outside_the_tree_fails(index: int, size: int) -> None:
    for leaf, root_hash in [(SOME_HASH, EMPTY_ROOT), (SOME_HASH, SOME_HASH), (EMPTY_ROOT, b"")]:
        assert not verify_inclusion(leaf, index, size, [], root_hash)
    with pytest.raises(ValueError, match="not in a tree"):
        inclusion_proof(index, size, lambda s, e: EMPTY_ROOT)


R1, R2 = leaf_hash(b"one"), leaf_hash(b"two")


@pytest.mark.parametrize(
    ("old_size", "new_size", "old_root", "new_root", "proof", "valid"),
    [
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [], True),
        (0, 1, EMPTY_ROOT, R2, [], True),
        (1, 1, R1, R1, [], True),
        (5, 5, R1, R1, [], True),
        # The empty tree has one root only.
        (0, 0, R1, R1, [], False),
        (0, 1, R1, R2, [], False),
        (0, 0, EMPTY_ROOT, R1, [], False),
        # Same size, different roots: a fork.
        (1, 1, R1, R2, [], False),
        # Time travel to the past.
        (1, 0, R1, R2, [], False),
        (2, 1, R1, R2, [], False),
        (-1, 1, R1, R2, [], False),
        # Nothing to prove, but a proof anyway.
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),
        (0, 1, EMPTY_ROOT, R2, [EMPTY_ROOT], False),
        (1, 1, R1, R1, [EMPTY_ROOT], False),
        # Something to prove and no proof.
        (1, 2, R1, R2, [], False),
        # Hashes of the wrong length.
        (1, 1, b"", b"", [], False),
        (1, 1, R1 + b"\x00", R1 + b"\x00", [], False),
    ],
)
def test_consistency_edge_cases(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes], valid: bool
) -> None:
    assert verify_consistency(old_size, new_size, old_root, new_root, proof) is valid


@pytest.mark.parametrize(("old_size", "new_size"), [(-1, 3), (4, 3)])
def test_consistency_proof_refuses_impossible_sizes(old_size: int, new_size: int) -> None:
    with pytest.raises(ValueError, match="no consistency proof"):
        consistency_proof(old_size, new_size, lambda s, e: EMPTY_ROOT)


def test_consistency_proof_of_nothing_is_empty() -> None:
    assert consistency_proof_from_leaves(0, LEAF_HASHES) == []
    assert consistency_proof_from_leaves(8, LEAF_HASHES) == []


# --- exhaustive over small trees -----------------------------------------------------------------

SMALL = leaves(64, seed=1)
SMALL_ROOTS = [root_from_leaf_hashes(SMALL[:n]) for n in range(len(SMALL) + 1)]


def test_every_inclusion_proof_in_small_trees_verifies() -> None:
    for size in range(1, len(SMALL) + 1):
        for index in range(size):
            proof = inclusion_proof_from_leaves(index, SMALL[:size])
            assert len(proof) <= (size - 1).bit_length()
            assert verify_inclusion(SMALL[index], index, size, proof, SMALL_ROOTS[size])
            assert not verify_inclusion(SMALL[index], index, size, proof, SMALL_ROOTS[size - 1])


def test_every_consistency_proof_in_small_trees_verifies() -> None:
    for new_size in range(len(SMALL) + 1):
        for old_size in range(new_size + 1):
            proof = consistency_proof_from_leaves(old_size, SMALL[:new_size])
            old_root, new_root = SMALL_ROOTS[old_size], SMALL_ROOTS[new_size]
            assert verify_consistency(old_size, new_size, old_root, new_root, proof)
            if old_size < new_size:
                assert not verify_consistency(old_size, new_size, new_root, new_root, proof)


def test_compact_range_root_is_mth_at_every_size() -> None:
    hashes = leaves(300, seed=2)
    compact = CompactRange()
    assert compact.root() == EMPTY_ROOT
    for size, leaf in enumerate(hashes, start=1):
        compact.append(leaf)
        assert compact.size == size
        assert len(compact.hashes) == size.bit_count()
        assert compact.root() == root_from_leaf_hashes(hashes[:size])
        assert CompactRange.from_bytes(compact.to_bytes()).to_bytes() == compact.to_bytes()


def test_proofs_from_stored_nodes_match_proofs_from_leaves() -> None:
    """What the database-backed log does: keep the nodes append reports, prove from them."""
    hashes = leaves(100, seed=3)
    stored: dict[tuple[int, int], bytes] = {}
    compact = CompactRange()
    for leaf in hashes:
        compact.append(leaf, lambda level, index, h: stored.__setitem__((level, index), h))
    # Every perfect subtree is stored once, never overwritten: 2n - popcount(n) nodes.
    assert len(stored) == 2 * len(hashes) - len(hashes).bit_count()
    lookups: list[tuple[int, int]] = []

    def lookup(level: int, index: int) -> bytes:
        lookups.append((level, index))
        return stored[level, index]

    from_nodes = range_hasher_from_nodes(lookup)
    for size in range(1, len(hashes) + 1):
        for index in range(size):
            assert inclusion_proof(index, size, from_nodes) == inclusion_proof_from_leaves(
                index, hashes[:size]
            )
        for old_size in range(size + 1):
            lookups.clear()
            proof = consistency_proof(old_size, size, from_nodes)
            assert proof == consistency_proof_from_leaves(old_size, hashes[:size])
            assert len(lookups) <= 2 * size.bit_length() ** 2  # O(log^2 n), never O(n)
    assert from_nodes(0, len(hashes)) == root_from_leaf_hashes(hashes)


@pytest.mark.parametrize(("start", "end"), [(1, 3), (2, 6), (0, 0), (5, 4), (-1, 1)])
def test_range_hasher_refuses_ranges_that_are_not_subtrees(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="range"):
        range_hasher_from_nodes(lambda level, index: EMPTY_ROOT)(start, end)


# --- compact range serialisation -----------------------------------------------------------------


def test_compact_range_round_trip_keeps_growing_identically() -> None:
    hashes = leaves(77, seed=4)
    compact = frontier_from_leaf_hashes(hashes[:45])
    data = compact.to_bytes()
    assert len(data) == 8 + (45).bit_count() * 32
    restored = CompactRange.from_bytes(data)
    for leaf in hashes[45:]:
        compact.append(leaf)
        restored.append(leaf)
    assert restored.to_bytes() == compact.to_bytes()
    assert restored.root() == root_from_leaf_hashes(hashes)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        (1).to_bytes(8, "big"),
        (1).to_bytes(8, "big") + b"\x00" * 31,
        (1).to_bytes(8, "big") + b"\x00" * 64,
        (0).to_bytes(8, "big") + b"\x00" * 32,
        (3).to_bytes(8, "big") + b"\x00" * 32,
    ],
)
def test_compact_range_from_bytes_refuses_wrong_lengths(data: bytes) -> None:
    with pytest.raises(ValueError, match="compact range"):
        CompactRange.from_bytes(data)


def test_compact_range_refuses_a_leaf_that_is_not_a_hash() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CompactRange().append(b"entry")


# --- properties over larger trees ----------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, database=None)


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int]:
    size = draw(st.integers(min_value=1, max_value=300))
    return leaves(size, seed=draw(st.integers(0, 2**16))), draw(st.integers(0, size - 1))


@st.composite
def tree_and_old_size(draw: st.DrawFn) -> tuple[list[bytes], int]:
    size = draw(st.integers(min_value=2, max_value=300))
    return leaves(size, seed=draw(st.integers(0, 2**16))), draw(st.integers(1, size - 1))


@PROPERTY_SETTINGS
@given(tree_and_index())
def test_inclusion_proofs_verify_and_corruptions_fail(case: tuple[list[bytes], int]) -> None:
    hashes, index = case
    proof = inclusion_proof_from_leaves(index, hashes)
    check_inclusion(index, len(hashes), proof, root_from_leaf_hashes(hashes), hashes[index])


@PROPERTY_SETTINGS
@given(tree_and_old_size())
def test_consistency_proofs_verify_and_corruptions_fail(case: tuple[list[bytes], int]) -> None:
    hashes, old_size = case
    proof = consistency_proof_from_leaves(old_size, hashes)
    old_root = frontier_from_leaf_hashes(hashes[:old_size]).root()
    check_consistency(old_size, len(hashes), old_root, root_from_leaf_hashes(hashes), proof)


@PROPERTY_SETTINGS
@given(tree_and_old_size())
def test_a_rewritten_history_is_not_consistent(case: tuple[list[bytes], int]) -> None:
    hashes, old_size = case
    forged = [*hashes[: old_size - 1], leaf_hash(b"forged"), *hashes[old_size:]]
    proof = consistency_proof_from_leaves(old_size, forged)
    old_root = root_from_leaf_hashes(hashes[:old_size])
    assert not verify_consistency(
        old_size, len(forged), old_root, root_from_leaf_hashes(forged), proof
    )


@PROPERTY_SETTINGS
@given(st.integers(0, 2**70), st.integers(0, 300))
def test_compact_range_serialisation_round_trips(size_bits: int, count: int) -> None:
    compact = frontier_from_leaf_hashes(leaves(count, seed=size_bits % 97))
    restored = CompactRange.from_bytes(compact.to_bytes())
    assert (restored.size, restored.hashes, restored.root()) == (
        compact.size,
        compact.hashes,
        compact.root(),
    )
    # Any size decodes, up to 2**64 - 1, as long as the hash count matches it.
    size = size_bits % 2**64
    data = size.to_bytes(8, "big") + bytes(32) * size.bit_count()
    assert CompactRange.from_bytes(data).size == size


hashes_or_junk = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40))


@PROPERTY_SETTINGS
@given(
    st.integers(-5, 2**64),
    st.integers(-5, 2**64),
    hashes_or_junk,
    hashes_or_junk,
    st.lists(hashes_or_junk, max_size=70),
)
def test_verification_never_raises(
    a: int, b: int, h1: bytes, h2: bytes, proof: list[bytes]
) -> None:
    assert verify_inclusion(h1, a, b, proof, h2) in (True, False)
    assert verify_consistency(a, b, h1, h2, proof) in (True, False)


def test_proof_elements_that_are_not_bytes_fail_cleanly() -> None:
    """What a careless JSON decode hands over: hex strings instead of bytes."""
    proof = [h.hex() for h in inclusion_proof_from_leaves(0, LEAF_HASHES)]
    assert not verify_inclusion(LEAF_HASHES[0], 0, 8, proof, root(8))  # type: ignore[arg-type]
    consistency = [h.hex() for h in consistency_proof_from_leaves(6, LEAF_HASHES)]
    assert not verify_consistency(6, 8, root(6), root(8), consistency)  # type: ignore[arg-type]

"""Where the envelope's randomness comes from.

Production draws everything from libsodium. Test vectors need the same construction with
fixed randomness, so the sealer takes a `Randomness` and the vectors pass a seeded one.
The deterministic variant is built from the same primitives (BLAKE2b as a PRF over a
seed), never used outside tests and vectors.
"""

from __future__ import annotations

from typing import Protocol

import nacl.utils
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import PrivateKey


class Randomness(Protocol):
    def token(self, size: int) -> bytes:
        """Fresh random bytes: content keys and message ids."""

    def ephemeral_key(self) -> PrivateKey | None:
        """The sealed box's ephemeral key; None lets libsodium pick it."""

    def stream_header(self) -> bytes | None:
        """A secretstream header; None lets libsodium pick it."""


class SystemRandomness:
    def token(self, size: int) -> bytes:
        return bytes(nacl.utils.random(size))

    def ephemeral_key(self) -> PrivateKey | None:
        return None

    def stream_header(self) -> bytes | None:
        return None


class SeededRandomness:
    """Reproducible randomness for test vectors: BLAKE2b(seed, counter)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def _next(self, size: int) -> bytes:
        self._counter += 1
        return bytes(
            blake2b(
                self._counter.to_bytes(8, "big"),
                digest_size=size,
                key=self._seed,
                person=b"entraide:rand:v1",
                encoder=RawEncoder,
            )
        )

    def token(self, size: int) -> bytes:
        return self._next(size)

    def ephemeral_key(self) -> PrivateKey | None:
        return PrivateKey.from_seed(self._next(32))

    def stream_header(self) -> bytes | None:
        return self._next(24)

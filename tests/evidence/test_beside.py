"""Hashes and flushes that run beside the cipher (app/evidence/beside.py): same results, in
order, with at most one buffer held per hash, and nothing left running on a closed file."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from app.evidence import beside, blobstore
from app.evidence.beside import BESIDE_MIN_BYTES, BesideHash
from app.evidence.blobstore import DROP_BEHIND_BYTES, DirectoryBlobStore


def _pieces(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, BESIDE_MIN_BYTES - 1, BESIDE_MIN_BYTES, 1 << 20, 3, (1 << 20) + 7]
    sizes += [rng.choice([rng.randrange(1, 4096), rng.randrange(1, 2 << 20)]) for _ in range(40)]
    return [rng.randbytes(size) for size in sizes]


def test_the_digest_is_hashlibs_whatever_the_sizes_and_order() -> None:
    pieces = _pieces(1)
    expected = hashlib.sha256(b"".join(pieces)).hexdigest()
    digest = BesideHash()
    for piece in pieces:  # small pieces hashed here, large ones in a helper, in order
        digest.update(piece)
    assert digest.hexdigest() == expected
    assert digest.hexdigest() == expected  # idempotent, like hashlib's


def test_many_hashes_at_once_more_than_the_pool_has_threads() -> None:
    # More hashers than helper threads, each fed from its own thread: each must still see
    # its own updates in order, and none may wait forever for a busy pool.
    jobs = [_pieces(seed) for seed in range(3 * beside.POOL_THREADS)]

    def run(pieces: list[bytes]) -> bool:
        digest = BesideHash()
        for piece in pieces:
            digest.update(piece)
        return digest.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()

    with ThreadPoolExecutor(len(jobs)) as callers:
        assert all(callers.map(run, jobs, timeout=120))


def test_a_hash_holds_at_most_one_buffer_beyond_its_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    # A helper that is slow to hash: update must wait for the previous one, not queue them.
    release = threading.Event()
    in_flight = 0
    most = 0
    lock = threading.Lock()
    real = beside.run_beside

    def slow(task: Callable[[], None]) -> Future[None]:
        def wrapped() -> None:
            nonlocal in_flight, most
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            release.wait(0.01)
            task()
            with lock:
                in_flight -= 1

        return real(wrapped)

    monkeypatch.setattr(beside, "run_beside", slow)
    digest = BesideHash()
    data = os.urandom(BESIDE_MIN_BYTES)
    for _ in range(20):
        digest.update(data)
    assert digest.hexdigest() == hashlib.sha256(data * 20).hexdigest()
    assert most == 1


def test_uploads_flush_beside_the_writer_and_close_after_the_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DirectoryBlobStore(tmp_path)
    flushed: list[int] = []
    real = blobstore._flush_behind

    def counting(fd: int) -> None:
        real(fd)
        flushed.append(fd)

    chunk = os.urandom(1 << 20)
    count = 2 * DROP_BEHIND_BYTES // len(chunk) + 3
    monkeypatch.setattr(blobstore, "_flush_behind", counting)
    upload = store.upload("flushing")
    for _ in range(count):
        upload.write(chunk)
    upload.sync()  # waits for the flush in flight, then makes everything durable
    assert len(flushed) == 2
    upload.truncate(len(chunk))  # never races a flush of the same descriptor
    upload.write(chunk)
    upload.close()
    assert (store.uploads / "flushing").read_bytes() == chunk * 2


def test_a_failed_flush_is_raised_to_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blobstore, "_flush_behind", failing)
    upload = DirectoryBlobStore(tmp_path).upload("failing1")
    chunk = os.urandom(1 << 20)

    def write_three_windows() -> None:
        for _ in range(3 * DROP_BEHIND_BYTES // len(chunk)):
            upload.write(chunk)

    with pytest.raises(OSError, match="Input/output"):
        write_three_windows()
    upload.close()

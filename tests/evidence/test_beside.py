"""Hashes and flushes that run beside the cipher (app/evidence/beside.py): same results, in
order, with at most one buffer held per hash, nothing done to a file while its flush runs, a
failed flush never taken for durable, and a writer or receiver that failed never reused."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nacl.bindings as sodium
import pytest

from app.crypto.envelope import CHUNK_BYTES, EnvelopeError
from app.evidence import beside, blobstore
from app.evidence.beside import BESIDE_MIN_BYTES, BesideHash
from app.evidence.blobstore import DROP_BEHIND_BYTES, BlobError, DirectoryBlobStore, UploadBusy
from app.evidence.drafts import UploadTarget, WriterCache
from app.evidence.stream import CIPHER_CHUNK, PartReceiver, PartWriter, encrypt_stream


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
    jobs = [_pieces(seed) for seed in range(3 * beside.HASH_THREADS)]

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


def test_uploads_flush_beside_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DirectoryBlobStore(tmp_path)
    flushed: list[int] = []
    real = blobstore._flush_behind

    def counting(fd: int) -> None:
        real(fd)
        flushed.append(fd)

    monkeypatch.setattr(blobstore, "_flush_behind", counting)
    chunk = os.urandom(1 << 20)
    upload = store.upload("flushing")
    for _ in range(2 * DROP_BEHIND_BYTES // len(chunk) + 3):
        upload.write(chunk)
    upload.sync()
    upload.close()
    assert len(flushed) == 2
    assert (store.uploads / "flushing").stat().st_size == 2 * DROP_BEHIND_BYTES + 3 * len(chunk)


def _blocked_flush(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    started, release = threading.Event(), threading.Event()
    real = blobstore._flush_behind

    def blocked(fd: int) -> None:
        started.set()
        release.wait(30)
        real(fd)

    monkeypatch.setattr(blobstore, "_flush_behind", blocked)
    return started, release


def _one_window(upload: blobstore.DirectoryUpload) -> None:
    chunk = os.urandom(1 << 20)
    for _ in range(DROP_BEHIND_BYTES // len(chunk)):
        upload.write(chunk)


@pytest.mark.parametrize("step", ["close", "truncate", "sync", "next window"])
def test_nothing_touches_the_file_while_its_flush_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    started, release = _blocked_flush(monkeypatch)
    upload = DirectoryBlobStore(tmp_path).upload("blocked1")
    _one_window(upload)  # its flush now waits for `release`
    assert started.wait(10)
    actions = {
        "close": upload.close,
        "truncate": lambda: upload.truncate(1 << 20),
        "sync": upload.sync,
        "next window": lambda: _one_window(upload),
    }
    waiting = threading.Thread(target=actions[step])
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # it waits for the flush in flight ...
    assert not upload._file.closed  # ... with the descriptor still open
    release.set()
    waiting.join(10)
    assert not waiting.is_alive()
    upload.close()


def test_a_failed_flush_is_raised_before_anything_more_is_written_and_stays_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blobstore, "_flush_behind", failing)
    store = DirectoryBlobStore(tmp_path)
    upload = store.upload("failing1")
    _one_window(upload)  # the first window's flush fails in its helper thread
    with pytest.raises(BlobError) as raised:
        _one_window(upload)
    assert isinstance(raised.value.__cause__, OSError)
    # Raised before the chunk that would have started the next flush was appended, at the
    # latest; and every later write and sync raises it again: never taken for durable.
    assert (store.uploads / "failing1").stat().st_size < 2 * DROP_BEHIND_BYTES
    with pytest.raises(BlobError):
        upload.write(b"more")
    with pytest.raises(BlobError):
        upload.sync()
    upload.close()  # cleanup does not raise it: the error was reported already


def _writer_one_chunk_in(
    tmp_path: Path, upload_id: str
) -> tuple[DirectoryBlobStore, UploadTarget, WriterCache, PartWriter, bytes]:
    """A cached writer for a three-chunk upload, with its first chunk written."""
    store = DirectoryBlobStore(tmp_path)
    size = 3 * CHUNK_BYTES
    target = UploadTarget(
        draft_id="d",
        index=1,
        size=size,
        upload_id=upload_id,
        key=bytes(32),
        ad=b"ad",
        stream_header=bytes(24),
        complete=False,
    )
    cache = WriterCache()
    writer = cache.take(store, target)
    data = os.urandom(size)
    writer.write(data[:CHUNK_BYTES])
    return store, target, cache, writer, data


def test_a_writer_whose_push_failed_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, target, cache, writer, data = _writer_one_chunk_in(tmp_path, "upload-broken")
    upload = writer._upload
    assert isinstance(upload, blobstore.DirectoryUpload)

    def disk_full(chunk: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(upload, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        writer.write(data[CHUNK_BYTES : 2 * CHUNK_BYTES])  # pushed, then not stored
    assert writer.broken
    with pytest.raises(RuntimeError):
        writer.write(b"x")
    cache.put_back(target.upload_id, writer)  # closed, not kept
    monkeypatch.undo()
    again = cache.take(store, target)  # rebuilt from the one stored chunk
    assert again is not writer
    assert again.durable_offset == CHUNK_BYTES
    again.write(data[CHUNK_BYTES:])
    finished = again.finalise(store)
    assert finished.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    cache.close()


def test_a_writer_whose_checkpoint_failed_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, target, cache, writer, data = _writer_one_chunk_in(tmp_path, "upload-unsynced")

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(BlobError):
        writer.checkpoint()
    monkeypatch.undo()
    assert writer.broken
    cache.put_back(target.upload_id, writer)  # closed, not kept
    again = cache.take(store, target)  # rebuilt from what the file holds
    assert again is not writer
    again.write(data[again.durable_offset :])
    finished = again.finalise(store)
    assert finished.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    cache.close()


def _receiving(tmp_path: Path) -> tuple[PartReceiver, bytes, bytes]:
    """A receiver for a two-chunk part, the part's ciphertext, and its stream's key."""
    store = DirectoryBlobStore(tmp_path)
    key, ad, stream_header = bytes(range(32)), b"ad", bytes(24)
    plain = os.urandom(2 * CHUNK_BYTES)
    sealed = DirectoryBlobStore(tmp_path / "sender")
    part = encrypt_stream(
        sealed, "sealing1", [plain], key=key, ad=ad, stream_header=stream_header, size=len(plain)
    )
    with sealed.open(part.digest) as blob:
        ciphertext = blob.read()
    receiver = PartReceiver.open(
        store,
        "receiving1",
        key=key,
        ad=ad,
        stream_header=stream_header,
        length=part.length,
        sha256=part.digest,
        plaintext_size=len(plain),
        plaintext_sha256=part.plaintext_sha256,
    )
    return receiver, ciphertext, key


def test_a_chunk_that_does_not_open_leaves_the_receiver_as_it_was(tmp_path: Path) -> None:
    """Anyone who knows a transfer's msg_id can send a bad chunk: the receiver goes on from
    where it was (its state, both hashes), with no rebuild from the stored chunks."""
    receiver, ciphertext, _ = _receiving(tmp_path)
    receiver.write(ciphertext[:CIPHER_CHUNK])
    for bad in (bytes(CIPHER_CHUNK), _flipped(ciphertext[CIPHER_CHUNK:], 100)):
        with pytest.raises(EnvelopeError) as refused:
            receiver.write(bad)
        assert refused.value.code == "decrypt_failed"
        assert not receiver.failed
        receiver.drop_pending()
        assert receiver.stored_matches()
        assert receiver.durable_offset == CIPHER_CHUNK
    receiver.write(ciphertext[CIPHER_CHUNK:])  # the hashes check out at the part's end
    assert receiver.complete
    receiver.close()


def test_a_chunk_that_opens_with_the_wrong_tag_ends_the_receiver(tmp_path: Path) -> None:
    """Only the content key's holder can make one; the stream state has moved on, so the
    receiver is never used again and the part resumes from what is stored."""
    receiver, ciphertext, key = _receiving(tmp_path)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, bytes(24), key)
    early_end = sodium.crypto_secretstream_xchacha20poly1305_push(
        state, bytes(CHUNK_BYTES), b"ad", sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
    )
    with pytest.raises(EnvelopeError):
        receiver.write(early_end)
    assert receiver.failed
    assert not receiver.stored_matches()
    assert receiver.durable_offset == 0
    with pytest.raises(RuntimeError):
        receiver.write(ciphertext[:CIPHER_CHUNK])
    receiver.close()
    staged = DirectoryBlobStore(tmp_path).uploads / "receiving1"
    assert staged.stat().st_size == 0  # nothing of it stored


def _flipped(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 1
    return bytes(changed)


def test_an_upload_resumes_through_another_replica_and_back(tmp_path: Path) -> None:
    """Two server processes (two caches) behind one address: a client's PATCH requests may
    reach either. Between requests a cached writer holds no lock, and one that finds the
    staging file written by the other since rebuilds from it."""
    store, target, first, writer, data = _writer_one_chunk_in(tmp_path, "upload-replicas")
    assert writer.checkpoint() == CHUNK_BYTES
    first.put_back(target.upload_id, writer)
    second = WriterCache()  # the other replica
    other = second.take(store, target)  # was UploadBusy for as long as the first kept it
    assert other.durable_offset == CHUNK_BYTES
    other.write(data[CHUNK_BYTES : 2 * CHUNK_BYTES])
    assert other.checkpoint() == 2 * CHUNK_BYTES
    with pytest.raises(UploadBusy):  # while a request writes it, nobody else does
        WriterCache().take(store, target)
    second.put_back(target.upload_id, other)
    back = first.take(store, target)  # its old writer is stale: rebuilt from the file
    assert back.durable_offset == 2 * CHUNK_BYTES
    back.write(data[2 * CHUNK_BYTES :])
    finished = back.finalise(store)
    assert finished.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    first.close()
    second.close()


def test_a_hash_forgets_its_last_update_small_or_beside() -> None:
    for size in (10, BESIDE_MIN_BYTES, 3 * BESIDE_MIN_BYTES):
        digest = BesideHash()
        digest.update(b"kept" * size)
        digest.update(os.urandom(size))
        digest.undo_last()
        assert digest.hexdigest() == hashlib.sha256(b"kept" * size).hexdigest()
        with pytest.raises(RuntimeError):
            digest.undo_last()  # one update back, not two

"""The directory blob store: atomic publication, content addresses, orphan cleanup."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from app.evidence import blobstore
from app.evidence.blobstore import (
    BlobError,
    DirectoryBlobStore,
    StorageFailed,
    UploadBusy,
    blob_root,
)


def test_upload_is_invisible_until_finalised(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path)
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest()
    upload = store.upload("abcdefgh")
    upload.write(data[:1000])
    upload.sync()
    assert not store.exists(digest)
    with pytest.raises(UploadBusy):
        store.upload("abcdefgh")  # one writer at a time
    assert (store.uploads / "abcdefgh").stat().st_size == 1000
    upload.write(data[1000:])
    store.finalise(upload, digest)
    assert store.exists(digest)
    assert not store.upload_exists("abcdefgh")
    assert store.size(digest) == 3000
    with store.open(digest) as blob:
        assert blob.read() == data
    store.delete(digest)
    assert not store.exists(digest)
    with pytest.raises(BlobError):
        store.open(digest)


@pytest.mark.parametrize("meanwhile", ["finalised", "discarded"])
def test_a_writer_that_locks_a_file_no_longer_the_upload_gives_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """A retry opens the upload while the first writer holds it, and gets the lock only
    after that writer published the file as a blob: it must not take (and cut back) the
    published blob for the upload."""
    store = DirectoryBlobStore(tmp_path)
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest()
    first = store.upload("abcdefgh")
    first.write(data)
    real_flock = blobstore.fcntl.flock
    opened, go = threading.Event(), threading.Event()

    def flock_after_the_first_writer(fd: int, operation: int) -> None:
        if threading.current_thread().name == "retry" and operation & fcntl.LOCK_EX:
            opened.set()  # opened; preempted before the lock
            go.wait(10)
        real_flock(fd, operation)

    monkeypatch.setattr(blobstore.fcntl, "flock", flock_after_the_first_writer)
    outcome: list[BaseException | None] = []

    def retry() -> None:
        try:
            upload = store.upload("abcdefgh")
        except BaseException as exc:
            outcome.append(exc)
            return
        outcome.append(None)
        upload.truncate(1000)  # what a writer rebuilding its stored chunks does
        upload.close()

    thread = threading.Thread(target=retry, name="retry")
    thread.start()
    assert opened.wait(10)
    if meanwhile == "finalised":
        store.finalise(first, digest)
    else:
        first.close()
        store.discard_upload("abcdefgh")
    go.set()
    thread.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], UploadBusy)
    if meanwhile == "finalised":
        with store.open(digest) as blob:
            assert blob.read() == data  # whole
    monkeypatch.undo()
    # Tried again, it finds what became of the upload: nothing left to write.
    again = store.upload("abcdefgh")
    assert again.size() == 0
    again.close()


@pytest.mark.parametrize("name", ["../etc/passwd", "short", "a/b/c/d/e/f/g"])
def test_names_cannot_escape_the_root(tmp_path: Path, name: str) -> None:
    store = DirectoryBlobStore(tmp_path)
    with pytest.raises(BlobError):
        store.upload(name)
    with pytest.raises(BlobError):
        store.open(name)


def test_cleanup_removes_only_old_orphans(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path)
    blobs = []
    for number in range(3):
        data = bytes([number]) * 10
        upload = store.upload(f"upload-{number}")
        upload.write(data)
        store.finalise(upload, hashlib.sha256(data).hexdigest())
        blobs.append(hashlib.sha256(data).hexdigest())
    for name in ("abandoned", "in-progress", "just-begun"):
        with store.upload(name) as upload:
            upload.write(b"x")
    old = time.time() - 48 * 3600
    for path in [
        *store.blobs.glob("*/*/*"),
        store.uploads / "abandoned",
        store.uploads / "in-progress",
    ]:
        os.utime(path, (old, old))
    referenced = {blobs[0]}
    removed = store.cleanup(
        is_referenced=referenced.__contains__,
        upload_is_live=lambda upload_id: upload_id == "in-progress",
        older_than_seconds=24 * 3600,
    )
    assert removed == (1, 2)
    assert store.exists(blobs[0])
    assert not store.exists(blobs[1])
    assert sorted(path.name for path in store.uploads.iterdir()) == ["in-progress", "just-begun"]


def test_default_root_is_next_to_the_keys(tmp_path: Path) -> None:
    assert blob_root(None, tmp_path / "keys") == tmp_path.resolve() / "blobs"
    assert blob_root(tmp_path / "elsewhere", tmp_path / "keys") == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("number", "full"),
    [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EFBIG, True), (errno.EIO, False)],
)
def test_a_storage_failure_says_what_the_os_said_and_nothing_else(number: int, full: bool) -> None:
    cause = OSError(number, os.strerror(number), "/srv/entraide/blobs/uploads/out-secret-1")
    failure = StorageFailed("writing the upload", cause)
    assert failure.full is full
    assert str(failure) == f"writing the upload failed: {errno.errorcode[number]}"
    assert "/srv" not in str(failure)
    assert "secret" not in str(failure)


def test_a_failed_write_or_fsync_is_kept_for_every_later_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux reports a write-back error once: a later fsync that succeeds proves nothing."""
    store = DirectoryBlobStore(tmp_path)
    upload = store.upload("upload-fsync")
    upload.write(b"x" * 4096)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StorageFailed) as raised:
        upload.sync()
    assert not raised.value.full
    monkeypatch.undo()
    with pytest.raises(StorageFailed):
        upload.sync()
    with pytest.raises(StorageFailed):
        upload.write(b"more")
    upload.close()


def test_new_folders_and_staging_names_are_flushed_with_what_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename or a new file is durable only once the folder entries above it are."""
    store = DirectoryBlobStore(tmp_path)
    flushed: list[Path] = []
    real = blobstore._fsync_dir
    monkeypatch.setattr(blobstore, "_fsync_dir", lambda path: (flushed.append(path), real(path)))
    data = b"the first blob of an empty store"
    digest = hashlib.sha256(data).hexdigest()
    upload = store.upload("abcdefgh")
    upload.write(data)
    upload.sync()
    assert flushed == [store.uploads]  # the staging file's name, with its first bytes
    upload.sync()
    assert flushed == [store.uploads]  # once
    flushed.clear()
    store.finalise(upload, digest)
    fan_out = store.blobs / digest[:2]
    assert flushed == [store.blobs, fan_out, fan_out / digest[2:4], store.uploads]

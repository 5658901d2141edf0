"""The directory blob store: atomic publication, content addresses, orphan cleanup."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest

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

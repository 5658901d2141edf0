"""Sealed parts live here, outside the database, named by the SHA-256 of their ciphertext.

A blob is written through an *upload*: a staging object that can be appended to, made
durable (`sync`), cut back to a durable boundary after a crash (`truncate`), and finally
published under its content address (`finalise`, atomic). Readers only ever see finished
blobs. `BlobStore` is the interface an S3-compatible store would implement (multipart upload
for the staging object, a conditional copy for `finalise`); `DirectoryBlobStore` is the
default, a directory on the node's disk:

    ROOT/uploads/<upload id>            staging, append-only
    ROOT/blobs/<aa>/<bb>/<sha256 hex>   finished, read-only, never rewritten

Only ciphertext is ever written: the store sees nothing a database copy would not.

Blobs bypass the page cache as they stream: an upload is flushed and dropped from the cache
every few MiB, and a reader drops what it has read. Evidence is written once and read rarely,
so caching it would only evict the database's pages; and filling the cache with gigabytes
costs more than the disk itself (measured on the 2-vCPU VM of docs/benchmarks.md: 1 GiB
written through a cache already holding a few GiB took 3.3-3.7 s of kernel time, against
0.35 s when flushed and dropped every 16 MiB; a 1 GiB read, 2.9 s against 0.24 s).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

from app.durable import sync_folder
from app.evidence.beside import flush_beside

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
UPLOAD_ID = re.compile(r"[0-9A-Za-z_-]{8,128}")
READ_BYTES = 1 << 20
# How much of a blob is written or read before it is flushed and dropped from the page cache.
DROP_BEHIND_BYTES = 16 << 20


def _drop_cached(fd: int) -> None:
    """Forget the file's clean cached pages (a hint; not every platform has it)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _flush_data(fd: int) -> None:
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS
        os.fsync(fd)


def _flush_behind(fd: int) -> None:
    _flush_data(fd)
    _drop_cached(fd)


class BlobReader(io.FileIO):
    """A blob opened for a sequential read that drops the pages it has read from the cache."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self._since_drop = 0
        self._position = 0
        self._advise(0, os.POSIX_FADV_SEQUENTIAL)

    def _advise(self, length: int, advice: int) -> None:
        # Hints only: a file system (or a file) that takes none is still read.
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fileno(), 0, length, advice)

    def _read_some(self, count: int) -> None:
        self._position += count
        self._since_drop += count
        if self._since_drop >= DROP_BEHIND_BYTES:
            self._since_drop = 0
            # Only what lies behind the reader: the read-ahead in front of it is still to come.
            self._advise(self._position, os.POSIX_FADV_DONTNEED)

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._read_some(len(data))
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        count = super().readinto(buffer)
        self._read_some(count)
        return count


class BlobError(Exception):
    """An unknown blob or upload, or a name that is not one; `StorageFailed`: a write the
    OS refused."""


class UploadBusy(BlobError):
    """Another request (in this process or another) is writing this upload now."""


# The disk or a limit on it is full: only freeing space helps, not a plain retry.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class StorageFailed(BlobError):
    """The store could not write: what the OS said, by name (never a path or content)."""

    def __init__(self, action: str, cause: OSError) -> None:
        self.reason = errno.errorcode.get(cause.errno or 0, "unknown error")
        self.full = cause.errno in FULL_ERRNOS
        super().__init__(f"{action} failed: {self.reason}")


@contextlib.contextmanager
def _storage(action: str) -> Iterator[None]:
    """OS errors of the store's writes, raised as StorageFailed (a BlobError)."""
    try:
        yield
    except OSError as exc:
        raise StorageFailed(action, exc) from exc


class Upload(Protocol):
    """An unfinished blob. Appends are durable only after `sync` returns."""

    upload_id: str

    def size(self) -> int: ...
    def write(self, data: bytes) -> None: ...
    def sync(self) -> None: ...
    def truncate(self, size: int) -> None: ...
    def read_chunks(self, chunk_bytes: int) -> Iterator[bytes]: ...
    def close(self) -> None: ...
    def suspend(self) -> None:
        """Between requests: let another process write it (the next `resume` sees that)."""

    def resume(self) -> bool:
        """Take it again (UploadBusy if another request writes it now); False if it changed
        meanwhile, and the caller rebuilds what it knows from what it holds."""

    def removed(self) -> bool:
        """No longer the upload of its name (discarded, or finished, by another process)."""


class BlobStore(Protocol):
    def upload(self, upload_id: str) -> Upload:
        """Open the staging object `upload_id`, creating it empty if it does not exist."""

    def upload_exists(self, upload_id: str) -> bool: ...
    def discard_upload(self, upload_id: str) -> None: ...
    def finalise(self, upload: Upload, digest: str) -> None:
        """Publish the upload as blob `digest` (its ciphertext SHA-256), atomically."""

    def exists(self, digest: str) -> bool: ...
    def size(self, digest: str) -> int: ...
    def open(self, digest: str) -> BinaryIO: ...
    def delete(self, digest: str) -> None: ...


def _check_digest(digest: str) -> str:
    if not HEX_DIGEST.fullmatch(digest):
        raise BlobError(f"not a SHA-256 hex digest: {digest!r}")
    return digest


def _check_upload_id(upload_id: str) -> str:
    if not UPLOAD_ID.fullmatch(upload_id):
        raise BlobError(f"not an upload id: {upload_id!r}")
    return upload_id


_fsync_dir = sync_folder  # by this name here: tests watch what this module flushes


def _mtime(path: Path) -> float | None:
    """None for a file gone since it was listed (finalised, discarded, or swept by another
    process's cleanup at the same time)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _make_durable_dirs(folder: Path) -> None:
    """`mkdir -p`, each new folder's entry flushed in its parent: a rename is durable only
    once the folders above it are (after a power cut, a blob whose fan-out folder was never
    written would be gone, with its receipt already given)."""
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
            new.mkdir(mode=0o700)
        _fsync_dir(new.parent)


class DirectoryUpload:
    def __init__(self, path: Path, upload_id: str) -> None:
        self.upload_id = upload_id
        self.path = path
        # Binary append mode, unbuffered: every write goes straight to the kernel, so the
        # process never holds more than the caller's chunk.
        self._file: BinaryIO = open(path, "a+b", buffering=0)
        # One writer at a time, across processes: two interleaved appends would corrupt it.
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._file.close()
            raise UploadBusy(f"upload {upload_id} is being written") from exc
        # Locked, but perhaps not the upload any more: a writer that held the lock between
        # our open and our lock may have finalised it (renamed it into the blobs, a complete
        # file that a rebuild here would cut back) or discarded it. Only the file the path
        # still names is the upload; the caller tries again and finds what became of it.
        if not self._is_named():
            self._file.close()
            raise UploadBusy(f"upload {upload_id} was just finished or discarded")
        self._unflushed = 0
        # The staging file's own name is flushed with its first sync: acknowledged bytes
        # survive a power cut only if the file that holds them does.
        self._name_synced = False
        self._suspended: tuple[int, int, int, int] | None = None  # when last suspended (_identity)
        self._flushing: Future[None] | None = None
        # A flush that failed: the kernel reports a write-back error once, so it is kept and
        # raised by every later write and sync, never taken for durable again.
        self._failed: BaseException | None = None

    def _is_named(self) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(self._file.fileno())
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def removed(self) -> bool:
        return not self._is_named()

    def write(self, data: bytes) -> None:
        self._raise_failed()
        # Written out a window at a time, so the cache never fills with it (and the final
        # fsync has little left to do). The flush waits for the disk, so it runs beside the
        # writer, which goes on encrypting; one flush at a time keeps the dirty pages to
        # about two windows. The previous window's flush is awaited before this chunk is
        # appended, so a failure is raised with nothing of the chunk written.
        crossing = self._unflushed + len(data) >= DROP_BEHIND_BYTES
        if crossing:
            self._wait_flushed()
        view = memoryview(data)
        with self._recorded("writing the upload"):
            while view:
                written = self._file.write(view)
                if written is None:  # pragma: no cover - only for non-blocking files
                    raise BlobError("short write")
                view = view[written:]
        self._unflushed += len(data)
        if crossing:
            self._unflushed = 0
            fd = self._file.fileno()
            self._flushing = flush_beside(lambda: _flush_behind(fd))

    def _raise_failed(self) -> None:
        flushing = self._flushing
        if flushing is not None and flushing.done():
            self._wait_flushed()
        failed = self._failed
        if isinstance(failed, OSError):
            raise StorageFailed("writing the upload out to disk", failed) from failed
        if failed is not None:
            raise BlobError("writing the upload out to disk failed") from failed

    def _wait_flushed(self) -> None:
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            try:
                flushing.result()
            except Exception as exc:
                self._failed = exc
        self._raise_failed()

    @contextlib.contextmanager
    def _recorded(self, action: str) -> Iterator[None]:
        """As `_storage`, and the failure is kept: a failed fsync is reported once by Linux,
        so a later one that succeeds proves nothing about the pages before it."""
        try:
            yield
        except OSError as exc:
            self._failed = exc
            raise StorageFailed(action, exc) from exc

    def sync(self) -> None:
        self._wait_flushed()
        with self._recorded("syncing the upload"):
            os.fsync(self._file.fileno())
            if not self._name_synced:
                _fsync_dir(self.path.parent)
                self._name_synced = True
        self._unflushed = 0

    def truncate(self, size: int) -> None:
        self._wait_flushed()
        with self._recorded("truncating the upload"):
            self._file.truncate(size)
            os.fsync(self._file.fileno())

    def read_chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        # From the locked descriptor, never by name: the name could be another file by now.
        fd, offset = self._file.fileno(), 0
        while chunk := os.pread(fd, chunk_bytes, offset):
            offset += len(chunk)
            yield chunk

    def suspend(self) -> None:
        self._wait_flushed()
        self._suspended = _identity(os.fstat(self._file.fileno()))
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    def resume(self) -> bool:
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise UploadBusy(f"upload {self.upload_id} is being written") from exc
        try:
            named = os.stat(self.path).st_ino
        except FileNotFoundError:
            return False  # removed meanwhile (the draft expired, say): start again
        stat = os.fstat(self._file.fileno())
        return named == stat.st_ino and _identity(stat) == self._suspended

    def close(self) -> None:
        """Close, after the flush in flight (its descriptor number could be reused). A failed
        flush is not raised here: close runs in cleanup, after whatever went wrong first, and
        durability is what `sync` reports."""
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            wait([flushing])
        self._file.close()

    def __enter__(self) -> DirectoryUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirectoryBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uploads = root / "uploads"
        self.blobs = root / "blobs"
        self.uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blobs.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _blob_path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.blobs / digest[:2] / digest[2:4] / digest

    def upload(self, upload_id: str) -> DirectoryUpload:
        path = self.uploads / _check_upload_id(upload_id)
        with _storage("opening the upload"):
            return DirectoryUpload(path, upload_id)

    def upload_exists(self, upload_id: str) -> bool:
        return (self.uploads / _check_upload_id(upload_id)).exists()

    def being_written(self, upload_id: str) -> bool:
        """Whether a request is writing the upload now (it holds the staging file's lock).
        Does not wait: a caller that must, polls (a thread blocked on the lock is one the
        node's other requests lack).

        A client that loses its link asks at once where to resume, while the request it broke
        off may still be taking in what reached the node before keeping its whole chunks:
        the staging file then holds fewer chunks than it will, and the client would send
        again bytes the node is about to keep (or be refused as busy)."""
        path = self.uploads / _check_upload_id(upload_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            # Shared and let go at once (the descriptor is closed): only learns whether the
            # writer, which holds it exclusively while it writes, is there.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def discard_upload(self, upload_id: str) -> None:
        path = self.uploads / _check_upload_id(upload_id)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # the caller's answer matters more; the sweep retries later
            log.warning("could not discard an upload: %s", errno.errorcode.get(exc.errno or 0))

    def finalise(self, upload: Upload, digest: str) -> None:
        if not isinstance(upload, DirectoryUpload):
            raise BlobError("an upload from another store")
        target = self._blob_path(digest)
        upload.sync()
        # Renamed while still locked: a writer of another process waiting for the upload
        # then finds it gone (and starts a new one), never a complete file it would cut back.
        try:
            with _storage("publishing the blob"):
                _make_durable_dirs(target.parent)
                # Same file system, so rename is atomic: a reader sees the whole blob or none.
                # If the same ciphertext is already stored, the rename replaces it with equal
                # bytes.
                os.replace(upload.path, target)
                _fsync_dir(target.parent)
                _fsync_dir(self.uploads)
        finally:
            upload.close()

    def exists(self, digest: str) -> bool:
        return self._blob_path(digest).is_file()

    def touch(self, digest: str) -> None:
        """Mark a blob as new: the sweep of unreferenced blobs spares recent ones (a blob
        about to be named again, app/recovery/parts.py)."""
        with _storage("touching the blob"):
            os.utime(self._blob_path(digest))

    def size(self, digest: str) -> int:
        try:
            return self._blob_path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise BlobError(f"no blob {digest}") from exc

    def open(self, digest: str) -> BinaryIO:
        try:
            return cast(BinaryIO, BlobReader(self._blob_path(digest)))
        except FileNotFoundError as exc:
            raise BlobError(f"no blob {digest}") from exc

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._blob_path(digest).unlink()

    def iter_blobs(self) -> Iterator[tuple[str, float]]:
        for path in self.blobs.glob("*/*/*"):
            if HEX_DIGEST.fullmatch(path.name) and (mtime := _mtime(path)) is not None:
                yield path.name, mtime

    def cleanup(
        self,
        *,
        is_referenced: Callable[[str], bool],
        upload_is_live: Callable[[str], bool],
        older_than_seconds: float,
        now: float | None = None,
    ) -> tuple[int, int]:
        """Remove abandoned uploads and unreferenced blobs, both older than the grace period.

        The grace period keeps a blob that was just finalised, and whose row is not yet
        committed, from being collected. Returns (uploads removed, blobs removed).
        """
        cutoff = (time.time() if now is None else now) - older_than_seconds
        uploads = blobs = 0
        for path in list(self.uploads.iterdir()):
            mtime = _mtime(path)
            if mtime is not None and mtime < cutoff and not upload_is_live(path.name):
                path.unlink(missing_ok=True)
                uploads += 1
        for digest, mtime in list(self.iter_blobs()):
            if mtime < cutoff and not is_referenced(digest):
                self.delete(digest)
                blobs += 1
        return uploads, blobs


def blob_root(blob_dir: Path | None, keys_dir: Path) -> Path:
    """ENTRAIDE_BLOB_DIR, or `blobs` next to the node's keys directory."""
    return blob_dir if blob_dir is not None else keys_dir.resolve().parent / "blobs"


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What must not have changed while an upload was suspended for its hashes, kept from
    the bytes as they arrived, to still be those of the file: the same file, its size, and
    its change time (any write sets it, and no one can set it back; the modification time
    can be, with utime)."""
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

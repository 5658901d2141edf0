"""The writers a node keeps between a client's PATCHes let go of what they hold: one whose
staging file was removed (its draft discarded by another process, or by the sweep) is
closed at the next purge, and a purge comes by itself, so a process whose clients stop
uploading does not keep the removed files' space allocated (from review)."""

from __future__ import annotations

import os
from pathlib import Path

from nacl.utils import random as random_bytes

from app.crypto.envelope import KEY_BYTES, STREAM_HEADER_BYTES
from app.evidence import drafts
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.stream import PartWriter


def _held(name: str) -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if name in link]


def _writer(store: DirectoryBlobStore, name: str) -> PartWriter:
    return PartWriter.open(
        store,
        name,
        key=bytes(random_bytes(KEY_BYTES)),
        ad=b"ad",
        stream_header=bytes(random_bytes(STREAM_HEADER_BYTES)),
        size=10,
    )


def test_a_writer_of_a_removed_staging_file_is_closed(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path / "blobs")
    cache = drafts.WriterCache()
    name = drafts.upload_id("a" * 32, 1)
    writer = _writer(store, name)
    writer.write(b"12345")
    cache.put_back(name, writer)
    kept = drafts.upload_id("b" * 32, 1)
    other = _writer(store, kept)
    cache.put_back(kept, other)
    try:
        assert _held(name)
        assert _held(kept)
        store.discard_upload(name)  # as a discard through another process does
        cache.purge()
        assert _held(name) == []
        assert _held(kept)  # still an upload of its own: kept for the client's next PATCH
        assert cache._timer is not None  # and looked at again later, by itself
    finally:
        cache.close()
        if cache._timer is not None:
            cache._timer.cancel()

"""The writers a node keeps between a client's PATCHes let go of what they hold: one whose
staging file was removed (its draft discarded by another process, or by the sweep) is
closed at the next purge, and a purge comes by itself, so a process whose clients stop
uploading does not keep the removed files' space allocated (from review)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest
from nacl.utils import random as random_bytes

from app.crypto.envelope import KEY_BYTES, STREAM_HEADER_BYTES, ciphertext_length
from app.evidence import drafts, inbound
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.stream import CHUNK_BYTES, PartWriter
from tests.conftest import Databases
from tests.requests.conftest import serve_node
from tests.requests.test_upload_key_streams import _draft


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


def _target(name: str) -> drafts.UploadTarget:
    """What `WriterCache.take` reads of a target: its upload and stream header (none kept
    here match, so a writer taken is one rebuilt or a kept one whose header is renewed)."""
    return cast(drafts.UploadTarget, _Target(name))


class _Target:
    def __init__(self, name: str) -> None:
        self.upload_id = name
        self.key = bytes(random_bytes(KEY_BYTES))
        self.ad = b"ad"
        self.stream_header = bytes(random_bytes(STREAM_HEADER_BYTES))
        self.size = 10


def _part_target(msg_id: str) -> inbound.PartTarget:
    size = 10
    return inbound.PartTarget(
        msg_id=msg_id,
        index=1,
        length=ciphertext_length(size),
        offset=0,
        kwargs={
            "key": bytes(random_bytes(KEY_BYTES)),
            "ad": b"ad",
            "stream_header": bytes(random_bytes(STREAM_HEADER_BYTES)),
            "length": ciphertext_length(size),
            "sha256": "0" * 64,
            "plaintext_size": size,
            "plaintext_sha256": "0" * 64,
        },
        done=False,
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


def test_no_more_writers_are_kept_than_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each kept writer holds its staging file open: one officer's 1,088 one-byte PATCHes
    left 990 files open after it left, and the node out of descriptors for its database
    (from review). Past the limit, the least recently used is closed."""
    monkeypatch.setattr(drafts, "MOST_KEPT_WRITERS", 3)
    store = DirectoryBlobStore(tmp_path / "blobs")
    cache = drafts.WriterCache()
    names = [drafts.upload_id(f"{n:032x}", 1) for n in range(6)]
    try:
        for name in names:
            cache.put_back(name, _writer(store, name))
        assert [bool(_held(name)) for name in names] == [False] * 3 + [True] * 3
        # Used again, a writer is the most recent: the next one put back closes another.
        cache.put_back(names[3], cache.take(store, _target(names[3])))
        cache.put_back(names[0], _writer(store, names[0]))
        assert [bool(_held(name)) for name in names] == [True, False, False, True, False, True]
    finally:
        cache.close()
        if cache._timer is not None:
            cache._timer.cancel()


def test_no_more_receivers_are_kept_than_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbound, "MOST_KEPT_RECEIVERS", 2)
    store = DirectoryBlobStore(tmp_path / "blobs")
    cache = inbound.ReceiverCache()
    targets = [_part_target(f"{n:032x}") for n in range(4)]
    try:
        for target in targets:
            cache.put_back(target, inbound.open_receiver(store, target))
        held = [bool(_held(inbound.receive_upload_id(t.msg_id, 1))) for t in targets]
        assert held == [False, False, True, True]
    finally:
        cache.close()


def test_a_node_shutting_down_closes_the_writers_it_kept(
    databases: Databases, tmp_path: Path
) -> None:
    """Each kept writer holds its staging file open: they stayed open after the app stopped
    (ResourceWarnings in the suite; a process serving apps in turn held them all)."""
    with serve_node(databases.new("ar", migrated=True), tmp_path) as ar:
        draft_id, href = _draft(ar, 2 * CHUNK_BYTES)
        began = ar.http.patch(
            href,
            content=b"\0" * CHUNK_BYTES,
            headers={**ar.as_("officer"), "upload-offset": "0"},
        )
        assert began.status_code == 204, began.text
        assert _held(drafts.upload_id(draft_id, 1))  # kept for the client's next PATCH
    assert _held(drafts.upload_id(draft_id, 1)) == []

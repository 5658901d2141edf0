"""The node's blob store, built from its settings on first use (nothing at import time)."""

from __future__ import annotations

import threading
from pathlib import Path

from app.config import Settings
from app.evidence.blobstore import DirectoryBlobStore, blob_root

_stores: dict[Path, DirectoryBlobStore] = {}
_lock = threading.Lock()


def blob_store(settings: Settings) -> DirectoryBlobStore:
    root = blob_root(settings.blob_dir, settings.keys_dir)
    with _lock:
        store = _stores.get(root)
        if store is None:
            store = _stores[root] = DirectoryBlobStore(root)
        return store

"""Making a file system change durable: a new or renamed entry is on disk only once its
folder is flushed too (a power cut could otherwise lose a file whose bytes were synced)."""

from __future__ import annotations

import os
from pathlib import Path


def sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

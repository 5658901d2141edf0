"""Run by test_memory.py in a child process whose address space is capped (RLIMIT_AS).

Encrypts SIZE bytes of generated plaintext into a blob store, then checks and decrypts the
blob back, comparing hashes; prints one JSON line. Fails with MemoryError if either direction
ever holds the part in memory.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

from app.crypto.envelope import part_ad
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.stream import check_blob, decrypt_stream, encrypt_stream, read_blob

PIECE = 256 * 1024 + 3  # deliberately not a chunk multiple


def generate(size: int, seen: hashlib._Hash) -> Iterator[bytes]:
    block = hashlib.sha256(b"seed").digest() * (PIECE // 32 + 1)
    sent = 0
    while sent < size:
        piece = block[: min(PIECE, size - sent)]
        seen.update(piece)
        sent += len(piece)
        yield piece


def main() -> None:
    root, size = Path(sys.argv[1]), int(sys.argv[2])
    key, msg_id, header = bytes(32), bytes(16), bytes(range(24))
    ad = part_ad(msg_id, 1)
    store = DirectoryBlobStore(root)
    sent = hashlib.sha256()
    part = encrypt_stream(
        store, "big-upload", generate(size, sent), key=key, ad=ad, stream_header=header, size=size
    )
    assert part.plaintext_sha256 == sent.hexdigest()
    with store.open(part.digest) as blob:
        check_blob(blob, length=part.length, sha256=part.digest)
    received = hashlib.sha256()
    total = 0
    with store.open(part.digest) as blob:
        for plain in decrypt_stream(
            read_blob(blob),
            key=key,
            ad=ad,
            stream_header=header,
            plaintext_size=size,
            plaintext_sha256=part.plaintext_sha256,
        ):
            received.update(plain)
            total += len(plain)
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked parent
    # (pytest) from before exec.
    status = Path("/proc/self/status").read_text()
    usage = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(  # noqa: T201
        json.dumps(
            {
                "size": total,
                "match": received.hexdigest() == sent.hexdigest(),
                "limit": resource.getrlimit(resource.RLIMIT_AS)[0],
                "peak_rss_kib": usage,
            }
        )
    )


if __name__ == "__main__":
    main()

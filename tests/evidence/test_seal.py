"""A streamed envelope is the protocol's envelope: byte-identical to `seal` in memory, and
it opens with the receiver's ordinary checks, at every size the issue names."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.crypto import envelope as env
from app.crypto.keys import NodeKeys
from app.crypto.randomness import SeededRandomness
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.seal import StreamedAttachment, seal_streamed
from app.evidence.stream import encrypt_stream

CHUNK = env.CHUNK_BYTES
NOW = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)
FR = NodeKeys(
    signing=SigningKey(bytes([1]) * 32),
    encryption=PrivateKey(bytes([2]) * 32),
    log=SigningKey(bytes([3]) * 32),
)
DE = NodeKeys(
    signing=SigningKey(bytes([11]) * 32),
    encryption=PrivateKey(bytes([12]) * 32),
    log=SigningKey(bytes([13]) * 32),
)
TO_DE = env.Recipient("DE/BFJ", DE.encryption_public)
CONTENT = {"kind": "request", "summary": "disk image"}


def _streamed(
    store: DirectoryBlobStore, blobs: list[bytes], seed: bytes
) -> tuple[env.WireEnvelope, list[str]]:
    """Seal through the streaming path, drawing randomness in `seal`'s order."""
    randomness = SeededRandomness(seed)
    msg_id, content_key = randomness.token(16), randomness.token(32)
    manifest_header = randomness.stream_header()
    attachments, digests = [], []
    for number, data in enumerate(blobs, 1):
        stream_header = randomness.stream_header()
        assert stream_header is not None
        part = encrypt_stream(
            store,
            f"upload-{number:04d}",
            (data[i : i + 300_000] for i in range(0, len(data), 300_000)),
            key=env.part_key(content_key, msg_id, number),
            ad=env.part_ad(msg_id, number),
            stream_header=stream_header,
            size=len(data),
        )
        attachments.append(
            StreamedAttachment(
                f"file-{number}.bin", "application/octet-stream", stream_header, part
            )
        )
        digests.append(part.digest)
    head = seal_streamed(
        sender_keys=FR,
        sender_authority="FR/MJ",
        recipient=TO_DE,
        msg_id=msg_id,
        content_key=content_key,
        content=CONTENT,
        attachments=attachments,
        conversation_id=None,
        in_reply_to=None,
        created_at=NOW,
        ttl=timedelta(days=7),
        manifest_stream_header=manifest_header,
        ephemeral_keys=(randomness.ephemeral_key(), randomness.ephemeral_key()),
    )
    stored = []
    for digest in digests:
        with store.open(digest) as blob:
            stored.append(blob.read())
    return env.WireEnvelope(head.header, head.signature, [head.manifest_part, *stored]), digests


@pytest.mark.parametrize(
    "sizes", [[], [0], [1], [CHUNK], [CHUNK + 1], [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]]
)
def test_streamed_seal_is_byte_identical_to_the_in_memory_seal(
    tmp_path: Path, sizes: list[int]
) -> None:
    blobs = [os.urandom(size) for size in sizes]
    streamed, _ = _streamed(DirectoryBlobStore(tmp_path), blobs, b"seed")
    in_memory = env.seal(
        sender_keys=FR,
        sender_authority="FR/MJ",
        recipient=TO_DE,
        content=CONTENT,
        attachments=[
            env.Attachment(f"file-{number}.bin", "application/octet-stream", data)
            for number, data in enumerate(blobs, 1)
        ],
        conversation_id=None,
        in_reply_to=None,
        created_at=NOW,
        ttl=timedelta(days=7),
        randomness=SeededRandomness(b"seed"),
    )
    assert streamed == in_memory
    _, opened = env.open_envelope(streamed, DE)
    assert opened.attachments == blobs
    assert [entry["size"] for entry in opened.manifest["attachments"]] == sizes


def test_fifty_mebibytes_round_trip_byte_for_byte(tmp_path: Path) -> None:
    blobs = [b"", b"x", os.urandom(CHUNK), os.urandom(CHUNK + 1), os.urandom(50 * CHUNK)]
    streamed, _ = _streamed(DirectoryBlobStore(tmp_path), blobs, os.urandom(16))
    _, opened = env.open_envelope(streamed, DE)
    assert opened.attachments == blobs

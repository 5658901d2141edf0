"""Streamed part encryption: the same bytes as an in-memory seal, resumable by offset,
and a decryption that refuses, never shortens, a truncated or altered part."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from app.crypto import envelope as env
from app.crypto.encoding import sha256_hex
from app.evidence.blobstore import DirectoryBlobStore, UploadBusy
from app.evidence.inbound import PartTarget, ReceiverCache, receive_upload_id
from app.evidence.stream import (
    CIPHER_CHUNK,
    PartReceiver,
    PartWriter,
    UploadError,
    check_blob,
    decrypt_stream,
    encrypt_stream,
    read_blob,
)

CHUNK = env.CHUNK_BYTES
KEY = bytes(range(32))
MSG_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
AD = env.part_ad(MSG_ID, 1)
HEADER = bytes(range(24))
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK]


@pytest.fixture
def store(tmp_path: Path) -> DirectoryBlobStore:
    return DirectoryBlobStore(tmp_path / "blobs")


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        step = rng.choice([1, 7, 4096, CHUNK - 3, CHUNK, CHUNK + 5, 3 * CHUNK])
        out.append(data[offset : offset + step])
        offset += step
    return out


@pytest.mark.parametrize("size", SIZES)
def test_streamed_part_equals_the_in_memory_seal(store: DirectoryBlobStore, size: int) -> None:
    data = os.urandom(size)
    part = encrypt_stream(
        store,
        f"upload-{size}",
        pieces(data, random.Random(size)),
        key=KEY,
        ad=AD,
        stream_header=HEADER,
        size=size,
    )
    stream_header, expected = env.encrypt_part(data, KEY, AD, HEADER)
    assert stream_header == HEADER
    with store.open(part.digest) as blob:
        stored = blob.read()
    assert stored == expected
    assert part.digest == sha256_hex(expected)
    assert part.length == len(expected) == env.ciphertext_length(size)
    assert part.plaintext_sha256 == sha256_hex(data)
    assert env.decrypt_part(stored, KEY, AD, HEADER) == data
    with store.open(part.digest) as blob:
        check_blob(blob, length=part.length, sha256=part.digest)
    with store.open(part.digest) as blob:
        plain = b"".join(
            decrypt_stream(
                read_blob(blob, 65536),
                key=KEY,
                ad=AD,
                stream_header=HEADER,
                plaintext_size=size,
                plaintext_sha256=part.plaintext_sha256,
            )
        )
    assert plain == data
    assert not store.upload_exists(f"upload-{size}")


@pytest.mark.parametrize("seed", range(8))
def test_upload_interrupted_at_random_offsets_resumes_without_resending(
    store: DirectoryBlobStore, seed: int
) -> None:
    """Each 'connection' sends from the node's durable offset and breaks at a random byte;
    the node is rebuilt from disk each time (a process restart). Bytes re-sent are only
    those of the chunk the break cut, never a byte the node had made durable."""
    rng = random.Random(seed)
    size = rng.randrange(2 * CHUNK, 6 * CHUNK)
    data = os.urandom(size)
    sent = 0
    durable_resent = 0
    interruptions = 0
    while True:
        writer = PartWriter.open(
            store, "resume-me", key=KEY, ad=AD, stream_header=HEADER, size=size
        )
        start = writer.durable_offset
        assert start % CHUNK == 0
        stop = size if interruptions >= 4 else rng.randrange(start, size + 1)
        for piece in pieces(data[start:stop], rng):
            writer.write(piece)
        sent += stop - start
        if writer.offset == size:
            part = writer.finalise(store)
            break
        offset = writer.checkpoint()
        # A crash after the checkpoint may tear the file anywhere after it.
        writer.close()
        interruptions += 1
        if rng.random() < 0.5:
            with open(store.uploads / "resume-me", "ab") as torn:
                torn.write(b"\0" * rng.randrange(1, CIPHER_CHUNK))
        probe = PartWriter.open(store, "resume-me", key=KEY, ad=AD, stream_header=HEADER, size=size)
        durable_resent += max(0, offset - probe.durable_offset)
        probe.close()
    assert interruptions >= 1
    assert durable_resent == 0
    # At most the cut chunk is sent again, once per interruption.
    assert sent - size < interruptions * CHUNK
    with store.open(part.digest) as blob:
        assert blob.read() == env.encrypt_part(data, KEY, AD, HEADER)[1]
    assert part.plaintext_sha256 == sha256_hex(data)


def test_more_bytes_than_declared_are_refused(store: DirectoryBlobStore) -> None:
    writer = PartWriter.open(store, "too-many", key=KEY, ad=AD, stream_header=HEADER, size=3)
    with pytest.raises(UploadError):
        writer.write(b"four")
    writer.write(b"abc")
    with pytest.raises(UploadError):
        writer.write(b"d")
    writer.close()


def test_incomplete_upload_cannot_be_finalised(store: DirectoryBlobStore) -> None:
    writer = PartWriter.open(store, "short-one", key=KEY, ad=AD, stream_header=HEADER, size=9)
    writer.write(b"abc")
    with pytest.raises(UploadError):
        writer.finalise(store)
    writer.close()


def _sealed(store: DirectoryBlobStore, size: int) -> tuple[bytes, str, bytes]:
    data = os.urandom(size)
    part = encrypt_stream(
        store, "tamper-upload", [data], key=KEY, ad=AD, stream_header=HEADER, size=size
    )
    with store.open(part.digest) as blob:
        return data, part.digest, blob.read()


def _decrypt(cipher: bytes, **expect: object) -> bytes:
    return b"".join(
        decrypt_stream(
            [cipher[i : i + 5000] for i in range(0, len(cipher), 5000)],
            key=KEY,
            ad=AD,
            stream_header=HEADER,
            **expect,  # type: ignore[arg-type]  # plaintext_size / plaintext_sha256
        )
    )


@pytest.mark.parametrize("cut", ["whole_chunk", "mid_chunk", "tiny_tail", "last_byte"])
def test_truncated_part_is_refused_not_shortened(store: DirectoryBlobStore, cut: str) -> None:
    _, digest, cipher = _sealed(store, 2 * CHUNK + 10)
    keep = {
        "whole_chunk": CIPHER_CHUNK,
        "mid_chunk": CIPHER_CHUNK + 99,
        "tiny_tail": CIPHER_CHUNK + 5,
        "last_byte": -1,
    }[cut]
    truncated = cipher[:keep]
    with pytest.raises(env.EnvelopeError) as caught:
        _decrypt(truncated)
    # The same code the in-memory decryption gives (docs/protocol.md section 9, step 27).
    with pytest.raises(env.EnvelopeError) as in_memory:
        env.decrypt_part(truncated, KEY, AD, HEADER)
    assert caught.value.code == in_memory.value.code
    assert caught.value.code in {"truncated_part", "decrypt_failed"}
    path = store._blob_path(digest)
    path.write_bytes(truncated)
    with store.open(digest) as blob, pytest.raises(env.EnvelopeError) as caught:
        check_blob(blob, length=len(cipher), sha256=digest)
    assert caught.value.code == "truncated_part"


def test_altered_part_is_refused(store: DirectoryBlobStore) -> None:
    data, digest, cipher = _sealed(store, CHUNK + 1)
    altered = bytearray(cipher)
    altered[CHUNK // 2] ^= 1
    with pytest.raises(env.EnvelopeError) as caught:
        _decrypt(bytes(altered))
    assert caught.value.code == "decrypt_failed"
    store._blob_path(digest).write_bytes(bytes(altered))
    with store.open(digest) as blob, pytest.raises(env.EnvelopeError) as caught:
        check_blob(blob, length=len(cipher), sha256=digest)
    assert caught.value.code == "part_hash_mismatch"
    with pytest.raises(env.EnvelopeError, match=r"final chunk|authentication"):
        _decrypt(cipher + b"trailing")
    with pytest.raises(env.EnvelopeError, match=r"final chunk|authentication"):
        _decrypt(cipher + cipher)
    with pytest.raises(env.EnvelopeError) as caught:
        _decrypt(cipher, plaintext_sha256=sha256_hex(data + b"x"))
    assert caught.value.code == "manifest_mismatch"
    assert _decrypt(cipher, plaintext_size=len(data), plaintext_sha256=sha256_hex(data)) == data


def _receiver(store: DirectoryBlobStore, name: str, cipher: bytes, data: bytes) -> PartReceiver:
    return PartReceiver.open(
        store,
        name,
        key=KEY,
        ad=AD,
        stream_header=HEADER,
        length=len(cipher),
        sha256=sha256_hex(cipher),
        plaintext_size=len(data),
        plaintext_sha256=sha256_hex(data),
    )


@pytest.mark.parametrize("seed", range(6))
def test_receiver_resumes_from_its_durable_offset(store: DirectoryBlobStore, seed: int) -> None:
    rng = random.Random(seed)
    data = os.urandom(rng.choice([0, 1, CHUNK, CHUNK + 1, rng.randrange(CHUNK, 5 * CHUNK)]))
    cipher = env.encrypt_part(data, KEY, AD, HEADER)[1]
    sent = interruptions = 0
    while True:
        receiver = _receiver(store, "inbound-part", cipher, data)
        start = receiver.durable_offset
        stop = len(cipher) if interruptions >= 3 else rng.randrange(start, len(cipher) + 1)
        for piece in pieces(cipher[start:stop], rng):
            receiver.write(piece)
        sent += stop - start
        if receiver.complete:
            receiver.finalise(store)
            break
        receiver.checkpoint()
        receiver.close()
        interruptions += 1
    assert sent - len(cipher) < max(1, interruptions) * CIPHER_CHUNK
    with store.open(sha256_hex(cipher)) as blob:
        assert blob.read() == cipher


@pytest.mark.parametrize("fault", ["flipped", "wrong_hash", "wrong_manifest", "too_long"])
def test_receiver_refuses_a_bad_part(store: DirectoryBlobStore, fault: str) -> None:
    data = os.urandom(2 * CHUNK + 3)
    cipher = env.encrypt_part(data, KEY, AD, HEADER)[1]
    expected = {"sha256": sha256_hex(cipher), "plaintext_sha256": sha256_hex(data)}
    if fault == "flipped":
        cipher = cipher[:100] + bytes([cipher[100] ^ 1]) + cipher[101:]
    elif fault == "wrong_hash":
        expected["sha256"] = sha256_hex(b"other")
    elif fault == "wrong_manifest":
        expected["plaintext_sha256"] = sha256_hex(b"other")
    receiver = PartReceiver.open(
        store,
        "bad-part",
        key=KEY,
        ad=AD,
        stream_header=HEADER,
        length=len(cipher),
        plaintext_size=len(data),
        **expected,
    )
    codes = {
        "flipped": "decrypt_failed",
        "wrong_hash": "part_hash_mismatch",
        "wrong_manifest": "manifest_mismatch",
        "too_long": "malformed_envelope",
    }
    with pytest.raises(env.EnvelopeError) as caught:
        receiver.write(cipher + (b"x" if fault == "too_long" else b""))
    assert caught.value.code == codes[fault]
    assert not receiver.complete
    receiver.close()
    assert not store.exists(sha256_hex(cipher))


def _part_target(msg_id: str) -> tuple[bytes, PartTarget]:
    """Part 1 of `msg_id`, 3 chunks and a byte, sealed: its ciphertext and its target."""
    data = os.urandom(3 * CHUNK + 1)
    cipher = env.encrypt_part(data, KEY, AD, HEADER)[1]
    target = PartTarget(
        msg_id,
        1,
        len(cipher),
        0,
        {
            "key": KEY,
            "ad": AD,
            "stream_header": HEADER,
            "length": len(cipher),
            "sha256": sha256_hex(cipher),
            "plaintext_size": len(data),
            "plaintext_sha256": sha256_hex(data),
        },
        False,
    )
    return cipher, target


def test_a_kept_receiver_is_reused_until_its_staging_object_changes(
    store: DirectoryBlobStore,
) -> None:
    msg_id = "cd" * 16
    cipher, target = _part_target(msg_id)
    cache = ReceiverCache()
    first = cache.take(store, target)
    first.write(cipher[: CIPHER_CHUNK + 5])
    first.checkpoint()
    cache.put_back(target, first)  # the partial chunk is dropped: resent from the offset
    again = cache.take(store, target)
    assert again is first
    assert (again.durable_offset, again.opened_at) == (CIPHER_CHUNK, 0)
    again.write(cipher[CIPHER_CHUNK : 2 * CIPHER_CHUNK])
    again.checkpoint()
    cache.put_back(target, again)
    # Another process (or a crash) cut the staging object back: the kept receiver no longer
    # matches it, so a new one is rebuilt from what is stored.
    with open(store.uploads / receive_upload_id(msg_id, 1), "r+b") as staging:
        staging.truncate(CIPHER_CHUNK)
    rebuilt = cache.take(store, target)
    assert rebuilt is not first
    assert (rebuilt.durable_offset, rebuilt.opened_at) == (CIPHER_CHUNK, CIPHER_CHUNK)
    rebuilt.write(cipher[CIPHER_CHUNK:])
    assert rebuilt.complete
    rebuilt.finalise(store)
    with store.open(sha256_hex(cipher)) as blob:
        assert blob.read() == cipher


def test_a_part_is_received_through_another_replica_and_back(store: DirectoryBlobStore) -> None:
    """Two server processes (two caches) behind one address: the sender's PUTs of one part
    may reach either. Between requests a kept receiver holds no lock (else the other
    replica answered part_busy for as long as it was kept), and one that finds the staging
    object written by the other since rebuilds from it."""
    cipher, target = _part_target("ef" * 16)
    first, second = ReceiverCache(), ReceiverCache()
    receiver = first.take(store, target)
    receiver.write(cipher[:CIPHER_CHUNK])
    receiver.checkpoint()
    first.put_back(target, receiver)
    other = second.take(store, target)
    assert other.durable_offset == CIPHER_CHUNK
    other.write(cipher[CIPHER_CHUNK : 2 * CIPHER_CHUNK])
    other.checkpoint()
    with pytest.raises(UploadBusy):  # while a request receives it, nobody else does
        ReceiverCache().take(store, target)
    second.put_back(target, other)
    back = first.take(store, target)  # its kept receiver is stale: rebuilt from the file
    assert back is not receiver
    assert (back.durable_offset, back.opened_at) == (2 * CIPHER_CHUNK, 2 * CIPHER_CHUNK)
    back.write(cipher[2 * CIPHER_CHUNK :])
    assert back.complete
    back.finalise(store)
    with store.open(sha256_hex(cipher)) as blob:
        assert blob.read() == cipher
    first.close()
    second.close()

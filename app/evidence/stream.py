"""One envelope part, encrypted while its plaintext arrives and decrypted while it leaves.

The construction is exactly `app.crypto.envelope.encrypt_part`'s (docs/protocol.md 6.4): the
part key and associated data of (msg_id, index), CHUNK_BYTES plaintext chunks, `TAG_FINAL` on
the last one, so a streamed part and one sealed in memory are the same bytes. The plaintext
and ciphertext SHA-256 are computed in the same pass. Memory is one chunk, whatever the size.

Resumption. Only whole ciphertext chunks are durable: a partial chunk lives in memory until
it is complete. After an interruption `PartWriter.open` cuts the staging object back to its
last whole chunk and rebuilds the secretstream state and both hashes by reading the stored
ciphertext and decrypting it: libsodium's pull state advances exactly as the push state did,
so the rebuilt state pushes the next chunk as if nothing had happened, and no byte the node
already holds is sent again over the network.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

import nacl.bindings as sodium
from nacl.exceptions import CryptoError

from app.crypto.envelope import (
    ABYTES,
    CHUNK_BYTES,
    TAG_FINAL,
    TAG_MESSAGE,
    EnvelopeError,
    ciphertext_length,
)
from app.evidence.beside import BesideHash
from app.evidence.blobstore import BlobStore, Upload

Kept = TypeVar("Kept")

CIPHER_CHUNK = CHUNK_BYTES + ABYTES


def chunk_count(plaintext_size: int) -> int:
    return max(1, -(-plaintext_size // CHUNK_BYTES))


class Pieces:
    """Bytes that arrive in pieces of any size, taken out again in exact lengths.

    A piece is kept as it came (bytes are immutable; anything else is copied once) and a
    length is taken with at most one copy: none when a piece is exactly that long, as a
    whole read of a blob is. Holding a list of pieces, not one growing buffer, avoids
    copying each byte in and again out.
    """

    __slots__ = ("_queue", "size")

    def __init__(self) -> None:
        self._queue: deque[bytes | memoryview] = deque()
        self.size = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            self._queue.append(data if isinstance(data, bytes) else bytes(data))
            self.size += len(data)

    def take(self, length: int) -> bytes:
        """The next `length` bytes; the caller checks that `size` holds them."""
        queue = self._queue
        if not length:
            return b""
        first = queue[0]
        if len(first) == length and isinstance(first, bytes):
            queue.popleft()
            self.size -= length
            return first
        parts: list[bytes | memoryview] = []
        need = length
        while need:
            piece = queue[0]
            if len(piece) <= need:
                parts.append(queue.popleft())
                need -= len(piece)
            else:
                view = memoryview(piece)
                parts.append(view[:need])
                queue[0] = view[need:]
                need = 0
        self.size -= length
        return b"".join(parts)

    def clear(self) -> None:
        self._queue.clear()
        self.size = 0


class UploadError(Exception):
    """The client sent bytes the part cannot take: wrong offset, or more than declared."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True)
class FinishedPart:
    digest: str  # ciphertext SHA-256, the blob's name and the header's part hash
    length: int  # ciphertext length
    plaintext_sha256: str
    plaintext_size: int


def _new_state(
    key: bytes, stream_header: bytes
) -> sodium.crypto_secretstream_xchacha20poly1305_state:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    # init_pull derives the same state init_push derives from this header.
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, stream_header, key)
    return state


class PartWriter:
    """Encrypts a part of a declared plaintext size into a blob store upload."""

    def __init__(
        self,
        upload: Upload,
        *,
        key: bytes,
        ad: bytes,
        stream_header: bytes,
        size: int,
    ) -> None:
        self._upload = upload
        self._key = key
        self._ad = ad
        self.size = size
        self._chunks_total = chunk_count(size)
        self.stream_header = stream_header
        self._state = _new_state(key, stream_header)
        self._plain_hash = BesideHash()
        self._cipher_hash = BesideHash()
        self._chunks_done = 0
        self._pending = Pieces()
        self.finished: FinishedPart | None = None
        self.resumed_bytes = 0
        # A push that failed part-way (the disk, say) left the state ahead of what is stored:
        # this writer is never used again; a new one rebuilds from the stored chunks.
        self.broken = False

    @classmethod
    def open(
        cls,
        store: BlobStore,
        upload_id: str,
        *,
        key: bytes,
        ad: bytes,
        stream_header: bytes,
        size: int,
    ) -> PartWriter:
        """Start a part, or resume it from the whole chunks its upload already holds."""
        writer = cls(
            store.upload(upload_id), key=key, ad=ad, stream_header=stream_header, size=size
        )
        try:
            writer._rebuild()
        except BaseException:  # chunks that do not open (EnvelopeError), a disk error
            writer.close()
            raise
        return writer

    @property
    def offset(self) -> int:
        """Plaintext bytes received, durable or still pending in memory."""
        if self.finished is not None:
            return self.size
        return self._chunks_done * CHUNK_BYTES + self._pending.size

    @property
    def durable_offset(self) -> int:
        """Plaintext bytes whose ciphertext is stored (whole chunks only)."""
        if self.finished is not None:
            return self.size
        return self._chunks_done * CHUNK_BYTES

    def _rebuild(self) -> None:
        stored = self._upload.size()
        whole = min(stored // CIPHER_CHUNK, self._chunks_total - 1)
        if stored != whole * CIPHER_CHUNK:
            # A torn chunk from a crash, or a final chunk whose finalise did not happen:
            # drop it; its plaintext will be sent again.
            self._upload.truncate(whole * CIPHER_CHUNK)
        for number, chunk in enumerate(self._upload.read_chunks(CIPHER_CHUNK)):
            if number >= whole:  # pragma: no cover - truncated above
                break
            try:
                message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                    self._state, chunk, self._ad
                )
            except (CryptoError, ValueError) as exc:
                raise EnvelopeError("decrypt_failed", "a stored chunk does not open") from exc
            if tag != TAG_MESSAGE:
                raise EnvelopeError("decrypt_failed", "a stored chunk has an unexpected tag")
            self._plain_hash.update(message)
            self._cipher_hash.update(chunk)
            self._chunks_done += 1
        self.resumed_bytes = self._chunks_done * CHUNK_BYTES

    def start_stream(self, stream_header: bytes) -> None:
        """Encrypt from the first byte under `stream_header` instead: only while nothing is
        stored (app/evidence/drafts.py, `start_stream`)."""
        if self._chunks_done or self.finished is not None or self._upload.size():
            raise AssertionError("a part's key stream changed after chunks were stored")
        self._pending.clear()
        self.stream_header = stream_header
        self._state = _new_state(self._key, stream_header)
        self._plain_hash = BesideHash()
        self._cipher_hash = BesideHash()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            raise RuntimeError("a PartWriter was used again after a failed push")
        if self.finished is not None and not data:
            return
        if self.finished is not None or self.offset + len(data) > self.size:
            raise UploadError("too_large", "more bytes than the attachment's declared size")
        self._pending.append(data)
        # The final chunk waits for `finalise`: pushed as the last bytes arrive, it would
        # close the part even if the same request then sent more than declared (refused).
        last = self._chunks_total - 1
        while self._pending.size >= CHUNK_BYTES and self._chunks_done < last:
            self._push(self._pending.take(CHUNK_BYTES))

    def write_all(self, pieces: Iterable[bytes]) -> None:
        for data in pieces:
            self.write(data)

    def _maybe_finish(self) -> None:
        if self.finished is None and self.offset == self.size:
            self._push(self._pending.take(self._pending.size))

    def _push(self, message: bytes) -> None:
        try:
            self._push_chunk(message)
        except BaseException:
            self.broken = True
            raise

    def _push_chunk(self, message: bytes) -> None:
        final = self._chunks_done == self._chunks_total - 1
        if final and self._chunks_done * CHUNK_BYTES + len(message) != self.size:
            raise AssertionError("the final chunk was pushed before its last byte")
        tag = TAG_FINAL if final else TAG_MESSAGE
        # The plaintext is hashed beside the push, the ciphertext beside the write.
        self._plain_hash.update(message)
        chunk = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, message, self._ad, tag
        )
        self._cipher_hash.update(chunk)
        self._upload.write(chunk)
        self._chunks_done += 1
        if final:
            self.finished = FinishedPart(
                digest=self._cipher_hash.hexdigest(),
                length=ciphertext_length(self.size),
                plaintext_sha256=self._plain_hash.hexdigest(),
                plaintext_size=self.size,
            )

    def suspend(self) -> None:
        """Between two requests of the client: the staging object is left to whoever writes
        next (another replica, say); `resume` tells whether this writer is still current."""
        self._upload.suspend()

    def resume(self) -> bool:
        """True if the staging object is as this writer left it (UploadBusy if another
        request writes it now)."""
        return self._upload.resume()

    def removed(self) -> bool:
        """Its staging object discarded meanwhile (its draft, say): this writer only keeps
        the removed file's space allocated."""
        return self._upload.removed()

    def stored_past(self, offset: int) -> bool:
        """Whether chunks past the whole-chunk `offset` were encrypted and written."""
        return self._upload.size() > offset // CHUNK_BYTES * CIPHER_CHUNK

    def rewind(self, offset: int) -> None:
        """Keep nothing past `offset`, a whole-chunk offset this writer held when a request
        began: the bytes of a refused request are not evidence. The writer is not used again
        (the next request rebuilds one from what is stored)."""
        self.broken = True
        self._pending.clear()
        self._upload.truncate(offset // CHUNK_BYTES * CIPHER_CHUNK)

    def drop_pending(self) -> None:
        """Forget the partial chunk: it was never pushed, so the state is unchanged and the
        client resends those bytes from `durable_offset`."""
        if self.finished is None:
            self._pending.clear()

    def checkpoint(self) -> int:
        """Make the whole chunks durable; returns the offset the client resumes from."""
        try:
            self._upload.sync()
        except BaseException:
            self.broken = True  # what was written may not be on disk: rebuild from it
            raise
        return self.durable_offset

    def finalise(self, store: BlobStore) -> FinishedPart:
        self._maybe_finish()
        if self.finished is None:
            raise UploadError("incomplete", f"{self.offset} of {self.size} bytes received")
        store.finalise(self._upload, self.finished.digest)
        return self.finished

    def close(self) -> None:
        self._upload.close()


def encrypt_stream(
    store: BlobStore,
    upload_id: str,
    source: Iterable[bytes],
    *,
    key: bytes,
    ad: bytes,
    stream_header: bytes,
    size: int,
) -> FinishedPart:
    """Encrypt an entire plaintext stream into the store (resuming what the upload holds)."""
    writer = PartWriter.open(
        store, upload_id, key=key, ad=ad, stream_header=stream_header, size=size
    )
    for data in source:
        writer.write(data)
    return writer.finalise(store)


def check_blob(reader: BinaryIO, *, length: int, sha256: str) -> None:
    """Length and ciphertext hash, in one streaming pass, before any plaintext is released.

    Each read is a new buffer, hashed beside the next read."""
    digest = BesideHash()
    seen = 0
    while data := reader.read(CIPHER_CHUNK):
        seen += len(data)
        if seen > length:
            raise EnvelopeError("malformed_envelope", "the part is longer than declared")
        digest.update(data)
    if seen < length:
        raise EnvelopeError("truncated_part", "the part is shorter than declared")
    if not hmac.compare_digest(digest.hexdigest(), sha256):
        raise EnvelopeError("part_hash_mismatch", "the part's hash does not match")


def decrypt_stream(
    chunks: Iterable[bytes],
    *,
    key: bytes,
    ad: bytes,
    stream_header: bytes,
    plaintext_size: int | None = None,
    plaintext_sha256: str | None = None,
) -> Iterator[bytes]:
    """Yield the plaintext chunk by chunk; raise, never end short, on any fault.

    `chunks` may be cut anywhere (network reads); they are regrouped into whole ciphertext
    chunks. The stream must end with TAG_FINAL and nothing after it, and, when given, the
    plaintext must have the manifest's size and SHA-256; the caller aborts its output on
    the exception, so a reader never takes a short or altered file for the real one.
    """
    try:
        state = _new_state(key, stream_header)
    except (CryptoError, ValueError) as exc:
        raise EnvelopeError("decrypt_failed", "invalid secretstream header") from exc
    plain_hash = BesideHash()
    produced = 0
    final = False
    pending = Pieces()

    def pull(chunk: bytes) -> bytes:
        nonlocal final, produced
        if final:
            raise EnvelopeError("decrypt_failed", "data after a part's final chunk")
        try:
            message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, chunk, ad)
        except (CryptoError, ValueError) as exc:
            raise EnvelopeError("decrypt_failed", "a part chunk failed authentication") from exc
        if tag == TAG_FINAL:
            final = True
        elif tag != TAG_MESSAGE:
            raise EnvelopeError("decrypt_failed", "a part chunk carries an unexpected tag")
        produced += len(message)
        plain_hash.update(message)
        return bytes(message)

    for data in chunks:
        pending.append(data)
        while pending.size >= CIPHER_CHUNK:
            yield pull(pending.take(CIPHER_CHUNK))
    if pending.size:
        if pending.size < ABYTES:
            raise EnvelopeError("truncated_part", "part ends inside a chunk")
        yield pull(pending.take(pending.size))
    if not final:
        raise EnvelopeError("truncated_part", "part ends without a final chunk")
    if plaintext_size is not None and produced != plaintext_size:
        raise EnvelopeError("manifest_mismatch", "the attachment's size differs from the manifest")
    if plaintext_sha256 is not None and not hmac.compare_digest(
        plain_hash.hexdigest(), plaintext_sha256
    ):
        raise EnvelopeError("manifest_mismatch", "the attachment's hash differs from the manifest")


def read_blob(reader: BinaryIO, read_bytes: int = CIPHER_CHUNK) -> Iterator[bytes]:
    while chunk := reader.read(read_bytes):
        yield chunk


class StoredChunkDamaged(EnvelopeError):
    """A chunk stored earlier no longer opens; those before `offset` did."""

    def __init__(self, cause: EnvelopeError, *, offset: int) -> None:
        super().__init__(cause.code, cause.detail)
        self.offset = offset


class _ChunkUnopened(EnvelopeError):
    """A chunk failed authentication and changed nothing in the receiver."""


class PartReceiver:
    """Takes a part's ciphertext as it arrives from a peer, checking it while it streams.

    Each whole chunk is authenticated (pulled) before it is written, so the stored prefix is
    always a valid prefix of the part; the last chunk must carry TAG_FINAL, and at the end the
    length, the ciphertext SHA-256 (from the signed header) and the plaintext size and SHA-256
    (from the manifest) must all match before the blob is published. Resumption works as for
    `PartWriter`: the state and both hashes are rebuilt from the stored whole chunks.
    """

    def __init__(
        self,
        upload: Upload,
        *,
        key: bytes,
        ad: bytes,
        stream_header: bytes,
        length: int,
        sha256: str,
        plaintext_size: int,
        plaintext_sha256: str,
    ) -> None:
        if length < ABYTES or length != ciphertext_length(plaintext_size):
            raise EnvelopeError("manifest_mismatch", "the part's length does not fit its size")
        self._upload = upload
        self._ad = ad
        self.length = length
        self._sha256 = sha256
        self._plaintext_size = plaintext_size
        self._plaintext_sha256 = plaintext_sha256
        self._chunks_total = chunk_count(plaintext_size)
        try:
            self._state = _new_state(key, stream_header)
        except (CryptoError, ValueError) as exc:
            raise EnvelopeError("decrypt_failed", "invalid secretstream header") from exc
        self._plain_hash = BesideHash()
        self._cipher_hash = BesideHash()
        self._chunks_done = 0
        self._stored = 0
        self._pending = Pieces()
        self.complete = False
        # Set when the receiver's state may no longer be its stored chunks' (a chunk that
        # opened but carried the wrong tag, a failed write): it is never used again, and its
        # part restarts from what is stored. A chunk that does not open leaves it as it was.
        self.failed = False
        self.opened_at = 0  # the offset it was opened (rebuilt from disk) at
        # Set by `open` when a stored chunk no longer opened: where the part was cut back to,
        # and why; for the caller to put on record once.
        self.cut_back: tuple[int, EnvelopeError] | None = None

    @classmethod
    def open(
        cls,
        store: BlobStore,
        upload_id: str,
        *,
        key: bytes,
        ad: bytes,
        stream_header: bytes,
        length: int,
        sha256: str,
        plaintext_size: int,
        plaintext_sha256: str,
    ) -> PartReceiver:
        upload = store.upload(upload_id)

        def rebuilt() -> PartReceiver:
            receiver = cls(
                upload,
                key=key,
                ad=ad,
                stream_header=stream_header,
                length=length,
                sha256=sha256,
                plaintext_size=plaintext_size,
                plaintext_sha256=plaintext_sha256,
            )
            receiver._rebuild()
            return receiver

        try:
            try:
                receiver = rebuilt()
            except StoredChunkDamaged as damaged:
                # A stored chunk no longer opens (this node's disk: each was checked before it
                # was stored). The chunks before it still do: cut back to them, not to 0, so
                # that the sender resends the damage, not the whole part (from review).
                upload.truncate(damaged.offset)
                receiver = rebuilt()
                receiver.cut_back = (damaged.offset, damaged)
        except BaseException:
            upload.close()
            raise
        receiver.opened_at = receiver.durable_offset
        return receiver

    @property
    def durable_offset(self) -> int:
        """Ciphertext bytes stored and checked: whole chunks only."""
        return self.length if self.complete else self._stored

    def _rebuild(self) -> None:
        stored = self._upload.size()
        whole = min(stored // CIPHER_CHUNK, self._chunks_total - 1)
        if stored != whole * CIPHER_CHUNK:
            self._upload.truncate(whole * CIPHER_CHUNK)
        for number, chunk in enumerate(self._upload.read_chunks(CIPHER_CHUNK)):
            if number >= whole:  # pragma: no cover - truncated above
                break
            try:
                self._pull(chunk, store=False)
            except EnvelopeError as exc:
                raise StoredChunkDamaged(exc, offset=number * CIPHER_CHUNK) from exc

    def _pull(self, chunk: bytes, *, store: bool) -> None:
        try:
            self._pull_chunk(chunk, store=store)
        except _ChunkUnopened:
            raise
        except BaseException:
            self.failed = True
            raise

    def _pull_chunk(self, chunk: bytes, *, store: bool) -> None:
        final = self._chunks_done == self._chunks_total - 1
        # The ciphertext is hashed beside the pull, the plaintext beside the write.
        self._cipher_hash.update(chunk)
        try:
            message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, chunk, self._ad
            )
        except (CryptoError, ValueError) as exc:
            # libsodium changes the state only once a chunk's tag is authentic; with the
            # chunk taken out of the hash, the receiver is as it was, so one bad chunk from
            # anyone who knows the msg_id costs no rebuild (reading back the whole part).
            self._cipher_hash.undo_last()
            raise _ChunkUnopened("decrypt_failed", "a part chunk failed authentication") from exc
        if tag != (TAG_FINAL if final else TAG_MESSAGE):
            raise EnvelopeError("decrypt_failed", "a part chunk carries the wrong tag")
        self._plain_hash.update(message)
        if store:
            self._upload.write(chunk)
        self._chunks_done += 1
        self._stored += len(chunk)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.failed:
            raise RuntimeError("a PartReceiver was used again after a failed chunk")
        if self.complete or self._stored + self._pending.size + len(data) > self.length:
            raise EnvelopeError("malformed_envelope", "the part is longer than declared")
        self._pending.append(data)
        while self._pending.size:
            final = self._chunks_done == self._chunks_total - 1
            need = self.length - self._stored if final else CIPHER_CHUNK
            if self._pending.size < need:
                break
            self._pull(self._pending.take(need), store=True)
        if self._stored == self.length:
            self._complete()

    def write_all(self, pieces: Iterable[bytes]) -> None:
        for data in pieces:
            self.write(data)

    def _complete(self) -> None:
        if not hmac.compare_digest(self._cipher_hash.hexdigest(), self._sha256):
            raise EnvelopeError("part_hash_mismatch", "the part's hash does not match")
        if not hmac.compare_digest(self._plain_hash.hexdigest(), self._plaintext_sha256):
            raise EnvelopeError("manifest_mismatch", "an attachment differs from the manifest")
        self.complete = True

    def drop_pending(self) -> None:
        """Forget a partial chunk (never stored): the sender resends it from `durable_offset`."""
        self._pending.clear()

    def stored_matches(self) -> bool:
        """Whether the staging object still holds exactly what this receiver stored."""
        return not self.complete and not self.failed and self._upload.size() == self._stored

    def suspend(self) -> None:
        """Between two requests of the sender: another replica may receive the next one."""
        self._upload.suspend()

    def resume(self) -> bool:
        """True if the staging object is as this receiver left it (UploadBusy if another
        request writes it now)."""
        return self._upload.resume()

    def checkpoint(self) -> int:
        try:
            self._upload.sync()
        except BaseException:
            self.failed = True  # what was written may not be on disk: rebuild from it
            raise
        return self.durable_offset

    def finalise(self, store: BlobStore) -> str:
        if not self.complete:
            raise EnvelopeError("truncated_part", "the part is not complete")
        store.finalise(self._upload, self._sha256)
        return self._sha256

    def close(self) -> None:
        self._upload.close()


def least_recent_past(kept: dict[str, tuple[Kept, float]], most: int) -> list[Kept]:
    """Take the least recently kept entries out of `kept` until it holds `most`, and return
    them to be closed: a cache of writers or receivers (a dict keeps insertion order, and
    each entry is taken out while in use and put back after it)."""
    return [kept.pop(next(iter(kept)))[0] for _ in range(len(kept) - most)]

"""Sending an envelope whose large parts are in the blob store (docs/protocol.md section 8.5).

Announce the envelope (header, signature, part 0), then, part by part in order, ask the peer
how many bytes it already holds (HEAD) and stream the rest from there, in one or more PUTs of
whole chunks (each answered with the peer's new offset), so that no single request has to
outlast the client's deadline however large the part. A broken connection costs at most the
chunk it cut: the next attempt resumes at the peer's durable offset. The peer's answer to the
last part, or to a repeated announce once everything arrived, is the signed receipt, handled
exactly as the answer to an inline envelope.

The sender's own blobs are checked before they can be blamed on the peer: a part's length
before any of it is sent (cheap: a truncated or missing blob is found before its bytes go;
a part the peer already holds whole is not looked at), and its whole ciphertext hash when the
peer refuses what it was sent as damaged, for good. A blob that
fails either is `StoredPartCorrupt`: the node's own fault, which no retry mends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import httpx
from nacl.signing import SigningKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crypto.encoding import b64d, load_canonical_object, sha256, utc_now
from app.crypto.envelope import EnvelopeError
from app.crypto.part_put import HEADER as PART_PUT_HEADER
from app.crypto.part_put import sign_part_put
from app.errors import ERROR_HEADER, PeerError
from app.evidence.blobstore import BlobError, BlobStore
from app.evidence.stream import CIPHER_CHUNK, check_blob
from app.models import BlobPart, Message
from app.peers.client import PeerAnswer, read_json_bounded, retry_after_of

ANNOUNCE_PATH = "/p2p/v1/evidence/envelopes"
READ_BYTES = 1 << 20
# A part goes in one or more PUTs (segments) of whole chunks, sized by SegmentSizer.
FIRST_SEGMENT_CHUNKS = 32
MIN_SEGMENT_CHUNKS = 4
MAX_SEGMENT_CHUNKS = 4096
DEFAULT_SEGMENT_SECONDS = 30.0
# Rounds over the parts within one attempt: the peer may ask again for a part whose blob it
# lost (section 8.5); past these, the delivery is retried later rather than looping.
PART_ROUNDS = 3
# The peer's refusals of a part's bytes as damaged: the sender's own blob is checked before
# the refusal is taken for the peer's answer (the blob may be what is damaged).
DAMAGE_REFUSALS = frozenset(
    {"decrypt_failed", "part_hash_mismatch", "truncated_part", "malformed_envelope"}
)
# Answers to the announcement from a peer without section 8.5: the route is unknown to it.
NOT_STREAMING = frozenset({404, 405})


class TakesNoStreamedParts(Exception):
    """The peer answered the announcement as a node without section 8.5 does: the route is
    unknown to it (404, 405). It still takes the envelope whole, by section 8.2."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the peer answered the announcement HTTP {status}")
        self.status = status


class StoredPartCorrupt(Exception):
    """The sender's own blob of a part is not what it sealed: missing, of another length, or
    with another hash. Not the peer's fault, and no attempt mends it until the blob is put
    back (from a backup). The message names the part and what is wrong, nothing secret."""


@dataclass(frozen=True)
class StreamedPart:
    index: int
    digest: str
    length: int


def blob_parts(session: Session, message: Message) -> list[StreamedPart]:
    rows = session.scalars(
        select(BlobPart).where(BlobPart.message_id == message.id).order_by(BlobPart.part_index)
    )
    return [StreamedPart(row.part_index, row.digest, row.length) for row in rows]


def read_answer(response: httpx.Response) -> PeerAnswer:
    try:
        body = read_json_bounded(response)
    except PeerError:
        body = None
    return PeerAnswer(response.status_code, body, retry_after_of(response, utc_now()))


def _offset(response: httpx.Response) -> int:
    value = response.headers.get("upload-offset", "0")
    return int(value) if value.isdigit() else 0


def _segment_seconds(http: httpx.Client) -> float:
    # The peer client ends any exchange at a deadline (four times its timeout, see
    # app.peers.client): a request lasting about one timeout stays well inside it.
    return http.timeout.read or DEFAULT_SEGMENT_SECONDS


class SegmentSizer:
    """How many bytes the next PUT of a part carries: whole chunks, about `seconds` worth at
    the rate the last one went, so that no request outlives the client's deadline on a slow
    link and a fast one pays for few requests (each ends with the receiver's fsync)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._chunks = FIRST_SEGMENT_CHUNKS

    def next_bytes(self) -> int:
        return self._chunks * CIPHER_CHUNK

    def observe(self, sent: int, seconds: float) -> None:
        rate = sent / max(seconds, 1e-3)
        chunks = int(rate * self.seconds) // CIPHER_CHUNK
        self._chunks = max(MIN_SEGMENT_CHUNKS, min(MAX_SEGMENT_CHUNKS, chunks))


def _body(
    store: BlobStore,
    part: StreamedPart,
    offset: int,
    end: int,
    keep_alive: Callable[[], bool],
) -> Iterator[bytes]:
    renewed = time.monotonic()
    left = end - offset
    with open_blob(store, part) as blob:
        blob.seek(offset)
        while left and (chunk := blob.read(min(READ_BYTES, left))):
            left -= len(chunk)
            if time.monotonic() - renewed > 10:
                # Long transfers keep their outbox lease; a lost lease stops this one.
                if not keep_alive():
                    raise PeerError("the delivery was taken over by another worker")
                renewed = time.monotonic()
            yield chunk
    if left:  # cut short while it was being sent: the body would end before its length
        raise StoredPartCorrupt(f"part {part.index}: the blob ended {left} bytes early")


def open_blob(store: BlobStore, part: StreamedPart) -> BinaryIO:
    try:
        return store.open(part.digest)
    except BlobError as exc:
        raise StoredPartCorrupt(f"part {part.index}: the blob is missing") from exc


def check_length(store: BlobStore, part: StreamedPart) -> None:
    """The part's blob is there with its sealed length, before any of it is sent."""
    try:
        size = store.size(part.digest)
    except BlobError as exc:
        raise StoredPartCorrupt(f"part {part.index}: the blob is missing") from exc
    if size != part.length:
        raise StoredPartCorrupt(
            f"part {part.index}: the blob holds {size} bytes, not {part.length}"
        )


def check_own_blob(store: BlobStore, part: StreamedPart, keep_alive: Callable[[], bool]) -> None:
    """The whole blob against the hash the signed header gives it (one streaming pass, the
    lease kept as while sending: a part may be tens of GiB)."""
    with open_blob(store, part) as blob:
        try:
            check_blob(
                _Renewing(blob, keep_alive),  # type: ignore[arg-type]  # read() is all it uses
                length=part.length,
                sha256=part.digest,
            )
        except EnvelopeError as exc:
            raise StoredPartCorrupt(f"part {part.index}: {exc.detail}") from exc


class _Renewing:
    """A blob read to its end, renewing the delivery's lease every 10 s of reading."""

    def __init__(self, blob: BinaryIO, keep_alive: Callable[[], bool]) -> None:
        self._blob, self._keep_alive = blob, keep_alive
        self._renewed = time.monotonic()

    def read(self, size: int) -> bytes:
        if time.monotonic() - self._renewed > 10:
            if not self._keep_alive():
                raise PeerError("the delivery was taken over by another worker")
            self._renewed = time.monotonic()
        return self._blob.read(size)


def send_streamed(
    http: httpx.Client,
    base_url: str,
    wire: dict[str, object],
    parts: list[StreamedPart],
    store: BlobStore,
    *,
    headers: dict[str, str],
    keep_alive: Callable[[], bool],
    signing_key: SigningKey,
) -> PeerAnswer:
    """Returns the peer's final answer: a receipt (200/201) or a refusal. Raises
    TakesNoStreamedParts if the peer has no section 8.5, StoredPartCorrupt if a part's own
    blob is damaged, PeerError or httpx's errors if the exchange broke off."""
    announce_url = base_url + ANNOUNCE_PATH
    content = json.dumps(wire).encode()
    json_headers = {**headers, "content-type": "application/json"}
    with http.stream("POST", announce_url, content=content, headers=json_headers) as response:
        answer = read_answer(response)
    if answer.status in NOT_STREAMING:
        raise TakesNoStreamedParts(answer.status)
    msg_id = _msg_id(wire)
    envelope_hash = sha256(b64d(str(wire["header"]))).hex()

    def signed(index: int, offset: int) -> str:
        return sign_part_put(signing_key, envelope_hash, index, offset)

    sizer = SegmentSizer(_segment_seconds(http))
    rounds = 0
    while answer.status == 202:
        if rounds == PART_ROUNDS:
            raise PeerError("the peer still asks for parts it was sent")  # retried later
        rounds += 1
        refused = _send_parts(
            http,
            base_url,
            msg_id,
            parts,
            store,
            sizer,
            headers=headers,
            keep_alive=keep_alive,
            signed=signed,
        )
        if refused is not None:
            return refused  # the receipt (200, 201) or a refusal
        # Every part was there (an earlier attempt's answer was lost): announce again, and
        # the peer, now complete, answers with the receipt. Or it asks again for a part
        # whose blob it found gone meanwhile (202, its offsets): sent again, not given up.
        with http.stream("POST", announce_url, content=content, headers=json_headers) as response:
            answer = read_answer(response)
    return answer


def _send_parts(
    http: httpx.Client,
    base_url: str,
    msg_id: str,
    parts: list[StreamedPart],
    store: BlobStore,
    sizer: SegmentSizer,
    *,
    headers: dict[str, str],
    keep_alive: Callable[[], bool],
    signed: Callable[[int, int], str],
) -> PeerAnswer | None:
    """Each part from where the peer holds it; the peer's answer if it ends the exchange (a
    receipt or a refusal), None once every part is there."""
    for part in parts:
        url = f"{base_url}/p2p/v1/evidence/envelopes/{msg_id}/parts/{part.index}"
        head = http.head(url, headers=headers)
        if head.status_code != 204:
            return PeerAnswer(
                head.status_code, _head_refusal(head), retry_after_of(head, utc_now())
            )
        offset = _offset(head)
        if offset < part.length:  # a part the peer holds whole is not read (nor needed)
            check_length(store, part)
        while offset < part.length:
            end = min(part.length, offset + sizer.next_bytes())
            put_headers = {
                **headers,
                "upload-offset": str(offset),
                PART_PUT_HEADER: signed(part.index, offset),
                "content-length": str(end - offset),
                "content-type": "application/octet-stream",
            }
            started = time.monotonic()
            with http.stream(
                "PUT",
                url,
                content=_body(store, part, offset, end, keep_alive),
                headers=put_headers,
            ) as response:
                answer = read_answer(response)
            if answer.status != 204:
                if _refused_as_damaged(answer):
                    check_own_blob(store, part, keep_alive)  # ours, or the peer's to answer for
                return answer
            reached = _offset(response)
            if reached <= offset:  # the delivery is retried later, from the peer's offset
                raise PeerError("the peer's offset did not advance")
            sizer.observe(reached - offset, time.monotonic() - started)
            offset = reached
    return None


def _refused_as_damaged(answer: PeerAnswer) -> bool:
    """A final refusal of the part's bytes as damaged (400, as the receiver sends it). Not
    any other status: a peer answering 503 with such a code would make every retry read a
    whole blob (from review), and a retried delivery is checked when it is refused for good."""
    body = answer.body
    return answer.status == 400 and isinstance(body, dict) and body.get("error") in DAMAGE_REFUSALS


def _head_refusal(head: httpx.Response) -> dict[str, str] | None:
    """A refused HEAD's code, which has no body to carry it: in its `Entraide-Error` header,
    or, from a peer that sends none, `unknown_transfer` for a 404 (section 8.5: announce
    again). Without it a retryable refusal read as a final one, and failed the delivery."""
    code = head.headers.get(ERROR_HEADER) or (
        "unknown_transfer" if head.status_code == 404 else None
    )
    return {"error": code} if code else None


def _msg_id(wire: dict[str, object]) -> str:
    header = load_canonical_object(b64d(str(wire["header"])))
    return str(header["msg_id"])

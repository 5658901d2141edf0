"""Sending an envelope whose large parts are in the blob store (docs/protocol.md section 8.5).

Announce the envelope (header, signature, part 0), then, part by part in order, ask the peer
how many bytes it already holds (HEAD) and stream the rest from there (PUT). A broken
connection costs at most the chunk it cut: the next attempt resumes at the peer's durable
offset. The peer's answer to the last part, or to a repeated announce once everything
arrived, is the signed receipt, handled exactly as the answer to an inline envelope.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crypto.encoding import b64d, load_canonical_object
from app.errors import PeerError
from app.evidence.blobstore import BlobStore
from app.models import BlobPart, Message
from app.peers.client import read_json_bounded

ANNOUNCE_PATH = "/p2p/v1/evidence/envelopes"
READ_BYTES = 1 << 20


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


def _answer(response: httpx.Response) -> object:
    try:
        return read_json_bounded(response)
    except PeerError:
        return None


def _body(
    store: BlobStore, part: StreamedPart, offset: int, keep_alive: Callable[[], bool]
) -> Iterator[bytes]:
    renewed = time.monotonic()
    with store.open(part.digest) as blob:
        blob.seek(offset)
        while chunk := blob.read(READ_BYTES):
            if time.monotonic() - renewed > 10:
                # Long transfers keep their outbox lease; a lost lease stops this one.
                if not keep_alive():
                    raise PeerError("the delivery was taken over by another worker")
                renewed = time.monotonic()
            yield chunk


def send_streamed(
    http: httpx.Client,
    base_url: str,
    wire: dict[str, object],
    parts: list[StreamedPart],
    store: BlobStore,
    *,
    headers: dict[str, str],
    keep_alive: Callable[[], bool],
) -> tuple[int, object]:
    """Returns the peer's final (status, body): a receipt (200/201) or a refusal."""
    announce_url = base_url + ANNOUNCE_PATH
    content = json.dumps(wire).encode()
    json_headers = {**headers, "content-type": "application/json"}
    with http.stream("POST", announce_url, content=content, headers=json_headers) as response:
        status, body = response.status_code, _answer(response)
    if status != 202:
        return status, body
    msg_id = _msg_id(wire)
    for part in parts:
        url = f"{base_url}/p2p/v1/evidence/envelopes/{msg_id}/parts/{part.index}"
        head = http.head(url, headers=headers)
        if head.status_code != 204:
            return head.status_code, None
        offset = int(head.headers.get("upload-offset", "0"))
        if offset >= part.length:
            continue
        put_headers = {
            **headers,
            "upload-offset": str(offset),
            "content-length": str(part.length - offset),
            "content-type": "application/octet-stream",
        }
        with http.stream(
            "PUT", url, content=_body(store, part, offset, keep_alive), headers=put_headers
        ) as response:
            status, body = response.status_code, _answer(response)
        if status in (200, 201):
            return status, body
        if status != 204:
            return status, body
    # Every part was already there (an earlier attempt's answer was lost): announce again,
    # and the peer, now complete, answers with the receipt.
    with http.stream("POST", announce_url, content=content, headers=json_headers) as response:
        return response.status_code, _answer(response)


def _msg_id(wire: dict[str, object]) -> str:
    header = load_canonical_object(b64d(str(wire["header"])))
    return str(header["msg_id"])

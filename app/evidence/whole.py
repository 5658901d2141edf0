"""Sending an envelope with parts in the blob store: streamed, or whole to a peer that takes
no streamed parts.

A receiver that implements docs/protocol.md section 8.5 must also accept envelopes by section
8.2, but one that implements only 8.2 answers the announcement 404 (or 405). The envelope is
the same either way (same header, signature and parts), so it is then posted whole, its parts
read from the blob store, when it fits in one request body; otherwise nothing can carry it to
that peer, and the delivery fails saying so, not as the peer's bare 404 (from review: it
failed at once, and section 8.2 was never tried).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable

import httpx
from nacl.signing import SigningKey

from app.crypto.encoding import b64e
from app.evidence.blobstore import BlobStore
from app.evidence.transfer import (
    StoredPartCorrupt,
    StreamedPart,
    TakesNoStreamedParts,
    check_length,
    open_blob,
    read_answer,
    send_streamed,
)
from app.peers.client import ENVELOPES_PATH, PeerAnswer

log = logging.getLogger(__name__)
READ_BYTES = 1 << 20


class TooLargeForOnePost(Exception):
    """The peer takes no streamed parts and the envelope is over the body limit of a single
    post: no carriage is left to that peer until it implements section 8.5."""

    def __init__(self, status: int, size: int, limit: int) -> None:
        super().__init__(
            f"the peer does not accept streamed evidence (its answer to the announcement: "
            f"HTTP {status}), and the envelope, {size} bytes whole, is over the {limit}-byte "
            "limit of a single post (docs/protocol.md section 8.2)"
        )
        self.status = status


def send_evidence(
    http: httpx.Client,
    base_url: str,
    wire: dict[str, object],
    parts: list[StreamedPart],
    store: BlobStore,
    *,
    max_body_bytes: int,
    without_parts: set[str],
    headers: dict[str, str],
    keep_alive: Callable[[], bool],
    signing_key: SigningKey,
) -> PeerAnswer:
    """The peer's final answer, as `send_streamed` gives it. `max_body_bytes`: the limit a
    peer is held to for a single post, this node's own (section 7). `without_parts`: the
    peers (base URLs) found without section 8.5, kept by the caller; an envelope that fits is
    posted to them whole at once, not announced again (a peer may count each 404 against our
    address as a refused call, as ours does), and one that does not is announced all the same,
    in case the peer has gained section 8.5 since. Raises TooLargeForOnePost besides what
    `send_streamed` raises."""
    size = whole_size(wire, parts)
    if base_url in without_parts and size <= max_body_bytes:
        return post_whole(http, base_url, wire, parts, store, headers=headers)
    try:
        answer = send_streamed(
            http,
            base_url,
            wire,
            parts,
            store,
            headers=headers,
            keep_alive=keep_alive,
            signing_key=signing_key,
        )
    except TakesNoStreamedParts as older:
        without_parts.add(base_url)
        if size > max_body_bytes:
            raise TooLargeForOnePost(older.status, size, max_body_bytes) from older
        log.info("peer at %s takes no streamed parts: envelopes are posted whole", base_url)
        return post_whole(http, base_url, wire, parts, store, headers=headers)
    without_parts.discard(base_url)
    return answer


def whole_size(wire: dict[str, object], parts: list[StreamedPart]) -> int:
    """The exact length of the body `post_whole` sends: the announcement's, plus each part as
    `, "<base64>"` in the list json.dumps writes."""
    return len(json.dumps(wire).encode()) + sum(4 + 4 * -(-part.length // 3) for part in parts)


def post_whole(
    http: httpx.Client,
    base_url: str,
    wire: dict[str, object],
    parts: list[StreamedPart],
    store: BlobStore,
    *,
    headers: dict[str, str],
) -> PeerAnswer:
    """`wire`: the announcement (header, signature, the parts held in the database); `parts`:
    the others, in order."""
    held = list(wire["parts"]) if isinstance(wire["parts"], list) else []
    for part in parts:
        if part.index != len(held):
            raise StoredPartCorrupt(f"part {part.index}: the parts before it are not all stored")
        held.append(b64e(_read(store, part)))
    content = json.dumps({**wire, "parts": held}).encode()
    json_headers = {**headers, "content-type": "application/json"}
    with http.stream(
        "POST", base_url + ENVELOPES_PATH, content=content, headers=json_headers
    ) as response:
        return read_answer(response)


def _read(store: BlobStore, part: StreamedPart) -> bytes:
    """The part's whole blob, checked against the signed header's length and hash first: the
    peer would refuse a damaged part for good, as if the fault were its own."""
    check_length(store, part)
    pieces, left = [], part.length + 1  # one byte more: a blob grown since is found
    with open_blob(store, part) as blob:
        while left and (piece := blob.read(min(READ_BYTES, left))):
            pieces.append(piece)
            left -= len(piece)
    data = b"".join(pieces)
    if len(data) != part.length:
        raise StoredPartCorrupt(f"part {part.index}: the blob holds {len(data)} bytes")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), part.digest):
        raise StoredPartCorrupt(f"part {part.index}: the part's hash does not match")
    return data

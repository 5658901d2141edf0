"""A listed message's streamed parts, into the restored node's blob store.

Each part is the ciphertext its sender's signed header names by length and SHA-256, so
wherever it comes from, it is taken only once it matches both: from this node's own blob
store when that holds it already (a volume that survived the loss of the database; blobs
are named by that hash), else from the peer (`POST /p2p/v1/recovery/parts`), streamed into a
staging upload, checked, and published under its hash. A part that does not check out is
discarded and the message not taken back.
"""

from __future__ import annotations

import hmac

import httpx

from app.crypto import envelope as env
from app.crypto.encoding import utc_now
from app.evidence.beside import BesideHash
from app.evidence.blobstore import BlobError, DirectoryBlobStore
from app.evidence.node_store import blob_store
from app.evidence.stream import check_blob
from app.node import Node
from app.peers.client import make_http_client
from app.recovery.request import sign_part_request
from app.tls import client_context

PARTS_PATH = "/p2p/v1/recovery/parts"


class PartUnavailable(Exception):
    """A part that could not be had whole and checked (said in the summary)."""


# A part's whole exchange is bounded (as every exchange with a peer is, app/peers/client.py)
# by a deadline its size sets: this much, plus a second per this many bytes.
DEADLINE_SECONDS = 60.0
BYTES_PER_SECOND = 1_000_000


def fetch_parts(node: Node, *, peer: str, peer_url: str, header: env.Header) -> None:
    """Every part past the manifest into the blob store, checked; PartUnavailable if one
    cannot be."""
    store = blob_store(node.settings)
    for info in header.parts[1:]:
        if _held(store, info):
            continue
        deadline = DEADLINE_SECONDS + info.length / BYTES_PER_SECOND
        tls = client_context(node.settings)
        with make_http_client(
            node.settings.peer_timeout_seconds, tls=tls, deadline_seconds=deadline
        ) as http:
            _fetch(node, http, store, peer=peer, peer_url=peer_url, msg_id=header.msg_id, info=info)


def _held(store: DirectoryBlobStore, info: env.PartInfo) -> bool:
    """Whether the store holds the part whole; if so, marked as fresh, so that the sweep of
    unreferenced blobs (which spares the recent ones) leaves it until its row is stored."""
    try:
        if not store.exists(info.sha256) or store.size(info.sha256) != info.length:
            return False
        with store.open(info.sha256) as reader:
            check_blob(reader, length=info.length, sha256=info.sha256)
        store.touch(info.sha256)
    except (env.EnvelopeError, OSError, BlobError):
        return False  # damaged or gone here: fetched again, and replaced whole
    return True


def still_held(node: Node, header: env.Header) -> None:
    """In the transaction that stores the message: every part is still in the store (a
    sweep may have removed one meanwhile), as a completed transfer is checked."""
    store = blob_store(node.settings)
    for info in header.parts[1:]:
        try:
            whole = store.exists(info.sha256) and store.size(info.sha256) == info.length
        except (OSError, BlobError):
            whole = False
        if not whole:
            raise PartUnavailable(f"part {info.index} went missing meanwhile: run it again")


def _fetch(
    node: Node,
    http: httpx.Client,
    store: DirectoryBlobStore,
    *,
    peer: str,
    peer_url: str,
    msg_id: str,
    info: env.PartInfo,
) -> None:
    keys = node.keys
    body = sign_part_request(
        keys.signing,
        sig_kid=keys.signing_kid,
        from_authority=node.authority_id,
        to_authority=peer,
        msg_id=msg_id,
        index=info.index,
        offset=0,
        created_at=utc_now(),
    )
    upload_id = f"recover-{msg_id}-{info.index}"
    try:
        upload = store.upload(upload_id)  # locked: one writer, whatever runs beside us
        upload.truncate(0)  # what an interrupted run left: fetched anew
    except BlobError as exc:
        raise PartUnavailable(f"part {info.index} cannot be staged here: {exc}") from exc
    published = False
    try:
        digest = BesideHash()
        seen = 0
        with http.stream("POST", peer_url + PARTS_PATH, json=body) as response:
            if response.status_code != 200:  # its body unread: the peer's words, unbounded
                raise PartUnavailable(
                    f"the peer answered HTTP {response.status_code} for part {info.index}"
                )
            for data in response.iter_raw():  # as sent: no decompression asked for
                seen += len(data)
                if seen > info.length:
                    raise PartUnavailable(f"part {info.index} is longer than its header says")
                digest.update(bytes(data))
                upload.write(bytes(data))
        if seen != info.length or not hmac.compare_digest(digest.hexdigest(), info.sha256):
            raise PartUnavailable(f"part {info.index} is not the one its signed header names")
        store.finalise(upload, info.sha256)
        published = True
    except httpx.HTTPError as exc:
        raise PartUnavailable(
            f"part {info.index} could not be fetched ({type(exc).__name__}): run it again"
        ) from exc
    except BlobError as exc:  # a full disk, say: said, and the next message tried
        raise PartUnavailable(f"part {info.index} could not be stored here: {exc}") from exc
    finally:
        upload.close()
        if not published:
            store.discard_upload(upload_id)

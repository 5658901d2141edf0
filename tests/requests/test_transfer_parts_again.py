"""A receiver may ask again for a part it held (its blob gone meanwhile: a restore from an
older backup, a damaged disk): it answers the sender's final announce with 202 and the
offsets it still needs. The sender sends the part again; it used to take the 202 as the
peer's final answer and fail the delivery for good (from review)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from app.crypto.encoding import b64d, utc_now
from app.crypto.envelope import Attachment, Recipient, seal
from app.crypto.randomness import SystemRandomness
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.node_store import blob_store
from app.evidence.transfer import StreamedPart, send_streamed
from tests.requests.conftest import Harness, example_document


def _sealed(ar: Harness) -> tuple[dict[str, Any], list[bytes]]:
    envelope = seal(
        sender_keys=ar.peer_keys,
        sender_authority="ES/MJ",
        recipient=Recipient("AR/MPF", ar.node.keys.encryption_public),
        content={"kind": "request", "document": example_document()},
        attachments=[
            Attachment(f"e{index}.bin", "application/octet-stream", os.urandom(size))
            for index, size in ((1, 300_000), (2, LARGE))
        ],
        conversation_id=None,
        in_reply_to=None,
        created_at=utc_now(),
        ttl=timedelta(days=1),
        randomness=SystemRandomness(),
    )
    wire: dict[str, Any] = envelope.to_wire()
    return wire, [b64d(part) for part in wire["parts"]]


LARGE = 8 * 2**20  # more than loopback's socket buffers hold: the receiver reads as it goes


class _Reader:
    """The sender's blob of the second part; once most of it was read for sending (so the
    receiver is well into that PUT), the receiver's copy of the first part goes."""

    def __init__(self, blob: Any, lose: Any) -> None:
        self._blob, self._lose, self._read = blob, lose, 0

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *_: object) -> None:
        self._blob.close()

    def seek(self, offset: int) -> None:
        self._blob.seek(offset)
        self._read = offset

    def read(self, size: int) -> bytes:
        if self._read >= LARGE - 2**20:
            self._lose()
        data: bytes = self._blob.read(size)
        self._read += len(data)
        return data


class _LosesTheFirstPartWhileTheSecondGoes(DirectoryBlobStore):
    """The sender's store, from which the fault at the receiver's disk is injected so that it
    lands while the transfer runs (a restore from an older backup, a damaged disk)."""

    def __init__(self, root: Path, receiver: DirectoryBlobStore, lost: str, during: str) -> None:
        super().__init__(root)
        self._receiver, self._lost, self._during = receiver, lost, during
        self.done = False

    def _lose(self) -> None:
        if not self.done:
            self.done = True
            self._receiver.delete(self._lost)

    def open(self, digest: str) -> Any:
        blob = super().open(digest)
        return _Reader(blob, self._lose) if digest == self._during else blob


def test_a_part_the_receiver_lost_is_sent_again_not_given_up(ar: Harness, tmp_path: Path) -> None:
    wire, parts = _sealed(ar)
    digests = [hashlib.sha256(part).hexdigest() for part in parts[1:]]
    store = _LosesTheFirstPartWhileTheSecondGoes(
        tmp_path / "sender", blob_store(ar.node.settings), lost=digests[0], during=digests[1]
    )
    streamed = []
    for index, (part, digest) in enumerate(zip(parts[1:], digests, strict=True), 1):
        with store.upload(f"out-{os.urandom(8).hex()}-{index}") as upload:
            upload.write(part)
            store.finalise(upload, digest)
        streamed.append(StreamedPart(index, digest, len(part)))
    announced = {**wire, "parts": wire["parts"][:1]}  # the manifest inline, the rest streamed
    with httpx.Client(timeout=30) as http:
        answer = send_streamed(
            http,
            str(ar.http.base_url).rstrip("/"),
            announced,
            streamed,
            store,
            headers={},
            keep_alive=lambda: True,
            signing_key=ar.peer_keys.signing,
        )
    assert store.done  # the receiver did lose the first part mid-transfer
    assert answer.status in (200, 201), (answer.status, answer.body)
    msg_id = json.loads(b64d(wire["header"]))["msg_id"]
    assert blob_store(ar.node.settings).exists(digests[0])
    assert isinstance(answer.body, dict)
    receipt = json.loads(b64d(answer.body["receipt"]))
    assert receipt["msg_id"] == msg_id

"""The delivery worker: claim due outbox rows, post envelopes, verify and keep receipts.

It runs as a thread inside the server by default, or as `entraide worker` processes when an
operator scales out; all coordination goes through the outbox table, none through memory.
Stopping is graceful: the envelope being posted is finished, and rows claimed but not yet
attempted are handed back at once rather than left to their lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
from sqlalchemy import select

from app.audit.checkpoints import maybe_checkpoint
from app.audit.witness import witness_receipt_checkpoint
from app.crypto.encoding import utc_now
from app.crypto.receipts import ReceiptError, decode_receipt
from app.db import unit_of_work
from app.delivery import outbox
from app.delivery.settle import Outcome, settle
from app.errors import PeerError
from app.evidence.node_store import blob_store
from app.evidence.transfer import blob_parts, send_streamed
from app.models import Message, Peer
from app.node import Node
from app.obs.logs import request_context
from app.peers.client import ENVELOPES_PATH, peer_http_client, read_json_bounded
from app.peers.keys import verify_peer_receipt
from app.requests.store import load_envelope

log = logging.getLogger(__name__)

# Refusals a peer may lift without the envelope changing: it may pin us later, recover, or
# shed load. Every other 4xx is a permanent verdict on this envelope (unknown_recipient_key
# too: the envelope is sealed to a key the peer no longer accepts; it must be sent again).
RETRYABLE_CODES = {
    "unknown_sender",
    "unknown_key",
    # A message can overtake the request that opens its conversation (the request's own
    # delivery may be backing off); and a receiver whose clock is behind ours refuses an
    # envelope "from the future" only until its clock catches up.
    "unknown_conversation",
    "not_yet_valid",
    # Streamed parts (app/evidence): another attempt is sending the part, or ours is behind
    # the peer's offset; the next attempt asks the peer where to resume.
    "part_busy",
    "offset_mismatch",
    "part_out_of_order",
    "unknown_transfer",
}
RETRYABLE_STATUS = {408, 425, 429}


def worker_id() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def classify(status: int, body: object) -> Outcome:
    """What a peer's non-receipt answer means for this envelope: try again, or give up."""
    code = body.get("error") if isinstance(body, dict) else None
    code = code if isinstance(code, str) else None
    error = f"HTTP {status} {code or ''}".strip()
    retry = status >= 500 or status in RETRYABLE_STATUS or code in RETRYABLE_CODES
    return Outcome(outbox.RETRY if retry else outbox.FAILED, error, http_status=status)


class Worker:
    def __init__(self, node: Node, *, http: httpx.Client | None = None, batch: int = 16) -> None:
        self.node = node
        self.http = http or peer_http_client(node.settings)
        self.batch = batch
        self.id = worker_id()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=node.settings.worker_concurrency, thread_name_prefix="delivery"
        )
        # Per peer, the last checkpoint note witnessed and stored: the receiver's receipts
        # repeat it until it signs a new one, and a note once witnessed stays witnessed.
        self._witnessed: dict[str, str] = {}

    def run(self) -> None:
        log.info("delivery worker %s started", self.id)
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except Exception as exc:  # a database outage must not kill the worker
                log.error("delivery round failed (%s); retrying", type(exc).__name__)
                handled = 0
                self._stop.wait(min(self.node.settings.worker_poll_seconds * 4, 5.0))
            if handled == 0:
                self.node.outbox_signal.wait(self.node.settings.worker_poll_seconds)
                self.node.outbox_signal.clear()
        self._pool.shutdown(wait=True)
        self.release()
        log.info("delivery worker %s stopped", self.id)

    def stop(self) -> None:
        self._stop.set()
        self.node.outbox_signal.set()

    def release(self) -> None:
        try:
            with unit_of_work(self.node.sessions) as session:
                released = outbox.release_owned(session, owner=self.id, now=utc_now())
        except Exception as exc:  # the lease will expire instead
            log.warning("could not release claimed rows (%s)", type(exc).__name__)
            return
        if released:
            log.info("released %s claimed deliveries for other workers", released)

    def run_once(self) -> int:
        self._checkpoint_if_due()
        lease = timedelta(seconds=self.node.settings.lease_seconds)
        with unit_of_work(self.node.sessions) as session:
            claims = outbox.claim_due(
                session, now=utc_now(), lease=lease, limit=self.batch, owner=self.id
            )
        # Several posts at once, so one slow or stalled peer does not hold up the others.
        list(self._pool.map(self._deliver_one, claims))
        return len(claims)

    def _deliver_one(self, claim: outbox.Claim) -> None:
        if self._stop.is_set():
            return  # release() hands it back
        try:
            with request_context(claim.trace_id):  # log lines carry the request id
                self._deliver(claim)
        except Exception as exc:  # one bad peer answer must not stall the whole batch
            log.error(
                "delivery of outbox row %s failed unexpectedly: %s",
                claim.outbox_id,
                type(exc).__name__,
            )
            self._settle(claim, Outcome(outbox.RETRY, f"internal: {type(exc).__name__}"))

    def _checkpoint_if_due(self) -> None:
        settings = self.node.settings
        with unit_of_work(self.node.sessions) as session:
            maybe_checkpoint(
                session,
                authority_id=self.node.authority_id,
                log_key=self.node.keys.log,
                every=settings.audit_checkpoint_every,
                seconds=settings.audit_checkpoint_seconds,
            )

    def _renew(self, claim: outbox.Claim, lease: timedelta) -> bool:
        with unit_of_work(self.node.sessions) as session:
            return outbox.renew(session, claim, now=utc_now(), lease=lease)

    def _settle(self, claim: outbox.Claim, outcome: Outcome) -> bool:
        with unit_of_work(self.node.sessions) as session:
            return settle(session, claim, outcome, worker=self.id)

    def _deliver(self, claim: outbox.Claim) -> None:
        with unit_of_work(self.node.sessions) as session:
            message = session.get(Message, claim.message_id)
            peer = session.scalar(select(Peer).where(Peer.authority_id == claim.peer_authority))
            if message is None or peer is None:
                self._settle(claim, Outcome(outbox.FAILED, "message or peer no longer exists"))
                return
            wire = load_envelope(session, message).to_wire()
            # Large evidence: parts in the blob store go by the part-transfer protocol.
            streamed = blob_parts(session, message)
            base_url = peer.public_url
            signer = (peer.signing_key, peer.signing_kid)
            expected = (message.msg_id, message.envelope_hash, message.sender_authority)
            recipient = message.recipient_authority
        # An expired envelope is still posted: if the peer already holds it, it answers with
        # the stored receipt; if not, it refuses it as expired, a definite answer.
        lease = timedelta(seconds=self.node.settings.lease_seconds)
        with unit_of_work(self.node.sessions) as session:
            if not outbox.renew(session, claim, now=utc_now(), lease=lease):
                return  # taken over by another worker while this batch was being posted
        try:
            if streamed:
                status, body = send_streamed(
                    self.http,
                    base_url,
                    wire,
                    streamed,
                    blob_store(self.node.settings),
                    headers={"x-request-id": claim.trace_id} if claim.trace_id else {},
                    keep_alive=lambda: self._renew(claim, lease),
                )
            else:
                status, body = self._post(base_url + ENVELOPES_PATH, wire, claim.trace_id)
        except (httpx.HTTPError, PeerError) as exc:
            self._settle(claim, Outcome(outbox.RETRY, f"transport: {type(exc).__name__}"))
            return
        if status not in (200, 201):
            self._settle(claim, classify(status, body))
            return
        try:
            signed = decode_receipt(body)
            # A receipt signed by a new key of the peer: follow its signed key rotation.
            receipt = verify_peer_receipt(
                self.node,
                self.http,
                signed,
                authority=recipient,
                signer_public=signer[0],
                signer_kid=signer[1],
                msg_id=expected[0],
                envelope_hash=expected[1],
                from_authority=expected[2],
            )
        except ReceiptError as exc:
            self._settle(claim, Outcome(outbox.RETRY, f"bad receipt: {exc}", http_status=status))
            return
        outcome = Outcome(outbox.DELIVERED, http_status=status, signed=signed, receipt=receipt)
        note = receipt.checkpoint
        if (
            self._settle(claim, outcome)
            and note is not None
            and self._witnessed.get(claim.peer_authority) != note
            and witness_receipt_checkpoint(
                self.node.sessions,
                self.http,
                authority=claim.peer_authority,
                note=note,
                own_authority=self.node.authority_id,
                log_key=self.node.keys.log,
            )
        ):
            self._witnessed[claim.peer_authority] = note

    def _post(self, url: str, wire: dict[str, object], trace_id: str | None) -> tuple[int, object]:
        content = json.dumps(wire).encode()
        headers = {"content-type": "application/json"}
        if trace_id:
            headers["x-request-id"] = trace_id
        with self.http.stream("POST", url, content=content, headers=headers) as response:
            try:
                body = read_json_bounded(response)
            except PeerError:
                body = None
            return response.status_code, body

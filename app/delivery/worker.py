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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.checkpoints import maybe_checkpoint
from app.audit.witness import witness_receipt_checkpoint
from app.crypto.encoding import utc_now
from app.crypto.receipts import ReceiptError, decode_receipt
from app.db import commit_without_waiting, unit_of_work
from app.delivery import outbox
from app.delivery.settle import Outcome, settle_batch
from app.errors import PeerError
from app.evidence.cleanup import OrphanSweep
from app.evidence.node_store import blob_store
from app.evidence.transfer import StreamedPart, blob_parts, send_streamed
from app.models import BlobPart, Message, Peer
from app.node import Node
from app.obs.logs import request_context
from app.peers.client import ENVELOPES_PATH, peer_http_client, read_json_bounded
from app.peers.keys import verify_peer_receipt
from app.requests.store import load_envelope, load_envelopes

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
# A batch's outcomes are settled together once all are in, or whatever is in after this long.
SETTLE_WAIT_SECONDS = 1.0
# A post starting later than this share of the lease after the claim renews the lease first.
RENEW_AFTER = 0.25
# Envelopes up to this size are read with the claim; larger ones (up to the 32 MiB body limit)
# by the thread that posts them, so a batch never holds more than a few of them in memory.
PRELOAD_BYTES = 256 * 1024


def worker_id() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def classify(status: int, body: object) -> Outcome:
    """What a peer's non-receipt answer means for this envelope: try again, or give up."""
    code = body.get("error") if isinstance(body, dict) else None
    code = code if isinstance(code, str) else None
    error = f"HTTP {status} {code or ''}".strip()
    retry = status >= 500 or status in RETRYABLE_STATUS or code in RETRYABLE_CODES
    return Outcome(outbox.RETRY if retry else outbox.FAILED, error, http_status=status)


@dataclass(frozen=True)
class Job:
    """A claimed row and what posting it needs, read in the claim's transaction."""

    claim: outbox.Claim
    gone: bool  # the message or the peer no longer exists
    wire: dict[str, object] | None = None  # None: too large to preload, read it when posting
    streamed: list[StreamedPart] = field(default_factory=list)
    base_url: str = ""
    signer_public: bytes = b""
    signer_kid: str = ""
    msg_id: str = ""
    envelope_hash: str = ""
    sender: str = ""
    recipient: str = ""


def load_jobs(session: Session, claims: list[outbox.Claim]) -> list[Job]:
    if not claims:
        return []
    messages = {
        message.id: message
        for message in session.scalars(
            select(Message).where(Message.id.in_([claim.message_id for claim in claims]))
        )
    }
    peers = {
        peer.authority_id: peer
        for peer in session.scalars(
            select(Peer).where(Peer.authority_id.in_({claim.peer_authority for claim in claims}))
        )
    }
    small = [message for message in messages.values() if message.size_bytes <= PRELOAD_BYTES]
    envelopes = load_envelopes(session, small)
    # Large evidence: parts in the blob store go by the part-transfer protocol.
    with_blobs = set(
        session.scalars(
            select(BlobPart.message_id).where(BlobPart.message_id.in_(list(messages))).distinct()
        )
    )
    jobs = []
    for claim in claims:
        message = messages.get(claim.message_id)
        peer = peers.get(claim.peer_authority)
        if message is None or peer is None:
            jobs.append(Job(claim, gone=True))
            continue
        envelope = envelopes.get(message.id)
        jobs.append(
            Job(
                claim,
                gone=False,
                wire=envelope.to_wire() if envelope is not None else None,
                streamed=blob_parts(session, message) if message.id in with_blobs else [],
                base_url=peer.public_url,
                signer_public=peer.signing_key,
                signer_kid=peer.signing_kid,
                msg_id=message.msg_id,
                envelope_hash=message.envelope_hash,
                sender=message.sender_authority,
                recipient=message.recipient_authority,
            )
        )
    return jobs


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
        # Abandoned evidence uploads and unreferenced blobs, swept from this loop (hourly).
        self._sweep = OrphanSweep(node)

    def run(self) -> None:
        log.info("delivery worker %s started", self.id)
        while not self._stop.is_set():
            try:
                handled = self.run_once()
                self._sweep.run_due()
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
        lease = timedelta(seconds=self.node.settings.lease_seconds)
        # One transaction for the round's bookkeeping: the checkpoint check, the claim and the
        # claimed envelopes, read with one query per table.
        with unit_of_work(self.node.sessions) as session:
            signed = self._checkpoint_if_due(session)
            claims = outbox.claim_due(
                session, now=utc_now(), lease=lease, limit=self.batch, owner=self.id
            )
            jobs = load_jobs(session, claims)
            if claims and not signed:
                # A claim lost in a power cut only means the rows are claimed and posted
                # again; no need to wait for the disk before posting. A new checkpoint must
                # wait: peers may fetch it as soon as it is committed.
                commit_without_waiting(session)
        # Several posts at once, so one slow or stalled peer does not hold up the others.
        futures = {self._pool.submit(self._deliver_one, job): job.claim for job in jobs}
        # Outcomes are settled together, one transaction (and one commit) for the lot; a
        # slow peer's outcome does not keep the others' waiting past a second.
        done, pending = wait(futures, timeout=SETTLE_WAIT_SECONDS)
        self._settle_done(done, futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            self._settle_done(done, futures)
        return len(claims)

    def _deliver_one(self, job: Job) -> Outcome | None:
        if self._stop.is_set():
            return None  # release() hands it back
        try:
            with request_context(job.claim.trace_id):  # log lines carry the request id
                return self._deliver(job)
        except Exception as exc:  # one bad peer answer must not stall the whole batch
            log.error(
                "delivery of outbox row %s failed unexpectedly: %s",
                job.claim.outbox_id,
                type(exc).__name__,
            )
            return Outcome(outbox.RETRY, f"internal: {type(exc).__name__}")

    def _checkpoint_if_due(self, session: Session) -> bool:
        """True if a new checkpoint was signed."""
        settings = self.node.settings
        checkpoint = maybe_checkpoint(
            session,
            authority_id=self.node.authority_id,
            log_key=self.node.keys.log,
            every=settings.audit_checkpoint_every,
            seconds=settings.audit_checkpoint_seconds,
        )
        return checkpoint is not None

    def _renew(self, claim: outbox.Claim, lease: timedelta) -> bool:
        with unit_of_work(self.node.sessions) as session:
            return outbox.renew(session, claim, now=utc_now(), lease=lease)

    def _settle_done(
        self, done: set[Future[Outcome | None]], futures: dict[Future[Outcome | None], outbox.Claim]
    ) -> None:
        results = [
            (futures[future], outcome)
            for future in sorted(done, key=lambda f: futures[f].outbox_id)
            if (outcome := future.result()) is not None
        ]
        settled = self._settle(results)
        # Witness each new checkpoint note the receipts carried (a repeated note is skipped).
        for (claim, outcome), ok in zip(results, settled, strict=True):
            note = outcome.receipt.checkpoint if outcome.receipt is not None else None
            if (
                ok
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

    def _settle(self, results: list[tuple[outbox.Claim, Outcome]]) -> list[bool]:
        if not results:
            return []
        try:
            with unit_of_work(self.node.sessions) as session:
                return settle_batch(session, results, worker=self.id)
        except Exception as exc:
            if len(results) == 1:
                raise
            log.warning("settling a batch failed (%s); one by one", type(exc).__name__)
        # One row's trouble must not leave the others unsettled (their leases would run out
        # and they would be posted again): each on its own, the first error raised at the end.
        settled, first_error = [], None
        for result in results:
            try:
                settled.extend(self._settle([result]))
            except Exception as exc:
                settled.append(False)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return settled

    def _deliver(self, job: Job) -> Outcome | None:
        claim = job.claim
        if job.gone:
            return Outcome(outbox.FAILED, "message or peer no longer exists")
        wire = job.wire if job.wire is not None else self._load_wire(claim)
        # The claim set the lease; renew it (a write, doubling as the fencing check) only when
        # this post starts late in it, behind slow posts of the same batch. A lease not yet
        # run out is ours alone: only an expired lease is reclaimed.
        lease = timedelta(seconds=self.node.settings.lease_seconds)
        if utc_now() - claim.claimed_at > lease * RENEW_AFTER and not self._renew(claim, lease):
            return None  # taken over by another worker while this batch was being posted
        # An expired envelope is still posted: if the peer already holds it, it answers with
        # the stored receipt; if not, it refuses it as expired, a definite answer.
        try:
            if job.streamed:
                status, body = send_streamed(
                    self.http,
                    job.base_url,
                    wire,
                    job.streamed,
                    blob_store(self.node.settings),
                    headers={"x-request-id": claim.trace_id} if claim.trace_id else {},
                    keep_alive=lambda: self._renew(claim, lease),
                )
            else:
                status, body = self._post(job.base_url + ENVELOPES_PATH, wire, claim.trace_id)
        except (httpx.HTTPError, PeerError) as exc:
            return Outcome(outbox.RETRY, f"transport: {type(exc).__name__}")
        if status not in (200, 201):
            return classify(status, body)
        try:
            signed = decode_receipt(body)
            # A receipt signed by a new key of the peer: follow its signed key rotation.
            receipt = verify_peer_receipt(
                self.node,
                self.http,
                signed,
                authority=job.recipient,
                signer_public=job.signer_public,
                signer_kid=job.signer_kid,
                msg_id=job.msg_id,
                envelope_hash=job.envelope_hash,
                from_authority=job.sender,
            )
        except ReceiptError as exc:
            return Outcome(outbox.RETRY, f"bad receipt: {exc}", http_status=status)
        return Outcome(outbox.DELIVERED, http_status=status, signed=signed, receipt=receipt)

    def _load_wire(self, claim: outbox.Claim) -> dict[str, object]:
        with unit_of_work(self.node.sessions) as session:
            message = session.get(Message, claim.message_id)
            if message is None:  # rows are never deleted; load_jobs found it moments ago
                raise RuntimeError(f"outbox row {claim.outbox_id} lost its message")
            return load_envelope(session, message).to_wire()

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

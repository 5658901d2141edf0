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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.checkpoints import CheckpointClock, maybe_checkpoint
from app.audit.witness import witness_receipt_checkpoint
from app.auth.throttle import ThrottlePrune
from app.config import LEASE_MARGIN_SECONDS, Settings, longest_exchange_seconds
from app.crypto.encoding import is_int, utc_now
from app.crypto.receipts import ReceiptError, decode_receipt
from app.db import (
    PeriodicJob,
    Unreadable,
    commit_without_waiting,
    database_full,
    database_unwritable,
    driver_error_name,
    read_snapshot,
    unit_of_work,
    unreadable,
)
from app.delivery import damage, heartbeat, outbox, upkeep
from app.delivery.clocksteps import ClockWatch, boot_clock
from app.delivery.failing_peers import FailingPeers
from app.delivery.held_peers import HeldPeers
from app.delivery.settle import Outcome, settle_batch
from app.delivery.witnessing import Witnessing
from app.errors import PeerError, StoredEnvelopeCorrupt
from app.evidence.cleanup import OrphanSweep
from app.evidence.node_store import blob_store
from app.evidence.transfer import StoredPartCorrupt, StreamedPart, blob_parts
from app.evidence.whole import TooLargeForOnePost, send_evidence
from app.models import BlobPart, Message, Peer
from app.node import Node
from app.obs.logs import request_context
from app.obs.storage import DATABASE
from app.peers.client import (
    BATCH_PATH,
    ENVELOPES_PATH,
    MAX_BATCH_ENVELOPES,
    MAX_RESPONSE_BYTES,
    PeerAnswer,
    peer_http_client,
    read_json_bounded,
    retry_after_of,
)
from app.peers.damage import PEERS
from app.peers.keys import verify_peer_receipt
from app.requests import idempotency
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
    # Our part's signature, by our current signing key: the peer may not have followed our
    # rotation yet (it fetches our identity document on such a signature, at most once per
    # its refresh interval).
    "bad_part_signature",
    # The peer's operator suspended exchanges with us, perhaps for a while (docs/operations.md).
    "peer_suspended",
}
RETRYABLE_STATUS = {408, 425, 429}
# A batch's outcomes are settled together once all are in, or whatever is in after this long.
SETTLE_WAIT_SECONDS = 1.0
# At a stop, how long a checkpoint check under way may take to end (it may wait on a peer).
WITNESS_STOP_SECONDS = 2.0
# Envelopes up to this size are read with the claim, while a round's preloaded envelopes total
# at most ROUND_PRELOAD_BYTES; others (up to the 32 MiB body limit) are read by the thread that
# posts them, so a round never holds more than a few of them in memory.
PRELOAD_BYTES = 256 * 1024
ROUND_PRELOAD_BYTES = 4 * 1024 * 1024
# Large envelopes a round may claim (each posted alone): as many as a whole round held before
# rounds grew to a batch's size.
ROUND_LARGE = 16
# Rows claimed a round: as many as one batch post carries. A round's claim, post and settlement
# each cost about the same whatever their size, so under a backlog a round of 16 capped a node
# at 16 per round trip (about 80 requests/s here, docs/benchmarks.md); an idle node's rounds
# carry what is due, one or two, so this costs no latency.
ROUND_CLAIMS = MAX_BATCH_ENVELOPES
# Answers to a batch that mean "this peer takes no batches": post its envelopes one by one.
NO_BATCH_STATUS = {404, 405}


def worker_id() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def classify(status: int, body: object, retry_after: float | None = None) -> Outcome:
    """What a peer's non-receipt answer means for this envelope: try again (not before the
    peer's Retry-After, if it gave one), or give up."""
    code = body.get("error") if isinstance(body, dict) else None
    code = code if isinstance(code, str) else None
    error = f"HTTP {status} {code or ''}".strip()
    retry = status >= 500 or status in RETRYABLE_STATUS or code in RETRYABLE_CODES
    if not retry:
        return Outcome(outbox.FAILED, error, http_status=status)
    return Outcome(outbox.RETRY, error, http_status=status, retry_after=retry_after)


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
    sealed_at: datetime | None = None  # when the envelope was sealed (its created_at)


def group_jobs(jobs: list[Job]) -> list[list[Job]]:
    """The posts of a round, the most pressing first: `jobs` come in the claim's order
    (emergencies first), and a post goes as early as its most pressing envelope. Preloaded
    envelopes for one peer go together (docs/protocol.md section 8.6), in the order they were
    queued (a conversation's request before its replies); streamed or large ones alone."""
    rank = {job.claim.outbox_id: position for position, job in enumerate(jobs)}
    groups: list[list[Job]] = []
    by_peer: dict[str, list[Job]] = {}
    for job in jobs:
        if job.gone or job.streamed or job.wire is None:
            groups.append([job])
        else:
            by_peer.setdefault(job.base_url, []).append(job)
    for batch in by_peer.values():
        batch.sort(key=lambda job: job.claim.outbox_id)
        for start in range(0, len(batch), MAX_BATCH_ENVELOPES):
            groups.append(batch[start : start + MAX_BATCH_ENVELOPES])
    return sorted(groups, key=lambda group: min(rank[job.claim.outbox_id] for job in group))


class RoundBudget:
    """What one round may claim: `ROUND_PRELOAD_BYTES` of small envelopes (read with the
    claim and batched) and `large` large ones (each read and posted alone by a posting
    thread, as many at a time as `worker_concurrency`). A row past either stays queued for the
    next round rather than be posted alone or keep the round's end, and the next claim, late."""

    def __init__(self, large: int = ROUND_LARGE) -> None:
        self.small_bytes = 0
        self.large = 0
        self.large_limit = large

    def admit(self, size: int) -> bool:
        if size > PRELOAD_BYTES:
            if self.large >= self.large_limit:
                return False
            self.large += 1
            return True
        if self.small_bytes + size > ROUND_PRELOAD_BYTES:
            return False
        self.small_bytes += size
        return True


def _is_large(jobs: list[Job]) -> bool:
    """A post of one envelope read when it is posted, or streamed: it may take long."""
    return len(jobs) == 1 and (bool(jobs[0].streamed) or jobs[0].wire is None)


def round_preload(claims: list[outbox.Claim], messages: dict[int, Message]) -> list[Message]:
    """The claimed messages read with the claim: small ones, most pressing first, within the
    round's budget (`RoundBudget` already keeps a round's claims within it)."""
    chosen, total = [], 0
    for claim in claims:
        message = messages.get(claim.message_id)
        if message is None or message.size_bytes > PRELOAD_BYTES:
            continue
        if total + message.size_bytes > ROUND_PRELOAD_BYTES:
            break
        chosen.append(message)
        total += message.size_bytes
    return chosen


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
    envelopes = load_envelopes(session, round_preload(claims, messages))
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
                sealed_at=message.created_at,
            )
        )
    return jobs


def renew_before_post(elapsed: timedelta, settings: Settings) -> bool:
    """Whether a post starting `elapsed` after its claim could outlive the claim's lease."""
    left = settings.lease_seconds - elapsed.total_seconds()
    return left < longest_exchange_seconds(settings) + LEASE_MARGIN_SECONDS


class Worker:
    def __init__(
        self, node: Node, *, http: httpx.Client | None = None, batch: int = ROUND_CLAIMS
    ) -> None:
        self.node = node
        self.http = http or peer_http_client(node.settings)
        self.batch = batch
        self.id = worker_id()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=node.settings.worker_concurrency, thread_name_prefix="delivery"
        )
        # The checkpoint notes receipts carry, checked in a thread of their own: a check may
        # wait on the peer for a proof, and no round waits for it (app/delivery/witnessing.py).
        self.witnessing = Witnessing(self._witness)
        self._checkpoint_clock = CheckpointClock()
        # The audit upkeep's last failure, logged once (app/audit/checkpoints.py).
        self._upkeep_failure: str | None = None
        # Abandoned evidence uploads and unreferenced blobs, swept from this loop (hourly).
        self._sweep = OrphanSweep(node)
        # Refusal counters of addresses that stopped sending, and idempotency keys past their
        # days (hourly too).
        self._prune = ThrottlePrune(node.settings, node.sessions)
        self._forget_keys = PeriodicJob(node.sessions, idempotency.prune, every_seconds=3600.0)
        # Leases of dead workers cut short, rows planned by a clock that was ahead made due
        # (app/delivery/upkeep.py): every heartbeat period, from the rounds, the first at once.
        self._upkeep = PeriodicJob(
            node.sessions, self.outbox_upkeep, every_seconds=node.settings.worker_heartbeat_seconds
        )
        self._heartbeats = upkeep.HeartbeatWatch(node.settings.worker_heartbeat_seconds)
        self._failing_peers = FailingPeers()
        # The heartbeat goes on until the posts under way have ended, a stop included: a
        # worker that stopped beating at once was taken for dead while it still posted, and
        # its post was sent again by another (from review).
        self._beat_stop = threading.Event()
        # Boot-clock times since when this worker's beats came without a gap another worker
        # could take for its death, and of the last one: None until the first beat.
        self._beats: tuple[float, float] | None = None
        # The wall clock against the boot clock: no deadline fails a delivery just after a
        # step (app/delivery/clocksteps.py).
        self._clock = ClockWatch()
        self._clock.observe(utc_now(), boot_clock())
        # Peers that answered a batch as an older node would: posted one by one from then on.
        self._no_batch: set[str] = set()
        # Peers that answered an announcement of streamed parts as an older node would: sent
        # whole what fits from then on (app/evidence/whole.py).
        self._no_streaming: set[str] = set()
        # Posts under way, across rounds: a slow one (a long evidence transfer, a peer that
        # answers slowly) is settled by the round in which it ends, and the rounds between
        # go on claiming and posting everything else.
        self._in_flight: dict[Future[list[Outcome | None]], list[Job]] = {}
        # Rows posted whose settlement failed: still ours until their lease runs out, and the
        # peer may hold them (a stop records that, see release).
        self._unsettled: set[int] = set()
        # Peers whose row cannot be read: their deliveries are not claimed until it reads
        # again (a round reading such a row failed, and every delivery with it).
        self._held = HeldPeers(node.sessions, every_seconds=node.settings.worker_heartbeat_seconds)

    def run(self) -> None:
        log.info("delivery worker %s started", self.id)
        # Its own thread: a round may wait on a slow peer without the worker looking dead,
        # and a failed beat costs no round (from review).
        beating = threading.Thread(target=self._beat, name="delivery-heartbeat", daemon=True)
        beating.start()
        while not self._stop.is_set():
            try:
                handled = self.run_once()
                self._sweep.run_due()
                self._prune.run_due()
                self._forget_keys.run_due()
            except Exception as exc:  # a database outage must not kill the worker
                handled = self._round_failed(exc)
                if handled == 0:
                    self._stop.wait(min(self.node.settings.worker_poll_seconds * 4, 5.0))
            if handled == 0:
                self.node.outbox_signal.wait(self.node.settings.worker_poll_seconds)
                self.node.outbox_signal.clear()
        try:
            self._finish_in_flight()
            self._pool.shutdown(wait=True)
            self.witnessing.stop(WITNESS_STOP_SECONDS)
        finally:
            self._beat_stop.set()
            beating.join()
        self.release()  # removes the heartbeat row too
        log.info("delivery worker %s stopped", self.id)

    def _round_failed(self, exc: Exception) -> int:
        """Say what failed a round, by the driver's code (never its message: it may quote a
        value), and deal with what the worker can: a full database is noted for /readyz,
        outbox rows whose stored values cannot be read are set aside, and the deliveries of a
        peer whose row cannot be read held back. Returns the rows set aside or the peers
        held (the next round need not wait then)."""
        found = unreadable(exc)
        if found is not None and not (found.column or "").startswith(f"{PEERS.name}."):
            set_aside = self._set_aside_damaged(found)
            if set_aside:
                return set_aside
        if found is not None:
            held = self._held.hold_damaged()
            if held:
                return held
            log.error(
                "delivery round failed: a value stored in column '%s' cannot be read (%s), and "
                "no delivery or peer was found holding it; run `entraide doctor`; retrying",
                found.column or "unknown",
                found.why,
            )
            return 0
        if database_full(exc):
            self.node.storage_full.note(DATABASE)
            log.error(
                "delivery round failed: database full (%s); nothing can be recorded until "
                "room is made; retrying",
                driver_error_name(exc),
            )
            return 0
        unwritable = database_unwritable(exc)
        if unwritable is not None:
            self.node.storage_full.note(DATABASE, unwritable)
            log.error("delivery round failed: the database %s; retrying", unwritable)
            return 0
        log.error("delivery round failed (%s); retrying", driver_error_name(exc))
        return 0

    def _set_aside_damaged(self, found: Unreadable) -> int:
        """One row whose stored value cannot be read must not stop every delivery (from
        review): such rows are marked failed, named in the log (never their values)."""
        try:
            with unit_of_work(self.node.sessions) as session:
                damaged = damage.set_aside_damaged(session, now=utc_now())
        except Exception as exc:
            log.error(
                "delivery round failed: a value stored in column '%s' cannot be read, and the "
                "rows holding it could not be set aside (%s); retrying",
                found.column or "unknown",
                driver_error_name(exc),
            )
            return 0
        for row in damaged:
            log.error(
                "delivery of outbox row %s set aside as failed: a value stored in column '%s' "
                "cannot be read (stored value damaged); repair it, then retry or cancel the "
                "delivery (docs/operations.md)",
                row.outbox_id,
                row.column,
            )
        return len(damaged)

    def _finish_in_flight(self) -> None:
        """At a stop: the posts under way finish (none starts), and what they got is kept."""
        if self._in_flight:
            wait(self._in_flight)
            try:
                self._settle_done(set(self._in_flight))
            except Exception as exc:  # their leases run out; the peer keeps their receipts
                log.warning("could not settle the last deliveries (%s)", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        self.node.outbox_signal.set()

    def _beat(self) -> None:
        """This worker's row, for whoever watches the node (heartbeat.py), until its last
        post has ended."""
        every = self.node.settings.worker_heartbeat_seconds
        failing = False
        while True:
            try:
                with unit_of_work(self.node.sessions) as session:
                    heartbeat.beat(session, self.id, every_seconds=every)
                self._beats = self._after_beat(self._beats, boot_clock(), every)
                failing = False
            except Exception as exc:  # the database is down: the rounds say so too
                if not failing:
                    log.warning("delivery worker heartbeat failed (%s)", type(exc).__name__)
                failing = True
            if self._beat_stop.wait(every):
                return

    @staticmethod
    def _after_beat(
        beats: tuple[float, float] | None, boot: float, every: float
    ) -> tuple[float, float]:
        """A gap of more than `MISSED_BEATS - 1` periods (one of margin) may have let
        another worker take this one for dead (upkeep.HeartbeatWatch): a new run begins."""
        if beats is None or boot - beats[1] > every * (heartbeat.MISSED_BEATS - 1):
            return (boot, boot)
        return (beats[0], boot)

    def release(self) -> None:
        try:
            with unit_of_work(self.node.sessions) as session:
                released = outbox.release_owned(
                    session, owner=self.id, now=utc_now(), unsettled=self._unsettled
                )
                heartbeat.stopped(session, self.id)
        except Exception as exc:  # the lease will expire instead
            log.warning("could not release claimed rows (%s)", type(exc).__name__)
            return
        if released:
            log.info("released %s claimed deliveries for other workers", released)

    def run_once(self) -> int:
        """One round: claim what is due while a posting thread is free, post it, and settle
        every post that has ended by the time this round's posts have (or after
        SETTLE_WAIT_SECONDS). A post still under way then is settled by a later round: it
        never holds up the claims and posts of everything else. Returns the rows claimed and
        settled (0: nothing to do)."""
        concurrency = self.node.settings.worker_concurrency
        self._clock_steady()
        self._upkeep.run_due()
        self._held.release_repaired()
        if len(self._in_flight) < concurrency:
            posting = self._claim_and_post(concurrency)
        else:  # every posting thread busy: claim nothing yet, but keep signing checkpoints
            posting = []
            with unit_of_work(self.node.sessions) as session:
                self._checkpoint_if_due(session)
        # Outcomes are settled together, one transaction (and one commit) for the lot; a
        # slow post does not keep the others waiting past SETTLE_WAIT_SECONDS.
        if posting:
            wait(posting, timeout=SETTLE_WAIT_SECONDS)
        done = {future for future in self._in_flight if future.done()}
        if done:
            self._settle_done(done)
        # 0 with slow posts under way: the loop waits on the signal, which new work, a stop
        # and the end of any post set.
        return len(posting) + len(done)

    def outbox_upkeep(self, session: Session) -> int:
        """Leases of workers gone cut short and rows planned by a clock that was ahead made
        due, for this round's claim (app/delivery/upkeep.py). Returns the rows changed."""
        now = utc_now()
        every = self.node.settings.worker_heartbeat_seconds
        reclaimed = 0
        # Just after a step of this host's clock, the times of the rows in flight are not
        # judged: their leases run out instead, if their owners are gone.
        if self._clock_steady():
            reclaimed = upkeep.reclaim_orphaned(
                session,
                owner=self.id,
                now=now,
                grace=timedelta(seconds=every * heartbeat.MISSED_BEATS),
                watch=self._heartbeats,
                boot=boot_clock(),
            )
        if reclaimed:
            log.warning("%s deliveries of workers gone (no heartbeat) taken over", reclaimed)
        planned_ahead = upkeep.due_after_clock_step(session, now=now)
        if planned_ahead:
            log.warning(
                "%s deliveries planned by a clock that was ahead made due now", planned_ahead
            )
        return reclaimed + planned_ahead

    def _clock_steady(self) -> bool:
        boot = boot_clock()
        self._clock.observe(utc_now(), boot)
        return self._clock.steady(boot)

    def _claim_and_post(self, concurrency: int) -> list[Future[list[Outcome | None]]]:
        lease = timedelta(seconds=self.node.settings.lease_seconds)
        # Large envelopes and evidence transfers may take every posting thread but one, so
        # that a long transfer never keeps a small envelope (an emergency) waiting for it.
        large_in_flight = sum(1 for jobs in self._in_flight.values() if _is_large(jobs))
        large = max(0, min(ROUND_LARGE, max(1, concurrency - 1) - large_in_flight))
        posting_now = [job.claim.outbox_id for jobs in self._in_flight.values() for job in jobs]
        # One transaction for the round's bookkeeping: the checkpoint check, the claim and the
        # claimed envelopes, read with one query per table.
        with unit_of_work(self.node.sessions) as session:
            signed = self._checkpoint_if_due(session)
            steady = self._clock_steady()
            boot = boot_clock()
            claims = outbox.claim_due(
                session,
                now=utc_now(),
                lease=lease,
                limit=self.batch,
                owner=self.id,
                admit=RoundBudget(large).admit,
                # No large one this round: they must not fill its claims either.
                max_size=PRELOAD_BYTES if large == 0 else None,
                skip=posting_now,
                skip_peers=self._held.authorities(),
                # As for the upkeep's takeovers: no lease judged by a clock that just stepped,
                # and none of a worker whose heartbeat beats (operations.md §4), as far as a
                # recent look at the heartbeats tells.
                take_over=steady and self._heartbeats.current(boot),
                alive=self._heartbeats.beating(boot) - {self.id},
            )
            jobs = load_jobs(session, claims)
            if claims and not signed and not session.info.get(outbox.AUDITED):
                # A claim lost in a power cut only means the rows are claimed and posted
                # again; no need to wait for the disk before posting. A new checkpoint must
                # wait: peers may fetch it as soon as it is committed; so must audit
                # entries (a lease taken over).
                commit_without_waiting(session)
        # Claimed again: a post of ours it had, unsettled, is on record as of unknown outcome
        # since (claim_due records a lease taken over, ours included).
        self._unsettled.difference_update(claim.outbox_id for claim in claims)
        # Several posts at once, so one slow or stalled peer does not hold up the others; the
        # small envelopes for one peer go in one post.
        posting = []
        for group in group_jobs(jobs):
            future = self._pool.submit(self._deliver_group, group)
            self._in_flight[future] = group
            # A post that ends after its round wakes the loop, which settles it.
            future.add_done_callback(lambda _future: self.node.outbox_signal.set())
            posting.append(future)
        return posting

    def _deliver_group(self, group: list[Job]) -> list[Outcome | None]:
        if self._suspended_since_claim(group[0].claim.peer_authority):
            # `peers suspend` stops every exchange at once: what was claimed just before it
            # is not posted either (from review). Handed back as if never claimed, waiting
            # for a resumption like the rest: no attempt is recorded, for none was made (an
            # attempt without an answer would count as one the peer may hold).
            self._hand_back_unposted([job.claim for job in group])
            return [None for _ in group]
        if len(group) == 1 or group[0].base_url in self._no_batch:
            return [self._deliver_one(job) for job in group]
        try:
            return self._deliver_batch(group)
        except Exception as exc:  # as for one post: the batch is tried again, not lost
            log.error("delivery of a batch failed unexpectedly: %s", type(exc).__name__)
            return [Outcome(outbox.RETRY, f"internal: {type(exc).__name__}") for _ in group]

    def _suspended_since_claim(self, authority: str) -> bool:
        """One indexed read per group of posts to a peer (not per envelope): the claim
        skipped suspended peers, but a suspension may have come since, while this round's
        earlier posts ran. A snapshot read: it waits for no writer (SQLite)."""
        try:
            with read_snapshot(self.node.sessions) as session:
                suspended = session.scalar(
                    select(Peer.suspended_at).where(Peer.authority_id == authority)
                )
        except Exception as exc:  # the post's own outcome will say what the database does
            log.warning("could not read a peer's suspension (%s)", type(exc).__name__)
            return False
        return suspended is not None

    def _hand_back_unposted(self, claims: list[outbox.Claim]) -> None:
        try:
            with unit_of_work(self.node.sessions) as session:
                outbox.hand_back_unposted(session, claims, owner=self.id, now=utc_now())
        except Exception as exc:  # their leases run out; a later claim records them
            log.warning("could not hand back unposted deliveries (%s)", type(exc).__name__)

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
        """True if a new checkpoint was signed.

        In a savepoint, and nothing it raises ends the round: the log's upkeep runs in the
        round's transaction, before the claim, and one failure of it (a MAC rewritten as
        text raised TypeError) failed every round, so nothing was delivered while /readyz
        said ready (from review). A failed upkeep signs nothing, says so, and leaves the
        transaction as it found it for the claim."""
        settings = self.node.settings
        try:
            with session.begin_nested():
                checkpoint = maybe_checkpoint(
                    session,
                    authority_id=self.node.authority_id,
                    log_key=self.node.keys.log,
                    every=settings.audit_checkpoint_every,
                    seconds=settings.audit_checkpoint_seconds,
                    anchor=self.node.log_anchor,
                    clock=self._checkpoint_clock,
                )
        except Exception as exc:  # deliveries go on; no checkpoint until it is resolved
            failure = f"{type(exc).__name__}: {exc}"
            if failure != self._upkeep_failure:  # once per problem, not at every round
                self._upkeep_failure = failure
                log.error(
                    "the audit log's upkeep failed (%s): no checkpoint is signed until it is "
                    "resolved; deliveries go on; run `entraide audit verify --db` "
                    "(docs/operations.md §8)",
                    type(exc).__name__,
                    exc_info=True,
                )
            return False
        self._upkeep_failure = None
        return checkpoint is not None

    def _renew(self, claim: outbox.Claim, lease: timedelta) -> bool:
        with unit_of_work(self.node.sessions) as session:
            return outbox.renew(session, claim, now=utc_now(), lease=lease)

    def _settle_done(self, done: set[Future[list[Outcome | None]]]) -> None:
        finished = {future: self._in_flight.pop(future) for future in done}
        results = sorted(
            (
                (job.claim, outcome)
                for future, jobs in finished.items()
                for job, outcome in zip(jobs, future.result(), strict=True)
                if outcome is not None
            ),
            key=lambda result: result[0].outbox_id,
        )
        settled = self._settle(results)
        self._failing_peers.observe(
            (claim.peer_authority, outcome)
            for (claim, outcome), ok in zip(results, settled, strict=True)
            if ok
        )
        # Each new checkpoint note the receipts carried is witnessed beside the rounds.
        for (claim, outcome), ok in zip(results, settled, strict=True):
            note = outcome.receipt.checkpoint if outcome.receipt is not None else None
            if ok and note is not None:
                self.witnessing.submit(claim.peer_authority, note)

    def _witness(self, peer: str, note: str) -> bool:
        return witness_receipt_checkpoint(
            self.node.sessions,
            self.http,
            authority=peer,
            note=note,
            own_authority=self.node.authority_id,
            log_key=self.node.keys.log,
        )

    def _settle(self, results: list[tuple[outbox.Claim, Outcome]]) -> list[bool]:
        if not results:
            return []
        try:
            with unit_of_work(self.node.sessions) as session:
                return settle_batch(
                    session, results, worker=self.id, clock_steady=self._clock_steady()
                )
        except Exception as exc:
            if len(results) == 1:
                self._unsettled.add(results[0][0].outbox_id)
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
        if self._started_late(claim):
            return None  # taken over by another worker while this batch was being posted
        lease = timedelta(seconds=self.node.settings.lease_seconds)
        # An expired envelope is still posted: if the peer already holds it, it answers with
        # the stored receipt; if not, it refuses it as expired, a definite answer.
        try:
            if job.streamed:
                answer = send_evidence(
                    self.http,
                    job.base_url,
                    wire,
                    job.streamed,
                    blob_store(self.node.settings),
                    max_body_bytes=self.node.settings.max_body_bytes,
                    without_parts=self._no_streaming,
                    headers={"x-request-id": claim.trace_id} if claim.trace_id else {},
                    keep_alive=lambda: self._renew(claim, lease),
                    signing_key=self.node.keys.signing,
                )
            else:
                answer = self._post(job.base_url + ENVELOPES_PATH, wire, claim.trace_id)
        except StoredPartCorrupt as exc:
            # Our own blob, not the peer: failed (loudly, in the audit trail and the log) for
            # an operator to put the blob back from a backup and retry the delivery.
            log.error(
                "delivery of message %s: its stored evidence is damaged (%s)", job.msg_id, exc
            )
            return Outcome(outbox.FAILED, f"{StoredEnvelopeCorrupt.code}: {exc}")
        except TooLargeForOnePost as exc:
            # A peer without streamed parts (docs/protocol.md section 8.5): final, as its 404
            # was, with the reason an operator needs (retried by hand once the peer has it).
            return Outcome(outbox.FAILED, str(exc), http_status=exc.status)
        except (httpx.HTTPError, PeerError) as exc:
            return Outcome(outbox.RETRY, f"transport: {type(exc).__name__}")
        return self._outcome(job, *answer)

    def _started_late(self, claim: outbox.Claim) -> bool:
        """True if the lease had to be renewed and was lost: another worker has the row.

        The claim set the lease; it is renewed (a write, doubling as the fencing check) when
        the longest post could outlive what is left of it (a post starting late, behind slow
        posts of the same round, or a lease set shorter than a post may last), and when this
        worker's heartbeat has not run without a gap since the claim: a lease is cut short
        (upkeep.py) only once its owner's heartbeat stood still for three periods, so a
        lease not run out, of a worker beating all along, is ours alone, and no other worker
        posts the same envelope while ours is still being posted.
        """
        settings = self.node.settings
        boot = boot_clock()
        elapsed = utc_now() - claim.claimed_at
        if self._beating_since_claim(boot, elapsed) and not renew_before_post(elapsed, settings):
            return False
        return not self._renew(claim, timedelta(seconds=settings.lease_seconds))

    def _beating_since_claim(self, boot: float, elapsed: timedelta) -> bool:
        """Whether this worker's beats ran without a gap from a claim `elapsed` ago (by the
        wall clock, believed only if it did not step lately) to now."""
        beats = self._beats
        if beats is None or elapsed < timedelta(0) or not self._clock.steady(boot):
            return False
        since, last = beats
        every = self.node.settings.worker_heartbeat_seconds
        gap_now = boot - last > every * (heartbeat.MISSED_BEATS - 1)
        return not gap_now and since <= boot - elapsed.total_seconds()

    def _deliver_batch(self, group: list[Job]) -> list[Outcome | None]:
        """One post for several envelopes to one peer; each gets the outcome its own post
        would have had. A peer that takes no batches gets them one by one."""
        if self._stop.is_set():
            return [None for _ in group]
        outcomes: dict[int, Outcome | None] = {}
        live = []
        for job in group:
            if self._started_late(job.claim):
                outcomes[job.claim.outbox_id] = None
            else:
                live.append(job)
        if live:
            for job, outcome in zip(live, self._post_live(live), strict=True):
                outcomes[job.claim.outbox_id] = outcome
        return [outcomes[job.claim.outbox_id] for job in group]

    def _post_live(self, jobs: list[Job]) -> list[Outcome | None]:
        base_url = jobs[0].base_url
        try:
            batch: dict[str, object] = {"v": 1, "envelopes": [job.wire for job in jobs]}
            if any(job.claim.trace_id for job in jobs):
                # Each request's id travels with its envelope, as X-Request-Id does alone.
                batch["request_ids"] = [job.claim.trace_id for job in jobs]
            status, body, retry_after = self._post(
                base_url + BATCH_PATH, batch, None, max_bytes=MAX_RESPONSE_BYTES * len(jobs)
            )
        except (httpx.HTTPError, PeerError) as exc:
            return [Outcome(outbox.RETRY, f"transport: {type(exc).__name__}") for _ in jobs]
        if status in NO_BATCH_STATUS:
            log.info("peer at %s takes no batches; posting one by one", base_url)
            self._no_batch.add(base_url)
            return [self._deliver_one(job) for job in jobs]
        if 400 <= status < 500 and status not in RETRYABLE_STATUS:
            # Refused as a whole (too large for the peer or for a proxy in between, or not
            # understood): each envelope may still go on its own, which settles it for good.
            return [self._deliver_one(job) for job in jobs]
        if not outbox.is_success(status):
            return [classify(status, body, retry_after) for _ in jobs]
        # Any success with one answer per envelope is read as the protocol's 200 (a 201 or
        # 207 failed every envelope for good, their receipts unread: from review).
        answers = body.get("results") if isinstance(body, dict) else None
        if not isinstance(answers, list) or len(answers) != len(jobs):
            log.warning("peer at %s answered a batch with no answer per envelope", base_url)
            return [self._deliver_one(job) for job in jobs]
        return [
            self._item_outcome(job, answer, status)
            for job, answer in zip(jobs, answers, strict=True)
        ]

    def _item_outcome(self, job: Job, answer: object, batch_status: int) -> Outcome:
        """One envelope's answer within a batch. What breaks on it (the fetch of the peer's
        identity its receipt sent us to, a database read) costs that envelope alone another
        post: the others' receipts are kept (from review)."""
        if not isinstance(answer, dict) or not is_int(answer.get("status")):
            return Outcome(outbox.RETRY, "bad batch answer", http_status=batch_status)
        item = {key: value for key, value in answer.items() if key != "status"}
        try:
            with request_context(job.claim.trace_id):
                return self._outcome(job, answer["status"], item)
        except Exception as exc:
            log.error(
                "delivery of outbox row %s failed unexpectedly: %s",
                job.claim.outbox_id,
                type(exc).__name__,
            )
            return Outcome(outbox.RETRY, f"internal: {type(exc).__name__}")

    def _outcome(
        self, job: Job, status: int, body: object, retry_after: float | None = None
    ) -> Outcome:
        """What the peer's answer to one envelope means: delivered with a verified receipt,
        to be tried again, or refused for good."""
        if not outbox.is_success(status):
            return classify(status, body, retry_after)
        # A success is read as one: with no valid receipt (a 202 or 204 included) the
        # envelope is posted again, never failed for good, since the peer may hold it and
        # answers a repeat with the receipt it stored.
        if job.sealed_at is None:  # load_jobs fills it for every job that is posted
            raise RuntimeError(f"outbox row {job.claim.outbox_id} was posted without its message")
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
                sealed_at=job.sealed_at,
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

    def _post(
        self,
        url: str,
        wire: dict[str, object],
        trace_id: str | None,
        *,
        max_bytes: int = MAX_RESPONSE_BYTES,
    ) -> PeerAnswer:
        content = json.dumps(wire).encode()
        headers = {"content-type": "application/json"}
        if trace_id:
            headers["x-request-id"] = trace_id
        with self.http.stream("POST", url, content=content, headers=headers) as response:
            try:
                body = read_json_bounded(response, max_bytes=max_bytes)
            except PeerError:
                body = None
            return PeerAnswer(response.status_code, body, retry_after_of(response, utc_now()))

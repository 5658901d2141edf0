"""The delivery worker: claim due outbox rows, post envelopes, verify and keep receipts.

It runs as a thread inside the server by default, or as `entraide worker` processes when an
operator scales out; all coordination goes through the outbox table, none through memory.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.checkpoints import maybe_checkpoint
from app.audit.log import record
from app.audit.witness import (
    WitnessError,
    check_consistency,
    largest_known,
    observe,
    parse_peer_checkpoint,
)
from app.crypto.encoding import utc_now
from app.crypto.receipts import (
    Receipt as ReceiptBody,
)
from app.crypto.receipts import (
    ReceiptError,
    SignedReceipt,
    decode_receipt,
    verify_receipt,
)
from app.db import unit_of_work
from app.delivery import outbox
from app.delivery.retry import backoff
from app.errors import PeerError
from app.models import CaseFile, Message, OutboxItem, Peer, Receipt
from app.node import Node
from app.peers.client import (
    CONSISTENCY_PATH,
    ENVELOPES_PATH,
    make_http_client,
    read_json_bounded,
)
from app.requests.status import status_after_receipt
from app.requests.store import load_envelope

log = logging.getLogger(__name__)

# Refusals a peer may lift without the envelope changing: it may pin us later, recover, or
# shed load. Every other 4xx is a permanent verdict on this envelope.
RETRYABLE_CODES = {
    "unknown_sender",
    "unknown_key",
    "unknown_recipient_key",
    # A message can overtake the request that opens its conversation (the request's own
    # delivery may be backing off); and a receiver whose clock is behind ours refuses an
    # envelope "from the future" only until its clock catches up.
    "unknown_conversation",
    "not_yet_valid",
}
RETRYABLE_STATUS = {408, 425, 429}


@dataclass(frozen=True)
class Outcome:
    state: str
    error: str | None = None
    signed: SignedReceipt | None = None
    receipt: ReceiptBody | None = None


class Worker:
    def __init__(self, node: Node, *, http: httpx.Client | None = None, batch: int = 16) -> None:
        self.node = node
        self.http = http or make_http_client(node.settings.peer_timeout_seconds)
        self.batch = batch
        self._stop = threading.Event()

    def run(self) -> None:
        log.info("delivery worker started")
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except Exception:  # a database outage must not kill the worker thread
                log.exception("delivery round failed; retrying")
                handled = 0
            if handled == 0:
                self.node.outbox_signal.wait(self.node.settings.worker_poll_seconds)
                self.node.outbox_signal.clear()
        log.info("delivery worker stopped")

    def stop(self) -> None:
        self._stop.set()
        self.node.outbox_signal.set()

    def run_once(self) -> int:
        self._checkpoint_if_due()
        lease = timedelta(seconds=self.node.settings.lease_seconds)
        with unit_of_work(self.node.sessions) as session:
            claims = outbox.claim_due(session, now=utc_now(), lease=lease, limit=self.batch)
        for claim in claims:
            if self._stop.is_set():
                break  # the lease will expire and another worker will take the rest
            try:
                self._deliver(claim)
            except Exception as exc:  # one bad peer answer must not stall the whole batch
                log.error(
                    "delivery of outbox row %s failed unexpectedly: %s",
                    claim.outbox_id,
                    type(exc).__name__,
                )
                self._settle(claim, Outcome(outbox.RETRY, f"internal: {type(exc).__name__}"))
        return len(claims)

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

    def _deliver(self, claim: outbox.Claim) -> None:
        with unit_of_work(self.node.sessions) as session:
            message = session.get(Message, claim.message_id)
            peer = session.scalar(select(Peer).where(Peer.authority_id == claim.peer_authority))
            if message is None or peer is None:
                outcome = Outcome(outbox.FAILED, "message or peer no longer exists")
                self._settle(claim, outcome)
                return
            wire = load_envelope(session, message).to_wire()
            expired = message.expires_at <= utc_now()
            url_base = peer.public_url
            url = peer.public_url + ENVELOPES_PATH
            signer_public = peer.signing_key
            signer_kid = peer.signing_kid
            expected = (message.msg_id, message.envelope_hash, message.sender_authority)
            recipient = message.recipient_authority
        if expired:
            self._settle(claim, Outcome(outbox.FAILED, "expired before delivery"))
            return
        try:
            status, body = self._post(url, wire)
        except (httpx.HTTPError, PeerError) as exc:
            self._settle(claim, Outcome(outbox.RETRY, f"transport: {type(exc).__name__}"))
            return
        if status in (200, 201):
            try:
                signed = decode_receipt(body)
                receipt = verify_receipt(
                    signed,
                    signer_public=signer_public,
                    signer_kid=signer_kid,
                    msg_id=expected[0],
                    envelope_hash=expected[1],
                    from_authority=expected[2],
                    to_authority=recipient,
                )
            except ReceiptError as exc:
                self._settle(claim, Outcome(outbox.RETRY, f"bad receipt: {exc}"))
                return
            self._settle(claim, Outcome(outbox.DELIVERED, signed=signed, receipt=receipt))
            if receipt.checkpoint is not None:
                self._witness(claim.peer_authority, url_base, receipt.checkpoint)
            return
        code = body.get("error") if isinstance(body, dict) else None
        code = code if isinstance(code, str) else None
        error = f"HTTP {status} {code or ''}".strip()
        retry = status >= 500 or status in RETRYABLE_STATUS or code in RETRYABLE_CODES
        self._settle(claim, Outcome(outbox.RETRY if retry else outbox.FAILED, error))

    def _witness(self, authority: str, base_url: str, note: str) -> None:
        """Check the peer's checkpoint against what it showed us before (DESIGN.md 5)."""
        with unit_of_work(self.node.sessions) as session:
            peer = session.scalar(select(Peer).where(Peer.authority_id == authority))
            if peer is None:
                return
            known = largest_known(session, authority)
        try:
            observed = parse_peer_checkpoint(peer, note)
            reason = check_consistency(known, observed, lambda a, b: self._proof(base_url, a, b))
        except WitnessError as exc:
            log.warning("could not witness %s's checkpoint: %s", authority, exc)
            return
        try:
            with unit_of_work(self.node.sessions) as session:
                observe(
                    session,
                    peer=peer,
                    observed=observed,
                    reason=reason,
                    own_authority=self.node.authority_id,
                    log_key=self.node.keys.log,
                )
        except IntegrityError:
            pass  # another worker stored the same checkpoint first

    def _proof(self, base_url: str, first: int, second: int) -> list[bytes]:
        url = f"{base_url}{CONSISTENCY_PATH}?first={first}&second={second}"
        try:
            with self.http.stream("GET", url) as response:
                body = read_json_bounded(response)
                status = response.status_code
        except (httpx.HTTPError, PeerError) as exc:
            raise WitnessError(f"no consistency proof: {type(exc).__name__}") from exc
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("proof"), list):
            raise WitnessError(f"no consistency proof: HTTP {status}")
        try:
            return [bytes.fromhex(item) for item in body["proof"][:128]]
        except (TypeError, ValueError) as exc:
            raise WitnessError("malformed consistency proof") from exc

    def _post(self, url: str, wire: dict[str, object]) -> tuple[int, object]:
        content = json.dumps(wire).encode()
        headers = {"content-type": "application/json"}
        with self.http.stream("POST", url, content=content, headers=headers) as response:
            try:
                body = read_json_bounded(response)
            except PeerError:
                body = None
            return response.status_code, body

    def _settle(self, claim: outbox.Claim, outcome: Outcome) -> None:
        now = utc_now()
        with unit_of_work(self.node.sessions) as session:
            item = session.get(OutboxItem, claim.outbox_id, with_for_update=True)
            # The attempt count fences out a worker whose lease expired and was reclaimed.
            if item is None or item.state != outbox.IN_FLIGHT or item.attempts != claim.attempts:
                return
            message = session.get(Message, claim.message_id)
            assert message is not None  # noqa: S101  # rows are never deleted
            item.lease_until = None
            record(
                session,
                actor="node",
                action="delivery.attempt",
                outcome=outcome.state,
                request_id=message.request_id,
                msg_id=message.msg_id,
                peer=claim.peer_authority,
                details={"attempt": claim.attempts, "error": outcome.error},
            )
            if outcome.signed is not None and outcome.receipt is not None:
                self._store_receipt(session, item, message, outcome.signed, outcome.receipt, now)
                return
            item.last_error = outbox.truncate_error(outcome.error or "")
            if outcome.state == outbox.RETRY:
                item.state = outbox.RETRY
                item.next_attempt_at = now + backoff(claim.attempts)
            else:
                item.state = outbox.FAILED
                log.warning("delivery of %s failed: %s", message.msg_id, outcome.error)

    @staticmethod
    def _store_receipt(
        session: Session,
        item: OutboxItem,
        message: Message,
        signed: SignedReceipt,
        receipt: ReceiptBody,
        now: datetime,
    ) -> None:
        if session.scalar(select(Receipt).where(Receipt.message_id == message.id)) is None:
            session.add(
                Receipt(
                    message_id=message.id,
                    body=signed.body,
                    signature=signed.signature,
                    signer_kid=receipt.signer_kid,
                    received_at=receipt.received_at,
                    stored_at=now,
                )
            )
        item.state = outbox.DELIVERED
        item.delivered_at = now
        item.last_error = None
        case = session.get(CaseFile, message.request_id)
        if case is not None:
            case.status = status_after_receipt(case.status)
            case.updated_at = now
        record(
            session,
            actor="node",
            action="receipt.received",
            request_id=message.request_id,
            msg_id=message.msg_id,
            peer=item.peer_authority,
            details={"envelope_hash": message.envelope_hash, "signer_kid": receipt.signer_kid},
        )

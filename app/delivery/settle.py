"""Recording how a delivery attempt ended, in one transaction with its audit entries."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from app.audit.log import Event, record_many
from app.crypto.encoding import utc_now
from app.crypto.receipts import Receipt as ReceiptBody
from app.crypto.receipts import SignedReceipt
from app.delivery import outbox
from app.delivery.retry import next_attempt, policy_for
from app.models import (
    CaseFile,
    DeliveryAttempt,
    Message,
    OutboxItem,
    PeerKey,
    Receipt,
)
from app.peers.keys import SIGNING
from app.requests import moves
from app.requests.status import status_after_receipt

log = logging.getLogger(__name__)
CASES = cast(Table, CaseFile.__table__)


@dataclass(frozen=True)
class Outcome:
    state: str  # DELIVERED, RETRY or FAILED
    error: str | None = None
    http_status: int | None = None
    signed: SignedReceipt | None = None
    receipt: ReceiptBody | None = None
    retry_after: float | None = None  # seconds the peer asked us to wait (Retry-After)


def settle(session: Session, claim: outbox.Claim, outcome: Outcome, *, worker: str) -> bool:
    """Apply an attempt's outcome; False if the claim was lost (lease expired and retaken)."""
    return settle_batch(session, [(claim, outcome)], worker=worker)[0]


def settle_batch(
    session: Session,
    results: Sequence[tuple[outbox.Claim, Outcome]],
    *,
    worker: str,
    clock_steady: bool = True,
) -> list[bool]:
    """Apply a batch's outcomes in one transaction: its rows are read with one query per table
    (the outbox rows locked, in id order so two workers never wait on each other in a cycle),
    written together at the commit, and made durable by one commit instead of one each.
    Per claim: False if the claim was lost (lease expired and retaken). `clock_steady=False`:
    this host's wall clock stepped lately (app/delivery/clocksteps.py), so no deadline fails
    a delivery now; it is tried again after its backoff."""
    if not results:
        return []
    now = utc_now()
    items = {
        item.id: item
        for item in session.scalars(
            select(OutboxItem)
            .where(OutboxItem.id.in_([claim.outbox_id for claim, _ in results]))
            .order_by(OutboxItem.id)
            .with_for_update()
        )
    }
    message_ids = [claim.message_id for claim, _ in results]
    messages = {
        message.id: message
        for message in session.scalars(select(Message).where(Message.id.in_(message_ids)))
    }
    cases = {
        case.id: case
        for case in session.scalars(
            select(CaseFile).where(
                CaseFile.id.in_({message.request_id for message in messages.values()})
            )
        )
    }
    receipted = set(
        session.scalars(select(Receipt.message_id).where(Receipt.message_id.in_(message_ids)))
    )
    results = _without_revoked_signers(session, results)
    settled = []
    events: list[Event] = []  # the batch's audit entries, written with one statement
    tally: dict[str, int] = {}  # the running totals /metrics reads (DeliveryCounter)
    first_receipts: list[CaseFile] = []  # requests whose own receipt came: one UPDATE
    lost: list[tuple[OutboxItem, Message]] = []  # lost for good: their moves undone
    for claim, outcome in results:
        item = items.get(claim.outbox_id)
        if item is None or item.state != outbox.IN_FLIGHT or item.attempts != claim.attempts:
            settled.append(False)
            continue
        message = messages.get(claim.message_id)
        case = cases.get(message.request_id) if message is not None else None
        if message is None or case is None:  # rows are never deleted; a broken invariant
            raise RuntimeError(f"outbox row {item.id} lost its message")
        _apply(
            session,
            claim,
            outcome,
            item,
            message,
            case,
            receipted,
            events,
            worker=worker,
            now=now,
            give_up=clock_steady,
            first_receipts=first_receipts,
            lost=lost,
        )
        settled.append(True)
        _count(tally, f"attempts:{item.state}")
        if item.state == outbox.DELIVERED:
            _count(tally, "delivered")
    # Requests in id order (two workers' batches never lock two of them in opposite
    # orders), the latest message of each first (a chain of lost ones is undone in one go).
    for item, message in sorted(lost, key=lambda pair: (pair[1].request_id, -pair[1].id)):
        events.extend(moves.undo_if_lost(session, item, message, now=now, why="failed"))
    _statuses_after_receipt(session, first_receipts, now)
    if events:
        record_many(session, events)
    outbox.add_to_counters(session, tally)
    return settled


def _without_revoked_signers(
    session: Session, results: Sequence[tuple[outbox.Claim, Outcome]]
) -> Sequence[tuple[outbox.Claim, Outcome]]:
    """A receipt verified with a key that an operator revoked meanwhile (`entraide peers
    replace-key`: a delivery under way keeps the key it started with) proves nothing: the
    attempt is tried again, with the peer's new key. One query for the batch's signers.

    A key id is the recipient's own signing key's: one peer's revoked key of either purpose
    may carry the key id of another's signing key (a peer may publish any 32 bytes as its
    encryption key), and blocked every receipt of that other peer (from review)."""

    def signer(claim: outbox.Claim, outcome: Outcome) -> tuple[str, str] | None:
        if outcome.state != outbox.DELIVERED or outcome.receipt is None:
            return None
        return claim.peer_authority, outcome.receipt.signer_kid

    signers = {key for claim, outcome in results if (key := signer(claim, outcome))}
    if not signers:
        return results
    revoked = {
        (authority, kid)
        for authority, kid in session.execute(
            select(PeerKey.peer_authority, PeerKey.kid).where(
                PeerKey.kid.in_({kid for _, kid in signers}),
                PeerKey.purpose == SIGNING,
                PeerKey.revoked_at.is_not(None),
            )
        )
    }
    if not revoked:
        return results
    retry = Outcome(outbox.RETRY, "bad receipt: signed by a revoked key of the peer")
    return [
        (claim, retry if signer(claim, outcome) in revoked else outcome)
        for claim, outcome in results
    ]


def _count(tally: dict[str, int], name: str) -> None:
    tally[name] = tally.get(name, 0) + 1


def _may_hold_it(session: Session, item: OutboxItem, outcome: Outcome) -> bool:
    """Whether the peer may hold the envelope: this attempt or an earlier one ended with no
    answer (a transport error), a 2xx whose receipt did not check out, a server or gateway
    error, or was taken over unrecorded (outbox.peer_may_hold)."""
    if outbox.answer_may_hold(outcome.http_status, outcome.error):
        return True
    return outbox.peer_may_hold(session, item.id)


def _predecessor_lost(session: Session, message: Message) -> bool:
    """Whether the message this one follows (`in_reply_to`), one of ours, was refused for good
    or cancelled with no attempt that may have left it with the peer: the peer's answer to
    this one would then be 425 predecessor_missing until the deadline."""
    if message.in_reply_to is None:
        return False
    row = session.execute(
        select(OutboxItem.id, OutboxItem.state)
        .join(Message, Message.id == OutboxItem.message_id)
        .where(Message.msg_id == message.in_reply_to)
    ).first()
    if row is None or row.state not in (outbox.FAILED, outbox.CANCELLED):
        return False
    return not outbox.peer_may_hold(session, row.id)


def _apply(
    session: Session,
    claim: outbox.Claim,
    outcome: Outcome,
    item: OutboxItem,
    message: Message,
    case: CaseFile,
    receipted: set[int],
    events: list[Event],
    *,
    worker: str,
    now: datetime,
    give_up: bool,
    first_receipts: list[CaseFile],
    lost: list[tuple[OutboxItem, Message]],
) -> None:
    state = outcome.state
    error = outcome.error
    overdue = False
    predecessor_lost = (
        state == outbox.RETRY and outcome.http_status == 425 and _predecessor_lost(session, message)
    )
    if predecessor_lost:
        # The peer waits for a message that will never come: asking until the deadline
        # (7 days for routine) would only hide that this one cannot arrive either.
        state = outbox.FAILED
        error = (
            f"the message it follows ({message.in_reply_to}) will never reach the peer; "
            f"last error: {error}"
        )
    if state == outbox.RETRY:
        # A peer shedding load (429, 503) may say when to come back: not before then.
        not_before = now + timedelta(seconds=outcome.retry_after) if outcome.retry_after else None
        when = next_attempt(
            now,
            claim.attempts,
            case.urgency,
            item.expires_at,
            not_before=not_before,
            give_up=give_up,
        )
        if not give_up and item.expires_at is not None and now >= item.expires_at:
            log.warning(
                "delivery of request %s to %s is past its %s deadline by this host's clock, "
                "which stepped lately: tried again rather than given up",
                message.request_id,
                claim.peer_authority,
                case.urgency,
            )
        if when is None and item.expires_at is not None and _may_hold_it(session, item, outcome):
            # The peer may hold the envelope and only our copy of its receipt was lost. Keep
            # asking (a repeat is answered with the stored receipt, even after expiry) until
            # it answers or the grace period ends; but say loudly that the deadline passed.
            grace_end = item.expires_at + policy_for(case.urgency).expiry
            when = next_attempt(now, claim.attempts, case.urgency, grace_end, not_before=not_before)
            overdue = True
        if when is None:
            state = outbox.FAILED
            error = f"gave up at the {case.urgency} deadline; last error: {error}"
        else:
            item.next_attempt_at = when
    session.add(
        DeliveryAttempt(
            outbox_id=item.id,
            attempt=claim.attempts,
            worker=worker,
            started_at=claim.claimed_at,
            finished_at=now,
            outcome=state,
            http_status=outcome.http_status,
            # What this attempt met, as it met it: `peer_may_hold` reads it (a connection never
            # made sent nothing), so the give-up's wording stays on the row and in the log.
            error=outbox.truncate_error(outcome.error) if outcome.error else None,
        )
    )
    events.append(
        Event(
            actor="node",
            action="delivery.attempt",
            outcome=state,
            request_id=message.request_id,
            msg_id=message.msg_id,
            peer=claim.peer_authority,
            details={
                "attempt": claim.attempts,
                "error": error,
                "trace_id": claim.trace_id,
                "overdue": overdue,
            },
        )
    )
    if overdue:
        log.error(
            "delivery OVERDUE for request %s to %s: no answer by the %s deadline; still asking",
            message.request_id,
            claim.peer_authority,
            case.urgency,
        )
    item.state = state
    item.lease_until = None
    item.lease_owner = None
    item.updated_at = now
    if outcome.signed is not None and outcome.receipt is not None:
        if message.id not in receipted:
            receipted.add(message.id)
            session.add(
                Receipt(
                    message_id=message.id,
                    body=outcome.signed.body,
                    signature=outcome.signed.signature,
                    signer_kid=outcome.receipt.signer_kid,
                    received_at=outcome.receipt.received_at,
                    stored_at=now,
                )
            )
        _receipted(item, message, outcome.receipt, now, events)
        if message.in_reply_to is None:  # the request itself, not a later message
            first_receipts.append(case)
    else:
        item.last_error = outbox.truncate_error(error or "")
    if state == outbox.FAILED and (predecessor_lost or not _may_hold_it(session, item, outcome)):
        # Lost for good (the peer refuses it until its lost predecessor comes, or no attempt
        # may have left it there): the request goes back to where it was before it, as the
        # peer never moved (app/requests/moves.py), once the batch's outcomes are applied.
        lost.append((item, message))
    if state == outbox.FAILED:
        events.append(
            Event(
                actor="node",
                action="delivery.failed",
                outcome="failed",
                request_id=message.request_id,
                msg_id=message.msg_id,
                peer=claim.peer_authority,
                details={"attempts": claim.attempts, "urgency": case.urgency},
            )
        )
        # Loud on purpose: a request that cannot be delivered needs a person.
        log.error(
            "delivery FAILED for request %s to %s after %s attempts (%s)",
            message.request_id,
            claim.peer_authority,
            claim.attempts,
            case.urgency,
        )


def _receipted(
    item: OutboxItem,
    message: Message,
    receipt: ReceiptBody,
    now: datetime,
    events: list[Event],
) -> None:
    item.delivered_at = now
    item.last_error = None
    events.append(
        Event(
            actor="node",
            action="receipt.received",
            request_id=message.request_id,
            msg_id=message.msg_id,
            peer=item.peer_authority,
            details={"envelope_hash": message.envelope_hash, "signer_kid": receipt.signer_kid},
        )
    )


def _statuses_after_receipt(session: Session, cases: list[CaseFile], now: datetime) -> None:
    """queued → delivered for the requests whose own receipt the batch stored, only where
    the status is still the one read: the cases are read without a lock, and meanwhile the
    peer's first answer (an acknowledgement) or the officer's withdrawal may have moved one
    on, which a plain write would undo (PostgreSQL re-checks the condition against the row
    as committed). One statement per status read (in practice one, `queued`), on the
    connection: no flush of the batch's other rows in between."""
    moves: dict[str, list[CaseFile]] = {}
    for case in cases:
        if status_after_receipt(case.status) != case.status:
            moves.setdefault(case.status, []).append(case)
    for read, moving in moves.items():
        after = status_after_receipt(read)
        changed = set(
            session.connection()
            .execute(
                update(CASES)
                .where(CASES.c.id.in_([case.id for case in moving]), CASES.c.status == read)
                .values(status=after, updated_at=now)
                .returning(CASES.c.id)
            )
            .scalars()
        )
        for case in moving:
            if case.id in changed:
                # What the row now holds, without the session writing it again at its flush.
                set_committed_value(case, "status", after)
                set_committed_value(case, "updated_at", now)

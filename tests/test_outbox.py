"""The outbox on SQLite and PostgreSQL: claims, leases, fencing, release, settling."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from nacl.signing import SigningKey
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from app.audit.mac import append_with
from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.crypto.receipts import Receipt as ReceiptBody
from app.crypto.receipts import SignedReceipt
from app.db import commit_without_waiting, make_engine, make_session_factory, unit_of_work
from app.delivery import admin, outbox
from app.delivery.settle import Outcome, settle, settle_batch
from app.delivery.worker import (
    PRELOAD_BYTES,
    ROUND_LARGE,
    ROUND_PRELOAD_BYTES,
    Job,
    RoundBudget,
    classify,
    group_jobs,
    round_preload,
)
from app.errors import Conflict
from app.models import (
    OUTBOX_WAITING,
    AuditEntry,
    CaseFile,
    DeliveryAttempt,
    DeliveryCounter,
    Message,
    OutboxItem,
    Peer,
    PeerKey,
)
from app.requests import moves
from tests.audit.test_witness import _peer
from tests.conftest import Databases

LEASE = timedelta(seconds=60)


@pytest.fixture
def sessions(databases: Databases) -> Iterator[tuple[str, sessionmaker[Session]]]:
    url = databases.new("outbox", migrated=True)
    engine = make_engine(url)
    # Its entries carry MACs, as a node's do (app/audit/mac.py), under a key of the test's.
    yield databases.backend, append_with(make_session_factory(engine), SigningKey.generate())
    engine.dispose()


def _queue(
    session: Session,
    count: int,
    *,
    urgency: str = "routine",
    size: int = 2,
    before_a3c9: bool = False,
) -> list[int]:
    """`before_a3c9`: in a schema before a3c9e71d5b20 (no claim order on the outbox row)."""
    now = utc_now()
    ids = []
    for _ in range(count):
        case_id = uuid.uuid4().hex
        # These columns only: tests/test_migrations.py queues rows in older schemas too.
        session.execute(
            insert(CaseFile).values(
                id=case_id,
                direction="outbound",
                peer_authority="AR/MPF",
                status="queued",
                urgency=urgency,
                created_at=now,
                updated_at=now,
            )
        )
        message = Message(
            msg_id=case_id,
            request_id=case_id,
            direction="outbound",
            sender_authority="ES/MJ",
            recipient_authority="AR/MPF",
            created_at=now,
            expires_at=now + timedelta(days=7),
            header=b"{}",
            signature=bytes(64),
            envelope_hash="0" * 64,
            size_bytes=size,
        )
        session.add(message)
        session.flush()
        order = {} if before_a3c9 else {"priority": outbox.priority_of(urgency), "size_bytes": size}
        row = session.execute(
            insert(OutboxItem)
            .values(
                message_id=message.id,
                peer_authority="AR/MPF",
                state=outbox.QUEUED,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                expires_at=now + timedelta(hours=1),
                **order,
            )
            .returning(OutboxItem.id)
        )
        ids.append(int(row.scalar_one()))
    return ids


def test_claim_lease_reclaim_and_fencing(sessions: tuple[str, sessionmaker[Session]]) -> None:
    _, factory = sessions
    with unit_of_work(factory) as session:
        (row,) = _queue(session, 1)
    with unit_of_work(factory) as session:
        (first,) = outbox.claim_due(
            session, now=utc_now(), lease=timedelta(0), limit=10, owner="w1"
        )
    assert (first.outbox_id, first.attempts) == (row, 1)
    # The lease ran out (w1 died): another worker reclaims the row...
    with unit_of_work(factory) as session:
        (second,) = outbox.claim_due(
            session, now=utc_now() + timedelta(seconds=1), lease=LEASE, limit=10, owner="w2"
        )
    assert second.attempts == 2
    # ...and w1, waking up, can no longer settle it.
    with unit_of_work(factory) as session:
        assert not settle(session, first, Outcome(outbox.FAILED, "late"), worker="w1")
    with unit_of_work(factory) as session:
        assert settle(session, second, Outcome(outbox.RETRY, "HTTP 503"), worker="w2")
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, row)
        assert item is not None
        assert item.state == outbox.RETRY
        assert item.lease_owner is None
        history = list(session.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)))
        # The lost claim's attempt is on record too, its outcome unknown: whatever its post
        # did, the peer may hold the envelope (outbox.peer_may_hold).
        assert [(a.attempt, a.worker, a.outcome) for a in history] == [
            (1, "w1", outbox.LEASE_EXPIRED),
            (2, "w2", "retry"),
        ]
        assert outbox.peer_may_hold(session, row)
    # In the audit trail too, as every attempt is: the only sign there that the peer may hold it.
    assert _unknown_attempts(factory) == [
        (1, "lease expired: the outcome of this attempt is unknown")
    ]


def _unknown_attempts(factory: sessionmaker[Session]) -> list[tuple[int, str]]:
    with unit_of_work(factory) as session:
        entries = session.scalars(
            select(AuditEntry.entry)
            .where(AuditEntry.action == "delivery.attempt", AuditEntry.outcome == "lease_expired")
            .order_by(AuditEntry.idx)
        )
        return [
            (json.loads(e)["details"]["attempt"], json.loads(e)["details"]["error"])
            for e in entries
        ]


def test_nothing_due_is_not_claimed(sessions: tuple[str, sessionmaker[Session]]) -> None:
    _, factory = sessions
    with unit_of_work(factory) as session:
        _queue(session, 3)
        item = session.scalars(select(OutboxItem)).first()
        assert item is not None
        item.next_attempt_at = utc_now() + timedelta(hours=1)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w")
    assert len(claims) == 2
    with unit_of_work(factory) as session:
        assert outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w") == []


def test_a_conversations_messages_are_delivered_in_the_order_written(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """A later message of a request waits while an earlier one is queued, backing off or
    being posted: out of order, the peer applied the later move first, then the earlier
    one on top, to a state its sender never had (from review). Other requests go on."""
    _, factory = sessions
    with unit_of_work(factory) as session:
        first, second, third, other = _queue(session, 4)
        conversation = session.get(Message, session.get(OutboxItem, first).message_id)  # type: ignore[union-attr]
        assert conversation is not None
        for row in (first, second, third, other):
            item = session.get(OutboxItem, row)
            assert item is not None
            message = session.get(Message, item.message_id)
            assert message is not None
            if row != other:
                message.request_id = conversation.request_id
            item.request_id = message.request_id  # as `enqueue` writes it

    def claimed() -> list[int]:
        with unit_of_work(factory) as session:
            claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w")
        return sorted(claim.outbox_id for claim in claims)

    assert claimed() == [first, other]
    assert claimed() == []  # the first is being posted: the second waits for its outcome
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, first)
        assert item is not None
        item.state, item.next_attempt_at = outbox.RETRY, utc_now() + timedelta(hours=1)
    assert claimed() == []  # backing off: the second still waits (it was due all along)
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, first)
        assert item is not None
        item.state = outbox.DELIVERED
    assert claimed() == [second]  # and the third after it, once it is settled
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, second)
        assert item is not None
        item.state = outbox.FAILED  # lost for good: what follows it goes on
    assert claimed() == [third]


def test_stopping_worker_releases_its_rows(sessions: tuple[str, sessionmaker[Session]]) -> None:
    _, factory = sessions
    with unit_of_work(factory) as session:
        _queue(session, 4)
    with unit_of_work(factory) as session:
        mine = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=3, owner="me")
        theirs = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=3, owner="other")
    assert (len(mine), len(theirs)) == (3, 1)
    with unit_of_work(factory) as session:
        assert outbox.release_owned(session, owner="me", now=utc_now()) == 3
    with unit_of_work(factory) as session:
        stats = outbox.queue_stats(session)
        assert stats.by_state[outbox.RETRY] == 3
        assert stats.by_state[outbox.IN_FLIGHT] == 1
        assert stats.oldest_pending_at is not None
        again = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="new")
    assert sorted(c.outbox_id for c in again) == sorted(c.outbox_id for c in mine)


def test_the_claim_orders_queued_retried_and_taken_over_rows_as_one(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """The claim reads each state's due rows apart (each an ordered scan of its index that
    stops at the round's limit): together they still come most pressing first, then oldest
    due first, and the round's limit holds across them."""
    _, factory = sessions
    now = utc_now()
    with unit_of_work(factory) as session:
        routine_queued, routine_retry = _queue(session, 2)
        urgent_retry, urgent_queued = _queue(session, 2, urgency="urgent")
        (emergency_taken_over,) = _queue(session, 1, urgency="emergency")
        (emergency_not_yet,) = _queue(session, 1, urgency="emergency")
        for row, state, due in [
            (routine_retry, outbox.RETRY, now - timedelta(minutes=5)),
            (urgent_retry, outbox.RETRY, now - timedelta(minutes=1)),
            (urgent_queued, outbox.QUEUED, now - timedelta(minutes=2)),
            (emergency_taken_over, outbox.IN_FLIGHT, now - timedelta(minutes=3)),
            (emergency_not_yet, outbox.RETRY, now + timedelta(minutes=1)),
        ]:
            item = session.get(OutboxItem, row)
            assert item is not None
            item.state, item.next_attempt_at = state, due
            item.lease_until = now - timedelta(seconds=1) if state == outbox.IN_FLIGHT else None
    later = utc_now() + timedelta(seconds=1)  # the rows left as queued are due too
    with unit_of_work(factory) as session:
        first = outbox.claim_due(session, now=later, lease=LEASE, limit=3, owner="w")
    with unit_of_work(factory) as session:
        rest = outbox.claim_due(session, now=later, lease=LEASE, limit=3, owner="w")
    assert [claim.outbox_id for claim in first] == [
        emergency_taken_over,
        urgent_queued,
        urgent_retry,
    ]
    assert [claim.outbox_id for claim in rest] == [routine_retry, routine_queued]


def test_the_claim_reads_the_waiting_rows_through_their_partial_index(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """A claim with a backlog must read a round's rows and stop, however many rows wait or
    were delivered before (a sort of every waiting row cost tens of milliseconds a round
    with 20,000 of them, bench/claim.py). The partial index serves it only while the query
    writes its condition exactly as the index does (app.models.OUTBOX_WAITING)."""
    backend, factory = sessions
    with unit_of_work(factory) as session:
        _queue(session, 3)
    statements: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT outbox.") and "next_attempt_at <=" in statement:
            statements.append((statement, params))

    session = factory()
    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", keep)
    try:
        outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=64, owner="w")
    finally:
        event.remove(engine, "before_cursor_execute", keep)
        session.rollback()
        session.close()
    ((statement, params),) = statements
    with engine.connect() as connection:
        if backend == "sqlite":
            plan = " ".join(
                str(row[3])
                for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
            )
            assert "USING INDEX ix_outbox_claim_order" in plan, plan
            assert "TEMP B-TREE" not in plan, plan  # read in order: no sort
        else:
            # Three rows only: a sequential scan would win. Is the index usable at all?
            connection.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(
                str(row[0]) for row in connection.exec_driver_sql(f"EXPLAIN {statement}", params)
            )
            assert "ix_outbox_claim_order" in plan, plan
            assert "Sort" not in plan, plan
    # The index is partial as the migration made it (alembic's comparison of models and
    # migrations does not look at an index's condition): over the waiting rows alone.
    with engine.connect() as connection:
        if backend == "sqlite":
            made = connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'ix_outbox_claim_order'"
            ).scalar_one()
            assert made.endswith(f"WHERE {OUTBOX_WAITING['sqlite']}"), made
        else:
            made = connection.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_outbox_claim_order'"
            ).scalar_one()
            condition = made.split(" WHERE ", 1)[1]
            for state in ("'queued'", "'retry'"):
                assert state in condition, made
            for state in ("in_flight", "delivered", "failed", "cancelled"):
                assert state not in condition, made


def _expired_claim(
    factory: sessionmaker[Session], expired_for: timedelta
) -> tuple[int, outbox.Claim]:
    with unit_of_work(factory) as session:
        (row,) = _queue(session, 1, urgency="emergency")
        item = session.get(OutboxItem, row)
        assert item is not None
        item.expires_at = utc_now() - expired_for
    with unit_of_work(factory) as session:
        # Every row due, not just one: an earlier row of the test, retried after its short
        # emergency back-off, may be due again on a slow host and come first.
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w")
    (claim,) = [claim for claim in claims if claim.outbox_id == row]
    return row, claim


def _state(factory: sessionmaker[Session], row: int) -> tuple[str, str]:
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, row)
        assert item is not None
        return item.state, item.last_error or ""


def test_a_refusal_past_the_deadline_fails_loudly(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    _, factory = sessions
    row, claim = _expired_claim(factory, timedelta(seconds=1))
    refused = Outcome(outbox.RETRY, "HTTP 429 too_many_requests", http_status=429)
    with unit_of_work(factory) as session:
        assert settle(session, claim, refused, worker="w")
    state, error = _state(factory, row)
    assert state == outbox.FAILED
    assert "emergency deadline" in error
    with unit_of_work(factory) as session:
        actions = list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.idx)))
    assert actions[-2:] == ["delivery.attempt", "delivery.failed"]


def test_silence_past_the_deadline_keeps_asking_then_fails(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """No answer at all: the peer may hold the envelope; keep asking for its receipt during
    a grace period (loudly overdue), and give up only after it."""
    _, factory = sessions
    silent = Outcome(outbox.RETRY, "transport: ReadTimeout")
    row, claim = _expired_claim(factory, timedelta(seconds=1))
    with unit_of_work(factory) as session:
        assert settle(session, claim, silent, worker="w")
    assert _state(factory, row)[0] == outbox.RETRY
    with unit_of_work(factory) as session:
        entry = session.scalars(select(AuditEntry).order_by(AuditEntry.idx.desc())).first()
        assert entry is not None
        assert b'"overdue":true' in entry.entry
    past_grace, claim = _expired_claim(factory, timedelta(hours=3))
    with unit_of_work(factory) as session:
        assert settle(session, claim, silent, worker="w")
    assert _state(factory, past_grace)[0] == outbox.FAILED


def _claim_again(factory: sessionmaker[Session], row: int) -> outbox.Claim:
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, row)
        assert item is not None
        item.next_attempt_at = utc_now() - timedelta(seconds=1)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w")
    (claim,) = [claim for claim in claims if claim.outbox_id == row]
    return claim


def test_an_answer_past_the_deadline_after_a_lost_one_keeps_asking(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """An earlier attempt had no answer (the peer may hold the envelope); the last one is a
    503 from the peer's proxy: still unknown, so the grace period applies, not a failure."""
    _, factory = sessions
    row, claim = _expired_claim(factory, timedelta(seconds=1))
    with unit_of_work(factory) as session:
        assert settle(session, claim, Outcome(outbox.RETRY, "transport: ReadTimeout"), worker="w")
    claim = _claim_again(factory, row)
    refused = Outcome(outbox.RETRY, "HTTP 503 database_unavailable", http_status=503)
    with unit_of_work(factory) as session:
        assert settle(session, claim, refused, worker="w")
    assert _state(factory, row)[0] == outbox.RETRY


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        # No connection could be made: nothing was sent, so no grace period.
        (Outcome(outbox.RETRY, "transport: ConnectError"), outbox.FAILED),
        # A 2xx whose receipt does not check out: the peer holds the envelope.
        (
            Outcome(outbox.RETRY, "bad receipt: signature does not verify", http_status=201),
            outbox.RETRY,
        ),
    ],
    ids=["never_reached", "bad_receipt"],
)
def test_a_first_attempt_past_the_deadline_keeps_asking_only_if_the_peer_may_hold_it(
    sessions: tuple[str, sessionmaker[Session]], outcome: Outcome, state: str
) -> None:
    _, factory = sessions
    row, claim = _expired_claim(factory, timedelta(seconds=1))
    with unit_of_work(factory) as session:
        assert settle(session, claim, outcome, worker="w")
    assert _state(factory, row)[0] == state
    with unit_of_work(factory) as session:
        # From a review: the give-up's wording was written on the attempt, which then no
        # longer read "could not connect", and a peer never reached was taken to hold it
        # (the request's move was never put back).
        assert outbox.peer_may_hold(session, row) == (state == outbox.RETRY)
        errors = session.scalars(
            select(DeliveryAttempt.error).where(DeliveryAttempt.outbox_id == row)
        )
        assert list(errors) == [outcome.error]


@pytest.mark.parametrize(
    ("status", "code", "may_hold"),
    [(503, "database_unavailable", True), (503, "storage_unavailable", False), (429, "", False)],
)
def test_a_peers_failing_database_may_have_committed(
    sessions: tuple[str, sessionmaker[Session]], status: int, code: str, may_hold: bool
) -> None:
    """A peer answers 503 database_unavailable also when its commit went through and only the
    sync after it failed (or PostgreSQL's connection broke at COMMIT): it may hold it."""
    _, factory = sessions
    with unit_of_work(factory) as session:
        (row,) = _queue(session, 1)
    with unit_of_work(factory) as session:
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner="w")
    answered = classify(status, {"error": code} if code else None)
    with unit_of_work(factory) as session:
        assert settle(session, claim, answered, worker="w")
    with unit_of_work(factory) as session:
        assert outbox.peer_may_hold(session, row) is may_hold


def test_a_stopping_worker_records_the_posts_it_could_not_settle(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """From a review: a post whose settlement failed went back to the queue with no trace, so
    the peer that may hold it was taken not to (a cancel then put the request's move back)."""
    _, factory = sessions
    with unit_of_work(factory) as session:
        posted, unposted = _queue(session, 2)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=2, owner="me")
    assert len(claims) == 2
    with unit_of_work(factory) as session:
        released = outbox.release_owned(session, owner="me", now=utc_now(), unsettled={posted})
        assert released == 2
    with unit_of_work(factory) as session:
        assert outbox.peer_may_hold(session, posted)
        assert not outbox.peer_may_hold(session, unposted)
    assert _state(factory, posted)[0] == _state(factory, unposted)[0] == outbox.RETRY
    assert _unknown_attempts(factory) == [
        (1, "released unsettled: the outcome of this attempt is unknown")
    ]


def _receipt(received_at: datetime) -> ReceiptBody:
    """A receipt as a verified one reads (its signature is not what settlement checks)."""
    return ReceiptBody(
        msg_id="0" * 32,
        envelope_hash="0" * 64,
        from_authority="ES/MJ",
        to_authority="AR/MPF",
        received_at=received_at,
        status="received",
        signer_kid="5" * 32,
        checkpoint=None,
    )


def test_a_receipt_signed_by_a_revoked_key_is_not_a_delivery(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """A delivery under way when an operator replaced the peer's compromised key keeps the
    key it started with: its receipt, verified with that key, proves nothing any more."""
    _, factory = sessions
    now = utc_now()
    with unit_of_work(factory) as session:
        (row,) = _queue(session, 1)
        session.add(
            PeerKey(
                peer_authority="AR/MPF",
                purpose="signing",
                kid="5" * 32,
                public_key=bytes(32),
                pinned_at=now,
                superseded_at=now,
                revoked_at=now,
            )
        )
    with unit_of_work(factory) as session:
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner="w")
    receipt = _receipt(now)
    delivered = Outcome(outbox.DELIVERED, http_status=201, receipt=receipt)
    with unit_of_work(factory) as session:
        assert settle(session, claim, delivered, worker="w")
    state, error = _state(factory, row)
    assert state == outbox.RETRY
    assert "revoked" in error


def test_concurrent_claims_never_share_a_row(sessions: tuple[str, sessionmaker[Session]]) -> None:
    """Four workers claim at once: every row exactly once (SKIP LOCKED on PostgreSQL,
    serialised IMMEDIATE transactions on SQLite)."""
    _, factory = sessions
    with unit_of_work(factory) as session:
        _queue(session, 40)
    claimed: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def work(owner: str) -> None:
        barrier.wait()
        while True:
            with unit_of_work(factory) as session:
                claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=3, owner=owner)
            if not claims:
                return
            with lock:
                claimed.extend(c.outbox_id for c in claims)

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(claimed) == 40
    assert len(set(claimed)) == 40
    with unit_of_work(factory) as session:
        owners = session.scalar(select(func.count(func.distinct(OutboxItem.lease_owner))))
    assert owners is not None
    assert owners >= 1


def test_a_claim_committed_without_waiting_is_committed_and_nothing_else_is(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    backend, factory = sessions
    with unit_of_work(factory) as session:
        ids = _queue(session, 3)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w")
        commit_without_waiting(session)
    assert sorted(claim.outbox_id for claim in claims) == sorted(ids)
    with unit_of_work(factory) as session:
        states = session.scalars(select(OutboxItem.state).where(OutboxItem.id.in_(ids)))
        assert set(states) == {outbox.IN_FLIGHT}
        if backend == "postgresql":  # SET LOCAL: the next transaction waits for the disk again
            assert session.scalar(text("SHOW synchronous_commit")) == "on"
        else:
            assert "entraide_commit_no_wait" not in session.connection().info
    with unit_of_work(factory) as session:
        assert settle_batch(
            session,
            [(claim, Outcome(outbox.RETRY, "HTTP 503", http_status=503)) for claim in claims],
            worker="w",
        ) == [True, True, True]
    with unit_of_work(factory) as session:
        states = session.scalars(select(OutboxItem.state).where(OutboxItem.id.in_(ids)))
        assert set(states) == {outbox.RETRY}
        attempts = session.scalar(select(func.count()).select_from(DeliveryAttempt))
        assert attempts == 3


def _first_claim_lost(
    factory: sessionmaker[Session], count: int
) -> tuple[list[outbox.Claim], outbox.Claim]:
    """`count` rows claimed by w1; its lease on the first ran out and w2 reclaimed that one,
    while w1 renewed the others. Returns w1's claims and w2's."""
    with unit_of_work(factory) as session:
        _queue(session, count)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=count, owner="w1")
    with unit_of_work(factory) as session:
        later = utc_now() + LEASE + timedelta(seconds=1)
        (taken,) = outbox.claim_due(session, now=later, lease=LEASE, limit=1, owner="w2")
        for claim in claims[1:]:
            item = session.get(OutboxItem, claim.outbox_id)
            assert item is not None
            item.lease_until = later + LEASE
    assert taken.outbox_id == claims[0].outbox_id
    return claims, taken


def test_settling_a_batch_skips_only_the_claims_that_were_lost(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    _, factory = sessions
    (lost, kept), _ = _first_claim_lost(factory, 2)
    with unit_of_work(factory) as session:
        results = [
            (lost, Outcome(outbox.FAILED, "HTTP 400", http_status=400)),
            (kept, Outcome(outbox.RETRY, "HTTP 503", http_status=503)),
        ]
        assert settle_batch(session, results, worker="w1") == [False, True]
    with unit_of_work(factory) as session:
        states = {
            item.id: (item.state, item.lease_owner) for item in session.scalars(select(OutboxItem))
        }
    assert states == {
        lost.outbox_id: (outbox.IN_FLIGHT, "w2"),
        kept.outbox_id: (outbox.RETRY, None),
    }


def _sized(factory: sessionmaker[Session], sizes: list[int]) -> list[int]:
    with unit_of_work(factory) as session:
        return [row for size in sizes for row in _queue(session, 1, size=size)]


def test_a_round_preloads_small_envelopes_within_its_byte_budget(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """Claims of 64 large envelopes must not all sit in memory at once: past the budget (or
    past the preload size) the thread that posts an envelope reads it. (The worker's claims
    keep within the budget already, `RoundBudget`; this is the second guard.)"""
    _, factory = sessions
    kib = 1024
    sizes = [300 * kib] + [200 * kib] * 22  # one over PRELOAD_BYTES, then 22 under it
    rows = _sized(factory, sizes)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=64, owner="w")
        messages = {m.id: m for m in session.scalars(select(Message))}
        chosen = round_preload(claims, messages)
        by_message = {claim.message_id: claim.outbox_id for claim in claims}
        chosen_rows = [by_message[message.id] for message in chosen]
    budget = ROUND_PRELOAD_BYTES // (200 * kib)  # 20 of them fit
    assert chosen_rows == rows[1 : 1 + budget]  # in queue order, the large one left out
    assert sum(sizes[1 : 1 + budget]) <= ROUND_PRELOAD_BYTES < sum(sizes[1 : 2 + budget])


def test_a_round_claims_no_more_than_its_budget_and_leaves_the_rest_queued(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """Past the budget a row is not claimed at all (so never posted alone for want of
    memory): it waits for the next round, still queued."""
    _, factory = sessions
    kib = 1024
    small = ROUND_PRELOAD_BYTES // (200 * kib)  # 20 of 200 KiB fit
    rows = _sized(factory, [200 * kib] * (small + 3) + [300 * kib] * (ROUND_LARGE + 2))
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(
            session, now=utc_now(), lease=LEASE, limit=64, owner="w", admit=RoundBudget().admit
        )
    claimed = [claim.outbox_id for claim in claims]
    assert claimed == rows[:small] + rows[small + 3 : small + 3 + ROUND_LARGE]
    with unit_of_work(factory) as session:
        states = {row: session.get(OutboxItem, row).state for row in rows}  # type: ignore[union-attr]
        again = outbox.claim_due(
            session, now=utc_now(), lease=LEASE, limit=64, owner="w", admit=RoundBudget().admit
        )
    assert [row for row in rows if states[row] == outbox.QUEUED] == [
        row for row in rows if row not in claimed
    ]
    assert sorted(claim.outbox_id for claim in again) == [r for r in rows if r not in claimed]


def _job(outbox_id: int, peer: str, *, small: bool) -> Job:
    claim = outbox.Claim(outbox_id, outbox_id, peer, 1, None, utc_now())
    return Job(claim, gone=False, wire={"v": 1} if small else None, base_url=f"http://{peer}")


def test_the_most_pressing_envelope_is_posted_first_and_batches_keep_queue_order() -> None:
    # In the claim's order: an emergency for B (queued last), then A's routine rows, large
    # ones (alone) and small ones (one batch), these claimed out of queue order.
    jobs = [
        _job(90, "b", small=True),
        _job(10, "a", small=False),
        _job(11, "a", small=False),
        _job(13, "a", small=True),
        _job(12, "a", small=True),
    ]
    groups = [[job.claim.outbox_id for job in group] for group in group_jobs(jobs)]
    assert groups == [[90], [10], [11], [12, 13]]


def _history_totals(session: Session) -> dict[str, int]:
    """What /metrics used to count over the whole history at every scrape."""
    totals = {
        f"attempts:{outcome}": count
        for outcome, count in session.execute(
            select(DeliveryAttempt.outcome, func.count()).group_by(DeliveryAttempt.outcome)
        )
    }
    delivered = session.scalar(
        select(func.count()).select_from(OutboxItem).where(OutboxItem.state == outbox.DELIVERED)
    )
    if delivered:
        totals["delivered"] = delivered
    return totals


def test_settlement_keeps_the_totals_metrics_read(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    _, factory = sessions
    (lost, retried, refused), taken = _first_claim_lost(factory, 3)
    with unit_of_work(factory) as session:
        results = [
            (lost, Outcome(outbox.DELIVERED, http_status=201)),  # lost: counted by nobody
            (retried, Outcome(outbox.RETRY, "HTTP 503", http_status=503)),
            (refused, Outcome(outbox.FAILED, "HTTP 400", http_status=400)),
        ]
        assert settle_batch(session, results, worker="w1") == [False, True, True]
    with unit_of_work(factory) as session:
        assert settle(session, taken, Outcome(outbox.DELIVERED, http_status=201), worker="w2")
    with unit_of_work(factory) as session:
        kept = dict(session.execute(select(DeliveryCounter.name, DeliveryCounter.value)).all())
        assert kept == _history_totals(session)
        assert kept == {
            "attempts:lease_expired": 1,  # the lost claim, taken over: its outcome unknown
            "attempts:retry": 1,
            "attempts:failed": 1,
            "attempts:delivered": 1,
            "delivered": 1,
        }


def test_a_round_without_room_for_large_envelopes_claims_the_small_ones_behind_them(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """While long transfers take the posting threads a round may give them, the large rows
    queued first must not fill the round's claims: the small ones behind them go."""
    _, factory = sessions
    kib = 1024
    rows = _sized(factory, [300 * kib] * 5 + [2 * kib] * 3)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(
            session, now=utc_now(), lease=LEASE, limit=4, owner="w", max_size=PRELOAD_BYTES
        )
    assert [claim.outbox_id for claim in claims] == rows[5:]


def test_a_row_still_being_posted_is_not_claimed_again_by_its_worker(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """A long post may outlive its lease: the worker posting it does not claim it again."""
    _, factory = sessions
    rows = _sized(factory, [2 * 1024] * 2)
    with unit_of_work(factory) as session:
        claims = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=10, owner="w")
    later = utc_now() + 2 * LEASE  # both leases run out
    with unit_of_work(factory) as session:
        again = outbox.claim_due(
            session, now=later, lease=LEASE, limit=10, owner="w", skip=[claims[0].outbox_id]
        )
    assert [claim.outbox_id for claim in again] == rows[1:]


@pytest.mark.parametrize("moved_to", ["acknowledged", "withdrawn"])
def test_a_receipt_never_undoes_a_status_that_moved_while_it_was_settled(
    sessions: tuple[str, sessionmaker[Session]], moved_to: str
) -> None:
    """Settlement reads the request's status without a lock; the peer's acknowledgement (or
    the officer's withdrawal) committed meanwhile must survive the receipt's queued →
    delivered, else the two nodes disagree for good on where the request stands."""
    backend, factory = sessions
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: the two transactions cannot interleave")
    with unit_of_work(factory) as session:
        (row,) = _queue(session, 1)
    with unit_of_work(factory) as session:
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner="w")
    receipt = _receipt(utc_now())
    signed = SignedReceipt(body=b"{}", signature=bytes(64))
    delivered = Outcome(outbox.DELIVERED, http_status=201, signed=signed, receipt=receipt)
    with unit_of_work(factory) as settling:
        message = settling.get(Message, claim.message_id)
        assert message is not None
        case = settling.get(CaseFile, message.request_id)  # read as settlement reads it
        assert case is not None
        assert case.status == "queued"
        with unit_of_work(factory) as other:
            other.execute(update(CaseFile).where(CaseFile.id == case.id).values(status=moved_to))
        assert settle_batch(settling, [(claim, delivered)], worker="w") == [True]
    with unit_of_work(factory) as session:
        stored = session.get(CaseFile, message.request_id)
        assert stored is not None
        assert stored.status == moved_to
        assert session.get(OutboxItem, row).state == outbox.DELIVERED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("before", "lost"),
    [
        ("cancelled", True),  # cancelled before any attempt: the peer never had it
        ("refused", True),  # refused for good (a 4xx)
        ("no_answer", False),  # gave up with no answer once sent: the peer may hold it
        ("retry", False),  # still on its way
    ],
)
def test_a_message_whose_predecessor_will_never_arrive_fails_at_once(
    sessions: tuple[str, sessionmaker[Session]], before: str, lost: bool
) -> None:
    """The peer answers 425 predecessor_missing to a message that follows one it has not
    received. If that one will never come (ours, refused for good or cancelled, with no
    attempt that may have left it there), asking until the deadline (7 days for routine)
    hides that this one cannot arrive either: it fails now, and says why."""
    _, factory = sessions
    now = utc_now()
    with unit_of_work(factory) as session:
        first, second = _queue(session, 2)
        earlier, later = session.get(OutboxItem, first), session.get(OutboxItem, second)
        assert earlier is not None
        assert later is not None
        predecessor = session.get(Message, earlier.message_id)
        follower = session.get(Message, later.message_id)
        assert predecessor is not None
        assert follower is not None
        follower.in_reply_to = predecessor.msg_id
        earlier.next_attempt_at = now + timedelta(days=1)  # only the follower is claimed
        earlier.state = {"cancelled": outbox.CANCELLED, "retry": outbox.RETRY}.get(
            before, outbox.FAILED
        )
        if before in ("refused", "no_answer"):
            session.add(
                DeliveryAttempt(
                    outbox_id=first,
                    attempt=1,
                    worker="w",
                    started_at=now,
                    finished_at=now,
                    outcome=outbox.FAILED,
                    http_status=409 if before == "refused" else None,
                    error="HTTP 409 transition_not_allowed"
                    if before == "refused"
                    else "transport: ReadTimeout",
                )
            )
    with unit_of_work(factory) as session:
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=2, owner="w")
    assert claim.outbox_id == second
    early = Outcome(outbox.RETRY, "HTTP 425 predecessor_missing", http_status=425)
    with unit_of_work(factory) as session:
        assert settle(session, claim, early, worker="w")
    state, error = _state(factory, second)
    assert state == (outbox.FAILED if lost else outbox.RETRY)
    assert ("will never reach the peer" in error) is lost


def test_a_running_total_another_process_inserted_first_is_added_to(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """Two workers take over expired leases at once, and both find no `lease_expired` total:
    the second insert adds to the first's row (it failed the claim's whole transaction)."""
    _, factory = sessions
    with unit_of_work(factory) as session:
        session.execute(outbox._upsert(session, "attempts:lease_expired", 1))
        session.execute(outbox._upsert(session, "attempts:lease_expired", 2))
    with unit_of_work(factory) as session:
        assert session.get(DeliveryCounter, "attempts:lease_expired").value == 3  # type: ignore[union-attr]


def test_a_cancel_sees_a_claim_committed_before_its_lock(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """From a review: cancel read the row, a worker's claim committed, and cancel's lock then
    kept the copy read before it (the identity map): it cancelled a delivery being posted,
    whose receipt was then thrown away and whose move was put back."""
    backend, factory = sessions
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: the claim cannot come in between")
    with unit_of_work(factory) as session:
        (row,) = _queue(session, 1)
    claimed: list[outbox.Claim] = []

    def claim_before_the_lock(state: ORMExecuteState) -> None:
        if claimed or getattr(state.statement, "_for_update_arg", None) is None:
            return
        with unit_of_work(factory) as worker:
            claimed.extend(outbox.claim_due(worker, now=utc_now(), lease=LEASE, limit=1, owner="w"))

    with unit_of_work(factory) as session:
        event.listen(session, "do_orm_execute", claim_before_the_lock)
        with pytest.raises(Conflict, match="in_flight"):
            admin.cancel_delivery(session, delivery_id=row, actor="operator:test")
    assert [claim.outbox_id for claim in claimed] == [row]
    assert _state(factory, row)[0] == outbox.IN_FLIGHT


def _one_conversation(factory: sessionmaker[Session], count: int) -> list[int]:
    """`count` deliveries of one request, queued in order, as `enqueue` writes them."""
    with unit_of_work(factory) as session:
        rows = _queue(session, count)
        items = [session.get(OutboxItem, row) for row in rows]
        messages = [session.get(Message, item.message_id) for item in items if item is not None]
        for item, message in zip(items, messages, strict=True):
            assert item is not None
            assert message is not None
            message.request_id = messages[0].request_id  # type: ignore[union-attr]
            item.request_id = message.request_id
    return rows


def test_a_retry_never_posts_a_message_after_a_later_one_of_its_request(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    _, factory = sessions
    first, second = _one_conversation(factory, 2)
    with unit_of_work(factory) as session:
        session.execute(update(OutboxItem).where(OutboxItem.id == first).values(state="failed"))
    with unit_of_work(factory) as session:  # the later one still waits: the retry is in order
        admin.retry_delivery(session, delivery_id=first, actor="operator:test")
    with unit_of_work(factory) as session:
        session.execute(update(OutboxItem).where(OutboxItem.id == first).values(state="failed"))
        session.execute(update(OutboxItem).where(OutboxItem.id == second).values(state="delivered"))
    with pytest.raises(Conflict, match="out of order") as refused, unit_of_work(factory) as s:
        admin.retry_delivery(s, delivery_id=first, actor="operator:test")
    assert refused.value.code == "overtaken"
    assert _state(factory, first)[0] == outbox.FAILED


def test_a_claim_handed_back_after_its_peer_resumed_is_due_at_once(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """The worker read the peer as suspended, the operator resumed it (a resumption makes
    due the rows that wait, not one in flight), then the claim was handed back: due now,
    not a century away with every later message of its request behind it (from review)."""
    _, factory = sessions
    with unit_of_work(factory) as session:
        (row,) = _queue(session, 1)
        session.add(_peer(NodeKeys.generate()))  # AR/MPF, the rows' peer
    with unit_of_work(factory) as session:
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner="w")
    now = utc_now()
    with unit_of_work(factory) as session:  # not suspended (any more): due at once
        outbox.hand_back_unposted(session, [claim], owner="w", now=now)
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, row)
        assert item is not None
        assert (item.state, item.attempts, item.next_attempt_at) == (outbox.QUEUED, 0, now)
        (claim,) = outbox.claim_due(session, now=utc_now(), lease=LEASE, limit=1, owner="w")
        session.execute(update(Peer).values(suspended_at=now, suspended_reason="test"))
    with unit_of_work(factory) as session:  # still suspended: waits for a resumption
        outbox.hand_back_unposted(session, [claim], owner="w", now=now)
    with unit_of_work(factory) as session:
        item = session.get(OutboxItem, row)
        assert item is not None
        assert item.next_attempt_at == now + outbox.SUSPENDED_FOR


@pytest.mark.parametrize("first_in", ["retry", "claim"])
def test_a_retry_and_a_later_messages_claim_at_once_keep_the_order(
    sessions: tuple[str, sessionmaker[Session]], first_in: str
) -> None:
    """An operator's retry of an earlier failed message and a worker's claim of a later one,
    each in a transaction the other cannot see yet: each checked a row the other was writing,
    both committed, and the later message was posted before the earlier one (PostgreSQL;
    from review). Whichever comes first, the other sees it: the claim skips the rows the
    retry locked, and the retry, finding a later row locked, is refused as busy."""
    backend, factory = sessions
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: neither can come in between")
    first, second = _one_conversation(factory, 2)
    with unit_of_work(factory) as session:
        session.execute(update(OutboxItem).where(OutboxItem.id == first).values(state="failed"))
        session.execute(update(OutboxItem).where(OutboxItem.id == second).values(state="retry"))
    operator, worker = factory(), factory()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            if first_in == "retry":
                admin.retry_delivery(operator, delivery_id=first, actor="operator:test")
                operator.flush()
                claiming = pool.submit(
                    outbox.claim_due, worker, now=utc_now(), lease=LEASE, limit=8, owner="w"
                )
                claims = claiming.result(timeout=10)  # the later row, locked, is skipped
                worker.commit()
                operator.commit()
                assert [claim.outbox_id for claim in claims] == []
                with unit_of_work(factory) as session:  # then in order: the earlier one only
                    claims = outbox.claim_due(
                        session, now=utc_now(), lease=LEASE, limit=8, owner="w"
                    )
                assert [claim.outbox_id for claim in claims] == [first]
            else:
                claims = outbox.claim_due(worker, now=utc_now(), lease=LEASE, limit=8, owner="w")
                assert [claim.outbox_id for claim in claims] == [second]
                retrying = pool.submit(
                    admin.retry_delivery, operator, delivery_id=first, actor="operator:test"
                )
                # Not waited for (a settlement locks the earlier rows after its own: waiting
                # made a deadlock, from review): busy, to be asked again.
                with pytest.raises(Conflict, match="ask again") as refused:
                    retrying.result(timeout=10)
                assert refused.value.code == "delivery_busy"
                operator.rollback()
                worker.commit()
                with pytest.raises(Conflict, match="out of order") as overtaken:
                    with unit_of_work(factory) as session:  # asked again: the claim is seen
                        admin.retry_delivery(session, delivery_id=first, actor="operator:test")
                assert overtaken.value.code == "overtaken"
                assert _state(factory, first)[0] == outbox.FAILED
    finally:
        operator.close()
        worker.close()


def test_a_retry_never_waits_on_a_settlement_of_a_later_message(
    sessions: tuple[str, sessionmaker[Session]],
) -> None:
    """A settlement locks its own row, then the request's earlier rows whose move it may
    undo; a retry that waited on the later row made a cycle: PostgreSQL's deadlock error for
    one of them (from review). The retry is refused as busy; the settlement goes on."""
    backend, factory = sessions
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: neither can come in between")
    first, second = _one_conversation(factory, 2)
    now = utc_now()
    with unit_of_work(factory) as session:  # the earlier one failed, its move kept
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == first)
            .values(state="failed", move_kept_at=now, moved_from="queued", moved_to="sent")
        )
        session.execute(update(OutboxItem).where(OutboxItem.id == second).values(state="retry"))
    worker, operator = factory(), factory()
    try:
        (claim,) = outbox.claim_due(worker, now=utc_now(), lease=LEASE, limit=8, owner="w")
        assert claim.outbox_id == second
        # As settle_batch takes them: its own row first ...
        item = worker.get(OutboxItem, second, with_for_update=True, populate_existing=True)
        assert item is not None
        message = worker.get(Message, item.message_id)
        assert message is not None
        with pytest.raises(Conflict, match="ask again"):
            admin.retry_delivery(operator, delivery_id=first, actor="operator:test")
        operator.rollback()
        item.state = outbox.FAILED
        # ... then the earlier rows whose moves it undoes: nothing of the retry's in the way.
        moves.undo_if_lost(worker, item, message, now=utc_now(), why="failed")
        worker.commit()
    finally:
        worker.close()
        operator.close()

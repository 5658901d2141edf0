"""Every table. Only routing metadata is in clear; content lives in sealed envelope parts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import NO_DATE, NO_TIME, UnreadableValue

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _checked(
    parse: Callable[[object], Any], column: str | None, why: str
) -> Callable[[object], Any]:
    """`parse`, raising for a stored value it cannot read UnreadableValue, which names the
    column and never the value: SQLite keeps any text in a time or date column, and such a
    value is damage to that column (from review: it was the parser's bare ValueError, a 500
    `internal_error` whose log line quoted the value)."""

    def read(value: object) -> Any:
        try:
            return parse(value)
        except (ValueError, TypeError, OverflowError):
            raise UnreadableValue(column, why) from None  # its text quotes the value

    return read


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True
    # "table.column", set once every table is defined (`_name_time_columns`).
    column: str | None = None

    def result_processor(
        self, dialect: Dialect, coltype: object
    ) -> Callable[[object], datetime | None] | None:
        parse = super().result_processor(dialect, coltype)
        if parse is None:  # not so: `process_result_value` is one
            return None
        return _checked(parse, self.column, NO_TIME)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused: store UTC-aware times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class CheckedDate(TypeDecorator[date]):
    """A calendar date, read as `UTCDateTime` is: a stored value that is no date is damage
    named by its column."""

    impl = Date
    cache_ok = True
    column: str | None = None  # as UTCDateTime's

    def result_processor(
        self, dialect: Dialect, coltype: object
    ) -> Callable[[object], date | None] | None:
        parse = super().result_processor(dialect, coltype)
        return None if parse is None else _checked(parse, self.column, NO_DATE)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Peer(Base):
    """A pinned peer node: its identity document and the keys it published."""

    __tablename__ = "peers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    authority_id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    public_url: Mapped[str] = mapped_column(String(500))
    fingerprint: Mapped[str] = mapped_column(String(64))
    signing_kid: Mapped[str] = mapped_column(String(32))
    signing_key: Mapped[bytes] = mapped_column(LargeBinary)
    encryption_kid: Mapped[str] = mapped_column(String(32))
    encryption_key: Mapped[bytes] = mapped_column(LargeBinary)
    log_kid: Mapped[str] = mapped_column(String(32))
    log_key: Mapped[bytes] = mapped_column(LargeBinary)
    identity_document: Mapped[bytes] = mapped_column(LargeBinary)
    identity_signature: Mapped[bytes] = mapped_column(LargeBinary)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # SHA-256 of the DER client certificate this peer presents on our P2P API (mutual TLS).
    tls_client_cert_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Set while the operator has suspended exchanges with this peer (a compromised node with
    # no new keys yet, relations broken off): nothing is accepted from it or sent to it, and
    # its pin and key history stay, for what was exchanged before.
    suspended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    suspended_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # Set when our operator accepted a restore of this peer's log (`peers accept-restore`):
    # its new checkpoints must be proven to extend one witnessed before, a witnessed
    # checkpoint with an id up to this one; cleared once one is (app/audit/witness.py).
    witness_anchor_max_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # When this peer first signed a streamed part's PUT (protocol.md §8.5): from then on its
    # parts are taken only signed. Unset, it runs a release from before those signatures.
    part_signatures_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApiClient(Base):
    """A system or person allowed to call the local API. Only a hash of the token is kept."""

    __tablename__ = "api_clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    roles: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class IdempotencyKey(Base):
    """A case system's `Idempotency-Key` on a submission, and the answer it got: the same key
    again (a retry after a timeout) gets that answer, and nothing is sent twice
    (app/requests/idempotency.py). Kept for IDEMPOTENCY_DAYS."""

    __tablename__ = "idempotency_keys"

    client_id: Mapped[int] = mapped_column(ForeignKey("api_clients.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    # SHA-256 of the call (route and body): the key again with another call is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class CaseFile(Base):
    """One cooperation request and its conversation of sealed messages, as this node sees it."""

    __tablename__ = "requests"

    # The conversation id: the first envelope's msg_id, the same on both nodes.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    direction: Mapped[str] = mapped_column(String(8), index=True)  # outbound | inbound
    peer_authority: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    urgency: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Deadlines (app/requests/deadlines.py), routing metadata like the status they follow:
    # the requested date, each stage's limit, the end of a postponement, and the deadline
    # the request is working towards in its current state.
    requested_date: Mapped[date | None] = mapped_column(CheckedDate, nullable=True)
    acknowledge_by: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    decide_by: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    execute_by: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    postponed_until: Mapped[date | None] = mapped_column(CheckedDate, nullable=True)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    # Need-to-know (app/requests/access.py): the handling the requesting authority asked for,
    # and whether only the officers named in request_officers may see the request here.
    handling: Mapped[str] = mapped_column(String(16), server_default="standard")
    restricted: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # The msg_id of the latest question (additional_information_request) this node sent: an
    # answer must follow it (app/requests/conversation.py), not an earlier one it crossed.
    question_msg_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class RequestOfficer(Base):
    """An officer (an API client) named to see a restricted request on this node."""

    __tablename__ = "request_officers"
    __table_args__ = (UniqueConstraint("request_id", "client_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"))
    client_name: Mapped[str] = mapped_column(String(100))
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    assigned_by: Mapped[str] = mapped_column(String(140))


class Message(Base):
    """One sealed envelope, sent or received: header, signature and routing metadata."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(32), unique=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), index=True)
    direction: Mapped[str] = mapped_column(String(8))
    sender_authority: Mapped[str] = mapped_column(String(40))
    recipient_authority: Mapped[str] = mapped_column(String(40))
    in_reply_to: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    header: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    envelope_hash: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)


class Part(Base):
    """A sealed part's ciphertext (part 0 is the inner manifest)."""

    __tablename__ = "parts"
    __table_args__ = (UniqueConstraint("message_id", "part_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    part_index: Mapped[int] = mapped_column(Integer)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)


class Receipt(Base):
    """A signed receipt: issued by us (inbound message) or received from the peer (outbound)."""

    __tablename__ = "receipts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), unique=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    signer_kid: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The outbox rows waiting for their turn (queued, or backing off after a failed attempt), as
# the claim's partial index and the claim itself both write it, by dialect: a query uses a
# partial index only where its own condition is this one, word for word
# (app/delivery/outbox.py). SQLite's planner, which has no statistics on a node's database,
# would rather read every waiting row through the index on state and sort them; the unary +
# keeps that index out of it (SQLite's documented way), so the claim reads this one and stops.
OUTBOX_WAITING = {
    "postgresql": "state IN ('queued', 'retry')",
    "sqlite": "+state IN ('queued', 'retry')",
}


class OutboxItem(Base):
    """Delivery of one outbound message; written in the same transaction as the message."""

    __tablename__ = "outbox"
    __table_args__ = (
        # A request's deliveries in the order they were queued: the claim holds a message
        # back while an earlier one of its request is pending (app/delivery/outbox.py).
        Index("ix_outbox_request_id_id", "request_id", "id"),
        # The claim's order over the rows waiting their turn alone: a scan, most pressing
        # first, that stops at a round's limit however long the backlog or the history.
        # Partial, `WHERE OUTBOX_WAITING[dialect]`, as migration a3c9e71d5b20 creates it (and
        # tests/test_outbox.py checks): the condition is not declared here, as declaring a
        # dialect's condition loads that dialect into every process (3 MiB of PostgreSQL's
        # on a SQLite node), and only the migrations create the schema.
        Index("ix_outbox_claim_order", "priority", "next_attempt_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), unique=True)
    # The message's request, copied here so that the claim's order check reads one index.
    request_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    peer_authority: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Copied from the message and its request when queued (neither ever changes), so that
    # the claim orders and budgets its rows without joining them: 0 emergency, 1 urgent,
    # 2 routine (app/delivery/outbox.py, `priority_of`), and the envelope's sealed size.
    # Server defaults for a process of an earlier release, which queues without them while
    # an upgrade is under way (migration c4e8b2d61f37): routine, and budgeted as empty.
    priority: Mapped[int] = mapped_column(SmallInteger, server_default=text("2"))
    size_bytes: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Give up (state failed) after this: sooner for urgent and emergency requests.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    # Which worker holds the lease, so a stopping worker releases exactly its own rows.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The local API request id that queued this delivery, carried to the peer and back.
    trace_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The move this message made to its request when it was sent (app/requests/moves.py):
    # the status before and after, and what a postponement or a question replaced. Put back
    # if the message is lost for good, so that this node does not stay where the peer never
    # went. None for a message that moved nothing (a note, a status query, the request).
    moved_from: Mapped[str | None] = mapped_column(String(32), nullable=True)
    moved_to: Mapped[str | None] = mapped_column(String(32), nullable=True)
    postponed_before: Mapped[date | None] = mapped_column(CheckedDate, nullable=True)
    question_before: Mapped[str | None] = mapped_column(String(32), nullable=True)
    move_undone_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Lost too, but a message after it held its move then: undone once those are lost.
    move_kept_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DeliveryAttempt(Base):
    """One try at delivering an outbox row: when, by which worker, and how it ended."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class DeliveryCounter(Base):
    """A running total kept by settlement, in the attempt's own transaction, for /metrics:
    `attempts:<outcome>` (attempts recorded, by outcome) and `delivered` (rows delivered).
    Counting them in the history at every scrape grew with it; attempts are never deleted
    and delivered is a final state, so a total never goes down."""

    __tablename__ = "delivery_counters"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class AuditEntry(Base):
    """One audit event: a leaf of the node's Merkle log (app/audit). Never holds content."""

    __tablename__ = "audit_entries"

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(140))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    msg_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    peer: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # The exact leaf bytes (canonical JSON of every field above plus details): what the
    # Merkle tree commits to; the columns are only for queries.
    entry: Mapped[bytes] = mapped_column(LargeBinary)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary)
    # Keyed BLAKE2b of `entry` under a key derived from the log key (app/audit/mac.py): what
    # protects an entry no checkpoint signs yet. NULL: appended before MACs (docs/audit.md §4).
    mac: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class AuditIndex(Base):
    """The auditor's filters over the log, filled in batches behind the appends (app/audit).

    Not indexing `audit_entries` itself keeps an append to one row and one index; this table
    indexes a batch of entries at a time. With `idx` second in each index, an index hands over
    its matches already in order, newest first from the cursor backwards.
    """

    __tablename__ = "audit_index"
    __table_args__ = (
        Index("ix_audit_index_recorded_at_idx", "recorded_at", "idx"),
        Index("ix_audit_index_actor_idx", "actor", "idx"),
        Index("ix_audit_index_action_idx", "action", "idx"),
        Index("ix_audit_index_request_id_idx", "request_id", "idx"),
        Index("ix_audit_index_peer_idx", "peer", "idx"),
        Index("ix_audit_index_outcome_idx", "outcome", "idx"),
    )

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(140))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    peer: Mapped[str | None] = mapped_column(String(40), nullable=True)


class AuditHead(Base):
    """The log's current size and compact range, so an append never re-reads old leaves.

    A single row: locking it serialises appends, which is what keeps indexes contiguous.
    """

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)
    compact_range: Mapped[bytes] = mapped_column(LargeBinary)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary)
    last_leaf_hash: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    last_checkpoint_size: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditNode(Base):
    """A large perfect subtree's hash, stored as the log grows (app/audit/log.STORED_LEVEL).

    With these, inclusion and consistency proofs need O(log² n) lookups and a few short
    reads of leaf hashes, never a leaf scan.
    """

    __tablename__ = "audit_nodes"

    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class AuditCheckpoint(Base):
    """A signed checkpoint (C2SP tlog-checkpoint note) of this node's own log."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, index=True)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary)
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WitnessedCheckpoint(Base):
    """A checkpoint a peer showed us (in a receipt), checked and cosigned by this node."""

    __tablename__ = "witnessed_checkpoints"
    __table_args__ = (
        UniqueConstraint("peer_authority", "size", "root_hash"),
        # The rows set aside, read by every witness check (app/audit/witnessed.py): a few,
        # among a peer's checkpoints of every minute.
        Index(
            "ix_witnessed_checkpoints_peer_authority_set_aside_at",
            "peer_authority",
            "set_aside_at",
        ),
        # A peer's newest row, read by every witness check: mostly its largest (a size
        # rewritten lower on it is then read, not passed over).
        Index("ix_witnessed_checkpoints_peer_authority_id", "peer_authority", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_authority: Mapped[str] = mapped_column(String(40), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary)
    note: Mapped[str] = mapped_column(Text)
    cosignature: Mapped[str | None] = mapped_column(Text, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set when our operator accepted that the peer's log was restored from a backup
    # (`entraide peers accept-restore`): no longer what its new checkpoints are checked
    # against. Kept, with its cosignature, as what the peer showed then.
    set_aside_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WitnessAlarm(Base):
    """Evidence that a peer showed two histories that cannot both be true."""

    __tablename__ = "witness_alarms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_authority: Mapped[str] = mapped_column(String(40), index=True)
    reason: Mapped[str] = mapped_column(String(500))
    known_note: Mapped[str] = mapped_column(Text)
    new_note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Closed by our operator, saying why (a restore its operator told them of, out of band).
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolution: Mapped[str | None] = mapped_column(String(500), nullable=True)


class PeerKey(Base):
    """Every signing and encryption key a peer has published, current or superseded.

    Stored envelopes and receipts stay verifiable after a peer rotates its keys: they are
    checked against the key that was pinned when they were received, not the current one.
    """

    __tablename__ = "peer_keys"
    __table_args__ = (UniqueConstraint("peer_authority", "purpose", "kid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_authority: Mapped[str] = mapped_column(String(40), index=True)
    purpose: Mapped[str] = mapped_column(String(16))  # signing | encryption
    kid: Mapped[str] = mapped_column(String(32))
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    pinned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When a signed rotation replaced it; None while it is the current key.
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When an operator replaced it as compromised (`entraide peers replace-key`): from then
    # on it verifies nothing new, only what was received under it before.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AuthThrottle(Base):
    """Refusal counters per source address or API client, shared by every node process.

    `key` is `address:<ip>`, `client:<id>` or `peer-refresh:<authority>`. Once `failures`
    in the current window reach the limit the key is blocked until `blocked_until`; further
    refusals are only counted (`suppressed`), never audited one by one.
    """

    __tablename__ = "auth_throttle"

    key: Mapped[str] = mapped_column(String(120), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    failures: Mapped[int] = mapped_column(Integer)
    blocked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    suppressed: Mapped[int] = mapped_column(Integer)


class WorkerHeartbeat(Base):
    """A running delivery worker, whatever process runs it (app/delivery/heartbeat.py)."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Until when this row vouches for the worker (its own period, on the database's clock).
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class EvidenceDraft(Base):
    """A request, or a message of one, being prepared with large evidence (app/evidence):
    attachments are streamed into the blob store, encrypted as they arrive, before the
    envelope is sealed.

    The message id, the content key and each attachment's stream header are fixed here, at
    creation. The content key is stored sealed to this node's own encryption key
    (`key_wrap`, for `key_kid`), and the document and attachment names only encrypted under
    it (`sealed_content`): a copy of the database reveals no more than it does of a sealed
    envelope.
    """

    __tablename__ = "evidence_drafts"
    # A client's open drafts, counted at each creation (their number is bounded per client,
    # app/evidence/drafts.py), among all the submitted ones that stay.
    __table_args__ = (Index("ix_evidence_drafts_created_by_state", "created_by", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the envelope's msg_id
    # The request a reply answers; null for a draft that opens a request (whose id is then
    # the request's).
    request_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    peer_authority: Mapped[str] = mapped_column(String(40))
    created_by: Mapped[str] = mapped_column(String(120))
    state: Mapped[str] = mapped_column(String(12))  # open | submitted
    key_kid: Mapped[str] = mapped_column(String(32))
    key_wrap: Mapped[bytes] = mapped_column(LargeBinary)
    sealed_content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EvidenceUpload(Base):
    """One attachment of a draft: declared size, stream header, and once complete its blob."""

    __tablename__ = "evidence_uploads"
    __table_args__ = (UniqueConstraint("draft_id", "part_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    draft_id: Mapped[str] = mapped_column(ForeignKey("evidence_drafts.id"), index=True)
    part_index: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    stream_header: Mapped[bytes] = mapped_column(LargeBinary)
    digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    length: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The plaintext's SHA-256 once complete, sealed (app/evidence/drafts.py `seal_sha256`):
    # in clear it would let a copy of the database confirm which known file was sent.
    sealed_sha256: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Only uploads completed before migration b5d2e8f31a47, of drafts open then: erased at
    # their submission or discard. Never set now.
    plaintext_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class BlobPart(Base):
    """A sealed part kept in the blob store instead of a `parts` row; `digest` names the blob
    (the part's ciphertext SHA-256, as the signed header lists it)."""

    __tablename__ = "blob_parts"
    __table_args__ = (UniqueConstraint("message_id", "part_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    part_index: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    length: Mapped[int] = mapped_column(BigInteger)


class InboundTransfer(Base):
    """An envelope announced by a peer whose large parts are still arriving.

    Its header passed the receiver's checks and its manifest opened; parts arrive in order,
    each checked while it streams in. `parts_done` counts the parts, from 1, that are
    complete and checked. Once all are, the envelope is accepted and the receipt issued.
    """

    __tablename__ = "inbound_transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(32), unique=True)
    sender_authority: Mapped[str] = mapped_column(String(40))
    envelope_hash: Mapped[str] = mapped_column(String(64))
    header: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    manifest_part: Mapped[bytes] = mapped_column(LargeBinary)
    parts_done: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


def _name_time_columns(metadata: MetaData) -> None:
    """Each time or date column's type names its column (`UTCDateTime.column`): a mapped
    column has a type of its own, so the name goes with every read of it (labelled, in a
    join). A type shared by two columns names neither."""
    columns: dict[int, list[tuple[UTCDateTime | CheckedDate, str]]] = {}
    for table in metadata.tables.values():
        for column in table.c:
            if isinstance(column.type, UTCDateTime | CheckedDate):
                named = (column.type, f"{table.name}.{column.name}")
                columns.setdefault(id(column.type), []).append(named)
    for uses in columns.values():
        if len(uses) == 1:
            type_, name = uses[0]
            type_.column = name


_name_time_columns(Base.metadata)

"""Several envelopes in one peer call (docs/protocol.md section 8.6).

Each envelope of a batch goes through exactly the checks of a single post (section 9, in
`accept_envelope`) and gets its own answer; what a batch changes is only the transport: one
HTTP exchange and one transaction (so one commit, one fsync) for up to `MAX_BATCH_ENVELOPES`
envelopes. Each envelope is accepted inside a savepoint, so a refused one leaves nothing
behind, and the accepted ones commit together before any receipt is sent: a receipt is never
sent for an envelope that is not durably stored.

Lock order. The batch's audit entries are appended once, at the end of its transaction, so
the audit head is the last lock it takes, as for a single post (whose entries are its last
writes): taking the head first and the conversations' rows after would deadlock against
single posts on PostgreSQL. Refusals are audited after the transaction, in one of their own,
as a single post's are, so they are kept whatever becomes of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.log import Event, deferred_entries, record_alone, record_many
from app.crypto import envelope as env
from app.db import unit_of_work
from app.errors import EnvelopeRefused, StoredEnvelopeCorrupt
from app.models import Peer
from app.node import Node
from app.obs.logs import accept_request_id, current_request_id, request_context
from app.p2p.refusals import audit_refusals
from app.p2p.service import accept_envelope
from app.peers.client import MAX_BATCH_ENVELOPES
from app.peers.keys import peer_signing_key, refresh_peer_keys

log = logging.getLogger(__name__)

# Past this many refusals in one batch the rest are not checked (429, retryable): a hostile
# batch costs the receiver no more than a few single posts before the throttle.
MAX_REFUSED_PER_BATCH = 8
# Identity documents fetched for one batch at most (a peer's rotated signing key).
MAX_REFRESHES_PER_BATCH = 2


@dataclass(frozen=True)
class ItemAnswer:
    """One envelope's answer: the status and body a single post would have had."""

    status: int
    body: dict[str, object]

    def to_wire(self) -> dict[str, object]:
        return {"status": self.status, **self.body}


@dataclass(frozen=True)
class Batch:
    envelopes: list[object]
    # Each envelope's request id at its sender (X-Request-Id of a single post), for the logs.
    request_ids: list[str | None]


def parse_batch(body: object) -> Batch:
    """The batch's envelopes, still unchecked; refuses a body that is not a batch at all."""
    if (
        not isinstance(body, dict)
        or not {"v", "envelopes"} <= set(body) <= {"v", "envelopes", "request_ids"}
        or type(body["v"]) is not int
        or body["v"] != 1
        or not isinstance(body["envelopes"], list)
        or not body["envelopes"]
    ):
        raise EnvelopeRefused(
            "malformed_batch", 'the body is not {"v": 1, "envelopes": [envelope, ...]}'
        )
    envelopes: list[object] = body["envelopes"]
    if len(envelopes) > MAX_BATCH_ENVELOPES:
        raise EnvelopeRefused(
            "too_many_envelopes",
            f"a batch holds at most {MAX_BATCH_ENVELOPES} envelopes",
            status_code=413,
        )
    ids = body.get("request_ids", [None] * len(envelopes))
    if (
        not isinstance(ids, list)
        or len(ids) != len(envelopes)
        or not all(value is None or isinstance(value, str) for value in ids)
    ):
        raise EnvelopeRefused(
            "malformed_batch", "request_ids must be one string or null per envelope"
        )
    # As for the X-Request-Id header: a malformed id is replaced, never logged as given.
    request_ids = [None if value is None else accept_request_id(value) for value in ids]
    return Batch(envelopes, request_ids)


def _claimed_header(node: Node, wire: object) -> env.Header | None:
    """The header as claimed, past section 9's size and shape checks, not yet verified."""
    settings = node.settings
    try:
        envelope = env.decode_wire(
            wire, max_parts=settings.max_envelope_parts, max_header_bytes=settings.max_header_bytes
        )
        if len(envelope.header) > settings.max_header_bytes:
            return None
        return env.parse_header(envelope.header, len(envelope.parts))
    except env.EnvelopeError:
        return None


def refresh_unknown_signers(node: Node, wires: list[object]) -> None:
    """Follow the key rotation of pinned senders whose signing key this node does not know.

    A single post does this in the middle of its checks (ending its transaction for the
    fetch); a batch does it first, outside its transaction, so that an envelope signed with
    a peer's new key neither holds the batch's locks during a fetch nor fails for want of it.
    """
    headers = [header for wire in wires if (header := _claimed_header(node, wire)) is not None]
    if not headers:
        return
    stale: set[str] = set()
    with unit_of_work(node.sessions) as session:
        peers = {
            peer.authority_id: peer
            for peer in session.scalars(
                select(Peer).where(Peer.authority_id.in_({h.from_authority for h in headers}))
            )
        }
        for header in headers:
            peer = peers.get(header.from_authority)
            if (
                peer is None
                or peer.suspended_at is not None
                or header.from_sig_kid == peer.signing_kid
            ):
                continue
            if peer_signing_key(session, peer, header.from_sig_kid, signed_at=header.created_at):
                continue
            stale.add(peer.authority_id)
    for authority in sorted(stale)[:MAX_REFRESHES_PER_BATCH]:
        refresh_peer_keys(node, authority)


def _admit(session: Session, node: Node, wire: object, entries: list[Event]) -> ItemAnswer:
    kept = len(entries)
    try:
        with session.begin_nested():
            accepted = accept_envelope(session, node, wire=wire, may_refresh=False)
    except (EnvelopeRefused, StoredEnvelopeCorrupt):
        del entries[kept:]  # rolled back with the savepoint: nothing of it happened
        raise
    return ItemAnswer(201 if accepted.created else 200, dict(accepted.receipt.to_wire()))


def _accept_one(session: Session, node: Node, wire: object, entries: list[Event]) -> ItemAnswer:
    try:
        return _admit(session, node, wire, entries)
    except IntegrityError:
        # Another transaction stored the same envelope first (PostgreSQL, parallel retries):
        # the savepoint is gone, and a second look finds the stored copy and its receipt.
        return _admit(session, node, wire, entries)


def _refused(refusal: EnvelopeRefused) -> ItemAnswer:
    return ItemAnswer(refusal.status_code, {"error": refusal.code, "detail": refusal.detail})


def accept_batch(node: Node, batch: Batch, *, source: str) -> list[ItemAnswer]:
    """Every envelope's answer, in order, once the accepted ones are committed."""
    wires = batch.envelopes
    refresh_unknown_signers(node, wires)
    answers: list[ItemAnswer] = []
    refusals: list[tuple[object, EnvelopeRefused]] = []
    corrupt: list[StoredEnvelopeCorrupt] = []
    try:
        with unit_of_work(node.sessions) as session:
            with deferred_entries(session) as entries:
                for wire in wires:
                    if len(refusals) >= MAX_REFUSED_PER_BATCH:
                        answers.append(
                            ItemAnswer(
                                429,
                                {
                                    "error": "rate_limited",
                                    "detail": "too many envelopes of this batch were refused",
                                },
                            )
                        )
                        continue
                    try:
                        answers.append(_accept_one(session, node, wire, entries))
                    except EnvelopeRefused as refusal:
                        refusals.append((wire, refusal))
                        answers.append(_refused(refusal))
                    except StoredEnvelopeCorrupt as damage:
                        # Ours to mend, not the sender's: this one answered 500 (retried
                        # later), the rest of the batch goes on.
                        corrupt.append(damage)
                        answers.append(
                            ItemAnswer(500, {"error": damage.code, "detail": damage.detail})
                        )
            record_many(session, entries)
    finally:
        if refusals:
            audit_refusals(node, refusals, source=source)
        for found in corrupt:
            log.error("%s", found.detail)
            try:
                if found.audit is not None:
                    record_alone(node.sessions, **found.audit)
            except Exception as failure:  # the batch's answers still go out; the log line stays
                log.error("could not audit a corrupt stored receipt (%s)", type(failure).__name__)
    _log_answers(batch, answers)
    return answers


def _log_answers(batch: Batch, answers: list[ItemAnswer]) -> None:
    """One line per envelope under its sender's request id, as a single post's access line,
    so one request can still be followed across both nodes' logs."""
    count = len(answers)
    for number, (request_id, answer) in enumerate(
        zip(batch.request_ids, answers, strict=True), start=1
    ):
        with request_context(request_id or current_request_id()):
            log.info(
                "envelope %s of %s in a batch: %s %s",
                number,
                count,
                answer.status,
                answer.body.get("error", "accepted" if answer.status == 201 else "repeat"),
            )

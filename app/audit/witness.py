"""Peers as witnesses: check each peer's checkpoints for consistency, and cosign them.

Every receipt carries the receiver's latest signed checkpoint. The sender keeps the
checkpoints each peer has shown it; when a new one arrives it fetches a consistency proof
between the largest it knows and the new one, from the peer itself. A proof that does not
verify, or two different roots for one size, mean the peer has shown two histories: that is
recorded as an alarm (an entry in our own log, a row, a metric). Consistent checkpoints are
cosigned (C2SP tlog-cosignature, Ed25519 cosignature/v1), and the peer can fetch the
cosignature back to show others that a witness saw the same history.

The cosignature is made with the node's log key. The message starts with the fixed line
`cosignature/v1`, which no checkpoint of ours can start with (our origin line is
`entraide.log/...`), so the two uses cannot be confused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import httpx
from nacl.signing import SigningKey
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.audit.checkpoints import log_origin, log_verifier
from app.audit.cosignature import cosign, witness_name
from app.audit.log import record
from app.audit.merkle import verify_consistency
from app.audit.note import Checkpoint, NoteError, open_note, signed_only_by
from app.audit.witnessed import (
    MAX_SIZE,
    Stored,
    WitnessedDamaged,
    describe,
    largest_known,
    read,
    read_checked,
)
from app.auth.throttle import counter_row
from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.errors import BadRequest, NotFound, PeerError, StoredDataCorrupt
from app.models import AuthThrottle, Peer, WitnessAlarm, WitnessedCheckpoint
from app.oneline import is_one_line
from app.peers.client import CONSISTENCY_PATH, read_json_bounded

log = logging.getLogger(__name__)

WITNESS_ATTEMPTS = 3  # checks of one note when other workers witness the same peer meanwhile
# A peer that answers no consistency proof for this long, while it shows new checkpoints: alarm.
UNPROVEN_ALARM_AFTER = timedelta(hours=24)

ProofFetcher = Callable[[int, int], list[bytes]]


class WitnessError(Exception):
    """A peer's checkpoint could not be checked now (malformed, or no proof obtained)."""


@dataclass(frozen=True)
class Observed:
    checkpoint: Checkpoint
    note: str


def parse_peer_checkpoint(peer: Peer, note: str) -> Observed:
    verifier = log_verifier(peer.authority_id, peer.log_key)
    try:
        text, _ = open_note(note, [verifier])
        checkpoint = Checkpoint.parse(text)
        note = signed_only_by(note, verifier)  # what we keep, and cosign
    except NoteError as exc:
        raise WitnessError(f"checkpoint from {peer.authority_id} does not verify: {exc}") from exc
    if checkpoint.origin != log_origin(peer.authority_id):
        raise WitnessError(f"checkpoint from {peer.authority_id} names log {checkpoint.origin}")
    if checkpoint.size > MAX_SIZE:
        # No log grows so large; stored, such a size reads as damage of ours and holds the
        # peer's witnessing for good, so the peer could fork unseen (from review).
        raise WitnessError(
            f"checkpoint from {peer.authority_id} claims {checkpoint.size} entries, past the "
            f"{MAX_SIZE} a witnessed checkpoint may have"
        )
    return Observed(checkpoint, note)


def _alarm(session: Session, peer: Peer, reason: str, known: str, new: str) -> WitnessAlarm:
    alarm = WitnessAlarm(
        peer_authority=peer.authority_id,
        reason=reason[:500],
        known_note=known,
        new_note=new,
        created_at=utc_now(),
    )
    session.add(alarm)
    record(
        session,
        actor="node",
        action="witness.alarm",
        outcome="inconsistent",
        peer=peer.authority_id,
        details={"reason": reason},
    )
    log.error("split view: %s showed an inconsistent checkpoint: %s", peer.authority_id, reason)
    return alarm


def check_consistency(known: Stored | None, observed: Observed, fetch: ProofFetcher) -> str | None:
    """None if `observed` is consistent with what we know; otherwise the reason. Pure but for
    `fetch`, which asks the peer for a consistency proof between two sizes."""
    if known is None:
        return None
    new = observed.checkpoint
    if new.size == known.size:
        return None if new.root_hash == known.root_hash else f"two roots for size {new.size}"
    small_size, small_root, large_size, large_root = (
        (known.size, known.root_hash, new.size, new.root_hash)
        if known.size < new.size
        else (new.size, new.root_hash, known.size, known.root_hash)
    )
    proof = fetch(small_size, large_size)
    if verify_consistency(small_size, large_size, small_root, large_root, proof):
        return None
    return f"no valid consistency proof from size {small_size} to {large_size}"


class KnownMoved(Exception):
    """Another worker witnessed a checkpoint of this peer meanwhile: check again against it."""


def observe(
    session: Session,
    *,
    peer: Peer,
    observed: Observed,
    reason: str | None,
    checked_against: Stored | None,
    own_authority: str,
    log_key: SigningKey,
    reference: Stored | None = None,
    anchor: Stored | None = None,
) -> bool:
    """Store the outcome of `check_consistency` against `checked_against`: an alarm (False),
    or a cosigned checkpoint (True).

    The check ran outside any transaction (it may fetch a proof from the peer), so two
    workers may each have checked a different checkpoint against the same one. The peer's
    row is locked here and the largest known read again: if it moved, `KnownMoved`, and the
    caller checks again, so that two histories are never both cosigned. WitnessedDamaged if
    a row read here is damaged (app/audit/witnessed.py).
    """
    session.scalar(select(Peer.id).where(Peer.id == peer.id).with_for_update())
    known = largest_known(session, peer.authority_id)
    if checked_against is not None and _set_aside_since(session, checked_against):
        # An operator accepted a restore of the peer's log meanwhile: the history checked
        # against is no longer the one to hold the peer to. Check again.
        raise KnownMoved
    reference = reference or checked_against
    if reason is not None:  # about the note it was checked against, whatever moved since
        against = reference.note if reference else ""
        _alarm(session, peer, reason, against, observed.note)
        return False
    if (known.id if known else None) != (checked_against.id if checked_against else None):
        raise KnownMoved
    if anchor is not None:
        # The restored log proven to extend this checkpoint of before: taken up again, and
        # the peer's witnessing anchored to what was witnessed before its restore.
        session.execute(
            update(WitnessedCheckpoint)
            .where(WitnessedCheckpoint.id == anchor.id)
            .values(set_aside_at=None)
        )
        session.execute(update(Peer).where(Peer.id == peer.id).values(witness_anchor_max_id=None))
    checkpoint = observed.checkpoint
    same_size = read_checked(
        session,
        peer.authority_id,
        (WitnessedCheckpoint.size == checkpoint.size)
        & (WitnessedCheckpoint.root_hash != checkpoint.root_hash)
        & WitnessedCheckpoint.set_aside_at.is_(None),
    )
    if same_size:
        reason = f"two roots for size {checkpoint.size}"
        _alarm(session, peer, reason, same_size[0].note, observed.note)
        return False
    existing = read_checked(
        session,
        peer.authority_id,
        (WitnessedCheckpoint.size == checkpoint.size)
        & (WitnessedCheckpoint.root_hash == checkpoint.root_hash),
    )
    if existing:
        # One set aside at a restore and shown again: the restored log's own past (the
        # backup's checkpoint), consistent with what it shows now. Taken up again.
        session.execute(
            update(WitnessedCheckpoint)
            .where(WitnessedCheckpoint.id == existing[0].id)
            .values(set_aside_at=None)
        )
        return True
    witnessed = WitnessedCheckpoint(
        peer_authority=peer.authority_id,
        size=checkpoint.size,
        root_hash=checkpoint.root_hash,
        note=observed.note,
        cosignature=cosign(
            checkpoint.format(),
            name=witness_name(own_authority),
            key=log_key,
            timestamp=int(time.time()),
        ),
        received_at=utc_now(),
    )
    session.add(witnessed)
    record(
        session,
        actor="node",
        action="witness.cosigned",
        peer=peer.authority_id,
        details={"size": checkpoint.size, "root": checkpoint.root_hash.hex()},
    )
    session.flush()
    return True


def fetch_consistency_proof(
    http: httpx.Client, base_url: str, first: int, second: int
) -> list[bytes]:
    url = f"{base_url}{CONSISTENCY_PATH}?first={first}&second={second}"
    try:
        with http.stream("GET", url) as response:
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


def witness_receipt_checkpoint(
    sessions: sessionmaker[Session],
    http: httpx.Client,
    *,
    authority: str,
    note: str,
    own_authority: str,
    log_key: SigningKey,
) -> bool:
    """Check the checkpoint a peer's receipt carried against what it showed us before.

    Runs outside the delivery's transaction: it may call the peer for a proof. True when the
    note is now a witnessed checkpoint of ours (consistent, stored, cosigned): the caller may
    skip that same note when the next receipt repeats it.
    """
    for _ in range(WITNESS_ATTEMPTS):
        try:
            with unit_of_work(sessions) as session:
                peer = session.scalar(select(Peer).where(Peer.authority_id == authority))
                if peer is None:
                    return False
                known = largest_known(session, authority)
                if known is not None and known.note == note:
                    _resume(session, authority)  # the check below has nothing to do
        except WitnessedDamaged as exc:
            _hold(sessions, exc)
            return False
        if known is not None and known.note == note:
            # The very note we checked and cosigned already (receipts repeat the receiver's
            # latest checkpoint until it signs a new one): checking again would change nothing.
            return True
        try:
            observed = parse_peer_checkpoint(peer, note)
        except WitnessError as exc:
            _unverifiable(sessions, peer, known, note, str(exc))
            return False
        _verifiable_again(sessions, authority)
        fetch = partial(fetch_consistency_proof, http, peer.public_url)
        reference: Stored | None = known
        anchor: Stored | None = None
        try:
            reason = check_consistency(known, observed, fetch)
            if reason is None and peer.witness_anchor_max_id is not None:
                anchor, reason = _after_restore(
                    sessions, peer, peer.witness_anchor_max_id, observed, fetch
                )
                if reason is not None:
                    reference = anchor
        except WitnessError as exc:
            log.warning("could not witness %s's checkpoint: %s", authority, exc)
            _proof_refused(sessions, peer, known, observed)
            return False
        try:
            with unit_of_work(sessions) as session:
                witnessed = observe(
                    session,
                    peer=peer,
                    observed=observed,
                    reason=reason,
                    checked_against=known,
                    own_authority=own_authority,
                    log_key=log_key,
                    reference=reference,
                    anchor=anchor if reason is None else None,
                )
                _resume(session, authority)
        except KnownMoved:
            continue
        except IntegrityError:
            return True  # another worker stored the same checkpoint first
        except WitnessedDamaged as exc:  # damaged since the first read
            _hold(sessions, exc)
            return False
        if witnessed and reason is None and known is not None:
            _proof_given(sessions, authority)
        return witnessed
    log.warning("could not witness %s's checkpoint: other workers kept witnessing", authority)
    return False


@dataclass(frozen=True)
class Rebased:
    set_aside: int  # witnessed checkpoints no longer checked against
    largest: tuple[int, str] | None  # (size, root) of the largest of them
    alarms_resolved: int
    anchor_required: bool


def accept_restored_log(
    session: Session, *, authority: str, reason: str, actor: str, require_anchor: bool = True
) -> Rebased:
    """The peer's operator told ours, out of band, that its node was restored from a backup:
    its log went back to the backup's checkpoint and grew again from there, and every
    checkpoint it signs now contradicts what we witnessed since (a split view, as a fork
    would). What we witnessed is set aside (kept, as what the peer showed then) and the
    alarms it raised are closed with the reason. Its new checkpoints must then be proven to
    extend one witnessed before (`_after_restore`); `require_anchor=False` takes the next as
    a new start (a backup older than all we witnessed, or a log started again from empty):
    the operator's explicit choice, on record. Either way in `witness.rebased`."""
    reason = reason.strip()
    if not reason or len(reason) > 500 or not is_one_line(reason):
        raise BadRequest(
            "say in one line of at most 500 characters, without control characters, how the "
            "peer's operator told you of the restore",
            code="invalid_reason",
        )
    peer = session.scalar(select(Peer).where(Peer.authority_id == authority).with_for_update())
    if peer is None:
        raise NotFound(f"{authority} is not a pinned peer", code="unknown_peer")
    try:
        largest = largest_known(session, authority)
    except WitnessedDamaged:  # set aside with the rest; doctor names it
        largest = None
    newest = session.scalar(
        select(func.max(WitnessedCheckpoint.id)).where(
            WitnessedCheckpoint.peer_authority == authority
        )
    )
    peer.witness_anchor_max_id = newest if require_anchor else None
    now = utc_now()
    set_aside = session.execute(
        update(WitnessedCheckpoint)
        .where(
            WitnessedCheckpoint.peer_authority == authority,
            WitnessedCheckpoint.set_aside_at.is_(None),
        )
        .values(set_aside_at=now)
        .returning(WitnessedCheckpoint.id)
    ).all()
    resolved = session.execute(
        update(WitnessAlarm)
        .where(WitnessAlarm.peer_authority == authority, WitnessAlarm.resolved_at.is_(None))
        .values(resolved_at=now, resolution=reason)
        .returning(WitnessAlarm.id)
    ).all()
    session.execute(delete(AuthThrottle).where(AuthThrottle.key == _unproven_key(authority)))
    rebased = Rebased(
        set_aside=len(set_aside),
        largest=None if largest is None else (largest.size, largest.root_hash.hex()),
        alarms_resolved=len(resolved),
        anchor_required=peer.witness_anchor_max_id is not None,
    )
    record(
        session,
        actor=actor,
        action="witness.rebased",
        peer=authority,
        details={
            "reason": reason,
            "set_aside": rebased.set_aside,
            "largest_size": rebased.largest[0] if rebased.largest else None,
            "largest_root": rebased.largest[1] if rebased.largest else None,
            "alarms_resolved": rebased.alarms_resolved,
            "anchor_required": rebased.anchor_required,
        },
    )
    return rebased


def _set_aside_since(session: Session, checked_against: Stored) -> bool:
    """Was `checked_against` (a live row: largest_known reads no other) set aside since?"""
    now = session.scalar(
        select(WitnessedCheckpoint.id).where(
            WitnessedCheckpoint.id == checked_against.id,
            WitnessedCheckpoint.set_aside_at.is_not(None),
        )
    )
    return now is not None


def _after_restore(
    sessions: sessionmaker[Session],
    peer: Peer,
    anchor_max_id: int,
    observed: Observed,
    fetch: ProofFetcher,
) -> tuple[Stored | None, str | None]:
    """A checkpoint of a log whose restore an operator accepted, not yet anchored: the
    restored log is its backup's and grew from there, so it must extend a checkpoint
    witnessed before (one no larger than the backup), and extends none above the backup.
    The largest it extends is found by bisection (a proof per step); none: an alarm. A log
    still smaller than every one of them is witnessed, and checked again as it grows, until
    one is proven its past (from review: taken as a new start, it let a rewritten log in).
    A damaged one is no candidate: set aside, as the others, by the operator who accepted
    the restore (doctor names it)."""
    size = observed.checkpoint.size
    with unit_of_work(sessions) as session:
        rows = read(
            session,
            (WitnessedCheckpoint.peer_authority == peer.authority_id)
            & (WitnessedCheckpoint.id <= anchor_max_id)
            & (WitnessedCheckpoint.size <= size),
            WitnessedCheckpoint.size,
            WitnessedCheckpoint.id,
        )
    candidates = [row for row in rows if isinstance(row, Stored)]
    if not candidates:
        return None, None
    low, high, found = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if check_consistency(candidates[middle], observed, fetch) is None:
            found, low = candidates[middle], middle + 1
        else:
            high = middle - 1
    if found is not None:
        return found, None
    return candidates[0], (
        f"after its restore was accepted, its log extends none of the checkpoints witnessed "
        f"before (the smallest of size {candidates[0].size})"
    )


def _held_key(authority: str) -> str:
    return f"witness-held:{authority}"


def _hold(sessions: sessionmaker[Session], damaged: WitnessedDamaged) -> None:
    """Rows a check of the peer's checkpoints reads are damaged (app/audit/witnessed.py):
    nothing is checked against anything else, cosigned, or alarmed against the peer (the
    damage is ours) until they read again or are set aside. Said once for a run of them
    (recorded and logged), not at every receipt: from review, a TypeError was logged at
    every round, and nothing else said so."""
    authority = damaged.authority
    with unit_of_work(sessions) as session:
        if session.get(AuthThrottle, _held_key(authority)) is not None:
            return
        row = counter_row(session, _held_key(authority), utc_now())
        if row.suppressed:  # another worker said so meanwhile
            return
        row.suppressed = 1
        record(
            session,
            actor="node",
            action="witness.held",
            outcome=StoredDataCorrupt.code,
            peer=authority,
            details={"rows": [item.id for item in damaged.rows], "columns": damaged.columns},
        )
    log.error(
        "witnessing of %s held: witnessed checkpoint %s cannot be read, or is not what its "
        "note says (stored value damaged): none of its checkpoints is checked, cosigned or "
        "alarmed until the row is put back from a backup or set aside; deliveries go on; "
        "run `entraide doctor` (docs/operations.md §8)",
        authority,
        describe(damaged.rows),
    )


def _resume(session: Session, authority: str) -> None:
    """A check of the peer's checkpoints ran to its end (the rows it read were put back, or
    set aside): a hold is over. One primary-key read per check."""
    if session.get(AuthThrottle, _held_key(authority)) is None:
        return
    session.execute(delete(AuthThrottle).where(AuthThrottle.key == _held_key(authority)))
    record(session, actor="node", action="witness.resumed", peer=authority)
    log.warning("witnessing of %s resumes: the witnessed checkpoints it reads are sound", authority)


def _unverifiable_key(authority: str) -> str:
    return f"witness-unverifiable:{authority}"


def _unverifiable(
    sessions: sessionmaker[Session],
    peer: Peer,
    known: Stored | None,
    note: str,
    reason: str,
) -> None:
    """A receipt the peer signed carries a checkpoint its pinned log key did not sign (or
    no checkpoint of its log): its log key was replaced, or its node shows us a log that is
    not the one it committed to. Only logged before, while a witness exists for exactly
    this (from review: a swapped log key passed every other check). One alarm for a run of
    them, until a checkpoint verifies again."""
    with unit_of_work(sessions) as session:
        row = counter_row(session, _unverifiable_key(peer.authority_id), utc_now())
        row.failures += 1
        if row.suppressed:
            log.warning("could not witness %s's checkpoint: %s", peer.authority_id, reason)
            return
        row.suppressed = 1
        _alarm(session, peer, reason, known.note if known else "", note)


def _verifiable_again(sessions: sessionmaker[Session], authority: str) -> None:
    """Ends a run of unverifiable checkpoints (one DELETE per new checkpoint witnessed)."""
    _end_run(sessions, _unverifiable_key(authority))


def _unproven_key(authority: str) -> str:
    return f"witness-unproven:{authority}"


def _proof_refused(
    sessions: sessionmaker[Session],
    peer: Peer,
    known: Stored | None,
    observed: Observed,
) -> None:
    """A peer that keeps showing checkpoints but gives no proof that they extend what it
    showed before may be hiding a second history behind its errors. Each failure is counted
    (shared by every worker); after UNPROVEN_ALARM_AFTER of them with no proof in between,
    one alarm, until a proof comes."""
    now = utc_now()
    with unit_of_work(sessions) as session:
        row = counter_row(session, _unproven_key(peer.authority_id), now)
        if row.failures == 0:
            row.window_start = now
        row.failures += 1
        if now - row.window_start < UNPROVEN_ALARM_AFTER or row.suppressed:
            return
        row.suppressed = 1  # alarmed for this run of failures
        hours = int((now - row.window_start).total_seconds() // 3600)
        reason = (
            f"no consistency proof for {hours} hours ({row.failures} attempts): "
            "its newer checkpoints cannot be shown to extend what it showed before"
        )
        _alarm(session, peer, reason, known.note if known else "", observed.note)


def _proof_given(sessions: sessionmaker[Session], authority: str) -> None:
    _end_run(sessions, _unproven_key(authority))


def _end_run(sessions: sessionmaker[Session], key: str) -> None:
    """A run of failures counted under `key` is over: its next failure alarms again."""
    with unit_of_work(sessions) as session:
        session.execute(delete(AuthThrottle).where(AuthThrottle.key == key))

"""Witnessing a peer's log with several delivery workers: two workers that each check a
different checkpoint against the same one must never both cosign (a review found they did:
two roots for one size, both cosigned, no alarm). SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.checkpoints import log_origin
from app.audit.mac import append_with
from app.audit.merkle import consistency_proof_from_leaves, leaf_hash, root_from_leaf_hashes
from app.audit.note import Checkpoint, sign_note
from app.audit.witness import accept_restored_log, witness_receipt_checkpoint
from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.errors import NotFound
from app.models import AuditEntry, AuthThrottle, Peer, WitnessAlarm, WitnessedCheckpoint
from tests.conftest import Databases

PEER = "AR/MPF"
COMMON = [leaf_hash(f"entry {n}".encode()) for n in range(10)]
SHOWN_TO_A = COMMON + [leaf_hash(f"entry {n}".encode()) for n in range(10, 20)]
SHOWN_TO_B = COMMON + [leaf_hash(f"rewritten {n}".encode()) for n in range(10, 20)]


def _peer(keys: NodeKeys) -> Peer:
    now = utc_now()
    return Peer(
        authority_id=PEER,
        name="Ministerio Público Fiscal",
        public_url="http://ar.invalid",
        fingerprint="0" * 64,
        signing_kid="0" * 32,
        signing_key=keys.signing_public,
        encryption_kid="1" * 32,
        encryption_key=keys.encryption_public,
        log_kid="2" * 32,
        log_key=keys.log_public,
        identity_document=b"{}",
        identity_signature=b"",
        added_at=now,
        updated_at=now,
    )


def _note(keys: NodeKeys, leaves: list[bytes]) -> str:
    origin = log_origin(PEER)
    text = Checkpoint(origin=origin, size=len(leaves), root_hash=root_from_leaf_hashes(leaves))
    return sign_note(text.format(), origin, keys.log)


def _peer_answering(leaves: list[bytes], before: Callable[[], None]) -> httpx.Client:
    """The peer's consistency proofs over `leaves`; `before` runs as the first one is asked."""
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        if not calls:
            calls.append(request)
            before()
        first = int(request.url.params["first"])
        second = int(request.url.params["second"])
        proof = consistency_proof_from_leaves(first, leaves[:second])
        return httpx.Response(200, json={"proof": [digest.hex() for digest in proof]})

    return httpx.Client(transport=httpx.MockTransport(handle))


@dataclass(frozen=True)
class Witnessing:
    """Our node's database, with the peer pinned, and its keys and ours."""

    sessions: sessionmaker[Session]
    peer_keys: NodeKeys
    own_keys: NodeKeys

    def witness(self, http: httpx.Client, leaves: list[bytes]) -> bool:
        """What a delivery worker does with a receipt carrying the peer's checkpoint of
        `leaves`, asking the peer at `http` for proofs."""
        return witness_receipt_checkpoint(
            self.sessions,
            http,
            authority=PEER,
            note=_note(self.peer_keys, leaves),
            own_authority="ES/MJ",
            log_key=self.own_keys.log,
        )


@pytest.fixture
def witnessing(databases: Databases) -> Iterator[Witnessing]:
    url = databases.new("witness", migrated=True)
    engine = make_engine(url)
    own_keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), own_keys.log)
    peer_keys = NodeKeys.generate()
    with unit_of_work(sessions) as session:
        session.add(_peer(peer_keys))
    yield Witnessing(sessions, peer_keys, own_keys)
    engine.dispose()


def test_two_workers_never_cosign_two_histories(witnessing: Witnessing) -> None:
    sessions, witness = witnessing.sessions, witnessing.witness
    nobody = httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(500)))
    assert witness(nobody, COMMON)  # the first checkpoint needs no proof
    # Worker B checks a rewritten history of size 20 against size 10 while worker A
    # witnesses the real one: B's proof is valid for what B was shown.
    worker_a = _peer_answering(SHOWN_TO_A, lambda: None)
    worker_b = _peer_answering(SHOWN_TO_B, lambda: witness(worker_a, SHOWN_TO_A))
    assert not witness(worker_b, SHOWN_TO_B)
    with unit_of_work(sessions) as session:
        cosigned = session.execute(
            select(WitnessedCheckpoint.size, WitnessedCheckpoint.root_hash).order_by(
                WitnessedCheckpoint.size
            )
        ).all()
        alarms = list(session.scalars(select(WitnessAlarm.reason)))
    assert [tuple(row) for row in cosigned] == [
        (10, root_from_leaf_hashes(COMMON)),
        (20, root_from_leaf_hashes(SHOWN_TO_A)),
    ]
    assert alarms == ["two roots for size 20"]


def test_a_peer_that_never_proves_its_checkpoints_raises_one_alarm(witnessing: Witnessing) -> None:
    """Refusing every consistency proof (a fork hidden behind 503s) was only logged: after a
    day of it, with new checkpoints all along, one alarm; a proof ends the run."""
    sessions, witness = witnessing.sessions, witnessing.witness

    def alarms() -> list[str]:
        with unit_of_work(sessions) as session:
            return list(session.scalars(select(WitnessAlarm.reason)))

    refusing = httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(503)))
    assert witness(refusing, COMMON)  # the first checkpoint needs no proof
    for size in (12, 14):
        assert not witness(refusing, SHOWN_TO_A[:size])
    assert alarms() == []  # an outage is not a fork
    with unit_of_work(sessions) as session:  # a day on, still no proof
        row = session.get(AuthThrottle, f"witness-unproven:{PEER}")
        assert row is not None
        assert row.failures == 2
        row.window_start -= timedelta(hours=25)
    assert not witness(refusing, SHOWN_TO_A[:16])
    assert not witness(refusing, SHOWN_TO_A[:18])
    (reason,) = alarms()  # once for the run, not once per checkpoint
    assert reason.startswith("no consistency proof for 25 hours (3 attempts)")
    assert witness(_peer_answering(SHOWN_TO_A, lambda: None), SHOWN_TO_A)
    with unit_of_work(sessions) as session:
        assert session.get(AuthThrottle, f"witness-unproven:{PEER}") is None


def test_a_restore_its_operator_told_of_is_accepted_and_witnessed_afresh(
    witnessing: Witnessing,
) -> None:
    """From a recovery review: a peer restored from a backup shows a log that went back to
    the backup's checkpoint and grew again differently, and every checkpoint it signed then
    raised an alarm here, for ever (no command closed one). Once its operator has told ours
    out of band, `accept_restored_log` sets what we witnessed aside (kept, with the reason
    on record) and its next checkpoints are witnessed again, without an alarm."""
    sessions, witness = witnessing.sessions, witnessing.witness
    backup = COMMON  # the restored node's log up to the backup's checkpoint
    before = SHOWN_TO_A  # what it had grown to before it was lost
    after = COMMON + [leaf_hash(f"after the restore {n}".encode()) for n in range(12)]
    assert witness(_peer_answering(before, lambda: None), backup)
    assert witness(_peer_answering(before, lambda: None), before)
    restored = _peer_answering(after, lambda: None)
    assert not witness(restored, after)  # size 22 does not extend size 20: an alarm
    with unit_of_work(sessions) as session:
        assert len(list(session.scalars(select(WitnessAlarm)))) == 1
        rebased = accept_restored_log(
            session,
            authority=PEER,
            reason="AR/MPF restored from its backup of 2026-11-28 (phone, J. Pérez)",
            actor="operator:test",
        )
    assert (rebased.set_aside, rebased.alarms_resolved) == (2, 1)
    assert rebased.largest == (20, root_from_leaf_hashes(before).hex())
    # The backup's own checkpoint is taken up again, then the restored log goes on.
    assert witness(restored, backup)
    assert witness(restored, after[:16])
    assert witness(restored, after)
    with unit_of_work(sessions) as session:
        (alarm,) = session.scalars(select(WitnessAlarm))
        assert alarm.resolved_at is not None
        assert alarm.resolution is not None
        assert "phone" in alarm.resolution
        live = session.execute(
            select(WitnessedCheckpoint.size)
            .where(WitnessedCheckpoint.set_aside_at.is_(None))
            .order_by(WitnessedCheckpoint.size)
        ).scalars()
        assert list(live) == [10, 16, 22]
        entries = session.scalars(
            select(AuditEntry.entry).where(AuditEntry.action == "witness.rebased")
        ).all()
    assert len(entries) == 1
    # Nothing to accept for a peer that is not pinned.
    with unit_of_work(sessions) as session, pytest.raises(NotFound):
        accept_restored_log(session, authority="XX/NONE", reason="x", actor="operator:test")


def test_after_an_accepted_restore_a_log_that_extends_nothing_witnessed_is_an_alarm(
    witnessing: Witnessing,
) -> None:
    """From review: once a restore was accepted, the next checkpoint was taken as a new start
    whatever it held; a log rewritten from its first entry too, even one shown small first
    and grown later. The restored log must extend a checkpoint witnessed before."""
    sessions, witness = witnessing.sessions, witnessing.witness
    assert witness(_peer_answering(SHOWN_TO_A, lambda: None), COMMON)
    assert witness(_peer_answering(SHOWN_TO_A, lambda: None), SHOWN_TO_A)
    with unit_of_work(sessions) as session:
        accept_restored_log(session, authority=PEER, reason="told", actor="operator:test")
    rewritten = [leaf_hash(f"forged {n}".encode()) for n in range(40)]
    forger = _peer_answering(rewritten, lambda: None)
    assert witness(forger, rewritten[:3])  # smaller than all witnessed before: not yet known
    assert not witness(forger, rewritten)  # grown past them, it extends none: an alarm
    with unit_of_work(sessions) as session:
        (alarm,) = session.scalars(select(WitnessAlarm))
        assert alarm.resolved_at is None
        assert alarm.reason.startswith("after its restore was accepted, its log extends none")


def test_a_restored_log_shown_past_many_lost_checkpoints_finds_its_backup_by_bisection(
    witnessing: Witnessing,
) -> None:
    """From review: only the five largest earlier checkpoints were tried, all from the lost
    history once the restored log had grown past them: alarms for ever."""
    sessions, witness = witnessing.sessions, witnessing.witness
    lost = SHOWN_TO_A
    old = _peer_answering(lost, lambda: None)
    for size in (10, 12, 14, 16, 18, 20):  # the backup was taken at 14
        assert witness(old, lost[:size])
    restored_log = lost[:14] + [leaf_hash(f"after {n}".encode()) for n in range(10)]
    with unit_of_work(sessions) as session:
        accept_restored_log(session, authority=PEER, reason="told", actor="operator:test")
    restored = _peer_answering(restored_log, lambda: None)
    assert witness(restored, restored_log[:22])
    assert witness(restored, restored_log)
    with unit_of_work(sessions) as session:
        assert list(session.scalars(select(WitnessAlarm))) == []
        live = session.scalars(
            select(WitnessedCheckpoint.size)
            .where(WitnessedCheckpoint.set_aside_at.is_(None))
            .order_by(WitnessedCheckpoint.size)
        )
        assert list(live) == [14, 22, 24]  # the backup's checkpoint, taken up again


def test_a_restore_older_than_all_witnessed_can_be_accepted_without_an_anchor(
    witnessing: Witnessing,
) -> None:
    """From review: a peer restored from a backup older than every checkpoint witnessed (or
    started again from empty) extends none of them, and accepting its restore again changed
    nothing: alarms for ever. Its operator's word can be taken without an anchor, on record."""
    sessions, witness = witnessing.sessions, witnessing.witness
    assert witness(_peer_answering(SHOWN_TO_A, lambda: None), SHOWN_TO_A)
    with unit_of_work(sessions) as session:
        accept_restored_log(session, authority=PEER, reason="told", actor="operator:test")
    afresh = [leaf_hash(f"started again {n}".encode()) for n in range(30)]
    assert not witness(_peer_answering(afresh, lambda: None), afresh)  # an alarm
    with unit_of_work(sessions) as session:
        rebased = accept_restored_log(
            session,
            authority=PEER,
            reason="its log started again from empty (phone, J. Pérez)",
            actor="operator:test",
            require_anchor=False,
        )
    assert (rebased.alarms_resolved, rebased.anchor_required) == (1, False)
    assert witness(_peer_answering(afresh, lambda: None), afresh)
    with unit_of_work(sessions) as session:
        assert all(alarm.resolved_at for alarm in session.scalars(select(WitnessAlarm)))


def test_a_checkpoint_not_signed_by_the_pinned_log_key_raises_one_alarm(
    witnessing: Witnessing,
) -> None:
    """From review: a peer whose log key was swapped (its old checkpoints deleted, its log
    rewritten) showed checkpoints its pinned log key never signed, in receipts it did sign;
    that was only a warning in our log file. Now an alarm, once for a run of them."""
    sessions = witnessing.sessions
    nobody = httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(500)))
    assert witnessing.witness(nobody, COMMON)
    swapped = NodeKeys.generate()

    def shown(leaves: list[bytes]) -> bool:
        return witness_receipt_checkpoint(
            sessions,
            nobody,
            authority=PEER,
            note=_note(swapped, leaves),
            own_authority="ES/MJ",
            log_key=witnessing.own_keys.log,
        )

    assert not shown(SHOWN_TO_B[:12])
    assert not shown(SHOWN_TO_B[:14])
    with unit_of_work(sessions) as session:
        (alarm,) = session.scalars(select(WitnessAlarm))
        assert "does not verify" in alarm.reason
        assert alarm.new_note == _note(swapped, SHOWN_TO_B[:12])
        entries = session.scalars(
            select(AuditEntry.action).where(AuditEntry.action == "witness.alarm")
        ).all()
        assert entries == ["witness.alarm"]
    # A checkpoint of the pinned key ends the run: a later swap is an alarm again.
    assert witnessing.witness(_peer_answering(SHOWN_TO_A, lambda: None), SHOWN_TO_A[:12])
    assert not shown(SHOWN_TO_B[:16])
    with unit_of_work(sessions) as session:
        assert len(session.scalars(select(WitnessAlarm)).all()) == 2


def test_an_older_checkpoint_shown_late_is_what_a_restore_is_proven_to_extend(
    witnessing: Witnessing,
) -> None:
    """A receipt settled after a newer one's carries an older checkpoint: stored, it is what
    the peer's log, restored from a backup taken between the two, is proven to extend. Left
    unstored (tried, from a review of that change), the restored log extended nothing
    witnessed and raised a split-view alarm against an honest peer."""
    sessions, witness = witnessing.sessions, witnessing.witness
    lost = SHOWN_TO_A + [leaf_hash(f"more {n}".encode()) for n in range(20)]  # 40 leaves
    before = _peer_answering(lost, lambda: None)
    assert witness(before, lost[:30])
    assert witness(before, lost[:20])  # the older receipt, settled after
    backup = lost[:25]
    restored_log = backup + [leaf_hash(f"after {n}".encode()) for n in range(15)]
    with unit_of_work(sessions) as session:
        accept_restored_log(session, authority=PEER, reason="told by phone", actor="admin:test")
    restored = _peer_answering(restored_log, lambda: None)

    assert witness(restored, restored_log[:27])
    assert witness(restored, restored_log[:35])

    with unit_of_work(sessions) as session:
        assert list(session.scalars(select(WitnessAlarm.reason))) == []

"""The stored log: appends keep a correct compact range, and proofs served from the stored
subtree hashes verify against signed checkpoints (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.audit.checkpoints import checkpoint_due, log_verifier, sign_checkpoint
from app.audit.log import record
from app.audit.merkle import root_from_leaf_hashes, verify_consistency, verify_inclusion
from app.audit.note import Checkpoint, open_note
from app.audit.service import prove_consistency, prove_inclusion
from app.crypto.encoding import utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.migrate import upgrade
from app.models import AuditEntry, AuditHead
from tests.conftest import Databases

SIZES = [1, 2, 3, 5, 8, 13, 21, 37]


def test_proofs_from_stored_nodes_verify_against_signed_checkpoints(databases: Databases) -> None:
    url = databases.new("proofs")
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    keys = NodeKeys.generate()
    notes: dict[int, str] = {}
    try:
        with unit_of_work(sessions) as session:
            for number in range(1, SIZES[-1] + 1):
                record(session, actor="node", action="test.event", details={"n": number})
                if number in SIZES:
                    notes[number] = sign_checkpoint(
                        session, authority_id="ES/MJ", log_key=keys.log
                    ).note
        with unit_of_work(sessions) as session:
            leaves = list(session.scalars(select(AuditEntry.leaf_hash).order_by(AuditEntry.idx)))
            head = session.get(AuditHead, 1)
            assert head is not None
            assert head.root_hash == root_from_leaf_hashes(leaves)
            roots = {}
            for size, note in notes.items():
                text, _ = open_note(note, [log_verifier("ES/MJ", keys.log_public)])
                checkpoint = Checkpoint.parse(text)
                assert checkpoint.size == size
                assert checkpoint.root_hash == root_from_leaf_hashes(leaves[:size])
                roots[size] = checkpoint.root_hash
            for size in SIZES:
                for index in range(size):
                    proof = prove_inclusion(session, index=index, size=size)
                    hashes = [bytes.fromhex(item) for item in proof["proof"]]
                    assert verify_inclusion(leaves[index], index, size, hashes, roots[size])
            for old in SIZES:
                for new in SIZES:
                    if old <= new:
                        proof = prove_consistency(session, first=old, second=new)
                        hashes = [bytes.fromhex(item) for item in proof["proof"]]
                        assert verify_consistency(old, new, roots[old], roots[new], hashes)
    finally:
        engine.dispose()


def test_checkpoint_schedule_rule() -> None:
    head = AuditHead(id=1, size=10, last_checkpoint_size=10)
    assert checkpoint_due(head, None, every=5, seconds=60)  # never signed: sign the first
    head.size = 14
    assert not checkpoint_due(head, utc_now(), every=5, seconds=60)
    head.size = 15
    assert checkpoint_due(head, utc_now(), every=5, seconds=60)
    head.size = 11
    assert checkpoint_due(head, utc_now() - timedelta(seconds=61), every=5, seconds=60)
    head.size = 10
    assert not checkpoint_due(head, utc_now() - timedelta(days=1), every=5, seconds=60)

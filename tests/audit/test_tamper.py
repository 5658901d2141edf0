"""Tampering with a stored audit log, in many random ways, is always caught and located.

Each case alters the database the way an insider with SQL access could (change a field,
delete an entry, insert one, reorder two, truncate the tail, replace a checkpoint's
signature), runs the verifier inside the same transaction, and rolls back. The verifier must
fail and name the first bad entry. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.anchor import RECORD_FILE, SignedLogAnchor
from app.audit.checkpoints import sign_checkpoint
from app.audit.index import index_entries
from app.audit.log import read_head, record
from app.audit.mac import append_with
from app.audit.merkle import leaf_hash
from app.audit.service import verify_database
from app.crypto.encoding import canonical_json
from app.crypto.keys import NodeIdentity, NodeKeys, save_identity, save_keys
from app.db import make_engine, make_session_factory, unit_of_work
from app.migrate import ROOT
from app.models import AuditCheckpoint, AuditEntry, AuditIndex
from tests.conftest import Databases

AUTHORITY = "ES/MJ"
ENTRIES = 64
CHECKPOINT_EVERY = 16
CASES_PER_BACKEND = 120


@dataclass
class Log:
    url: str
    keys: NodeKeys
    sessions: sessionmaker[Session]


@pytest.fixture
def log(databases: Databases) -> Iterator[Log]:
    url = databases.new("audit", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), keys.log)
    actions = ["request.submitted", "envelope.sealed", "delivery.attempt", "request.read"]
    with unit_of_work(sessions) as session:
        for number in range(ENTRIES):
            record(
                session,
                actor=f"client:officer{number % 3}",
                action=actions[number % len(actions)],
                request_id=f"{number:032x}",
                details={"n": number},
            )
            if (number + 1) % CHECKPOINT_EVERY == 0:
                sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
    yield Log(url, keys, sessions)
    engine.dispose()


def _verify(session: Session, keys: NodeKeys) -> tuple[int, str] | None:
    report = verify_database(session, authority_id=AUTHORITY, log_public=keys.log_public)
    first = report.first
    return None if first is None else (first.idx, first.message)


def _entry(session: Session, idx: int) -> AuditEntry:
    entry = session.get(AuditEntry, idx)
    assert entry is not None
    return entry


def change_field(session: Session, rng: random.Random) -> int:
    idx = rng.randrange(ENTRIES)
    fields = json.loads(_entry(session, idx).entry)
    field = rng.choice(["actor", "action", "outcome", "time", "details", "request_id"])
    fields[field] = {"details": {"n": -1}}.get(field, "tampered")
    if field == "time":
        fields[field] = "2001-01-01T00:00:00Z" if idx == 0 else fields["time"][:-2] + "59Z"
    session.execute(
        update(AuditEntry).where(AuditEntry.idx == idx).values(entry=canonical_json(fields))
    )
    return idx


def delete_entry(session: Session, rng: random.Random) -> int:
    idx = rng.randrange(ENTRIES)
    session.execute(delete(AuditEntry).where(AuditEntry.idx == idx))
    return idx


def insert_entry(session: Session, rng: random.Random) -> int:
    """Shift entries up and insert a well-formed forged entry that chains correctly."""
    idx = rng.randrange(1, ENTRIES + 1)
    for position in range(ENTRIES - 1, idx - 1, -1):
        session.execute(
            update(AuditEntry).where(AuditEntry.idx == position).values(idx=position + 1)
        )
    session.flush()
    previous = _entry(session, idx - 1)
    fields = json.loads(previous.entry)
    fields.update(idx=idx, action="peer.added", prev_leaf=leaf_hash(previous.entry).hex())
    forged = canonical_json(fields)
    session.add(
        AuditEntry(
            idx=idx,
            recorded_at=previous.recorded_at,
            actor=previous.actor,
            action="peer.added",
            outcome="ok",
            entry=forged,
            leaf_hash=leaf_hash(forged),
        )
    )
    return idx


def reorder_two(session: Session, rng: random.Random) -> int:
    first, second = sorted(rng.sample(range(ENTRIES), 2))
    a, b = _entry(session, first).entry, _entry(session, second).entry
    session.execute(update(AuditEntry).where(AuditEntry.idx == first).values(entry=b))
    session.execute(update(AuditEntry).where(AuditEntry.idx == second).values(entry=a))
    return first


def truncate_tail(session: Session, rng: random.Random) -> int:
    keep = rng.randrange(1, ENTRIES)
    session.execute(delete(AuditEntry).where(AuditEntry.idx >= keep))
    return keep


def bad_checkpoint_signature(session: Session, rng: random.Random) -> int:
    checkpoints = list(session.scalars(select(AuditCheckpoint)))
    target = rng.choice(checkpoints)
    body, _, signature_line = target.note.rstrip("\n").rpartition("\n")
    name, _, blob = signature_line.rpartition(" ")
    flipped = blob[:10] + ("A" if blob[10] != "A" else "B") + blob[11:]
    target.note = f"{body}\n{name} {flipped}\n"
    return -1  # checkpoint problems come before any entry


TAMPERS: list[Callable[[Session, random.Random], int]] = [
    change_field,
    delete_entry,
    insert_entry,
    reorder_two,
    truncate_tail,
    bad_checkpoint_signature,
]


def test_untampered_log_verifies(log: Log) -> None:
    with unit_of_work(log.sessions) as session:
        assert _verify(session, log.keys) is None


def test_every_random_tampering_is_detected_and_located(log: Log) -> None:
    rng = random.Random(20261127)
    seen: dict[str, int] = {}
    for case in range(CASES_PER_BACKEND):
        tamper = TAMPERS[case % len(TAMPERS)]
        session = log.sessions()
        try:
            expected = tamper(session, rng)
            session.flush()
            found = _verify(session, log.keys)
            assert found is not None, f"{tamper.__name__} (case {case}) went undetected"
            assert found[0] == expected, (tamper.__name__, case, expected, found)
            seen[tamper.__name__] = seen.get(tamper.__name__, 0) + 1
        finally:
            session.rollback()
            session.close()
    assert len(seen) == len(TAMPERS)
    assert sum(seen.values()) >= 100


def test_columns_edited_beside_intact_bytes_are_detected(log: Log) -> None:
    """The signed bytes intact, what queries and proofs read edited: an entry hidden from
    `?request_id=`, filed under another actor, or served with a leaf hash of other bytes."""
    with unit_of_work(log.sessions) as session:
        index_entries(session, start=0, end=ENTRIES)
    edits = {
        5: update(AuditEntry).where(AuditEntry.idx == 5).values(request_id=None),
        7: update(AuditIndex).where(AuditIndex.idx == 7).values(request_id=None),
        9: update(AuditEntry).where(AuditEntry.idx == 9).values(leaf_hash=b"\0" * 32),
        11: update(AuditIndex).where(AuditIndex.idx == 11).values(actor="client:someone"),
        13: delete(AuditIndex).where(AuditIndex.idx == 13),
        ENTRIES + 5: insert(AuditIndex).values(
            idx=ENTRIES + 5,
            recorded_at=datetime.now(UTC),
            actor="client:officer0",
            action="request.read",
            outcome="ok",
        ),
    }
    expected = {
        5: "entry 5: its stored request_id differs from its bytes",
        7: "entry 7: the query index's request_id differs from its bytes",
        9: "entry 9: its stored leaf_hash differs from its bytes",
        11: "entry 11: the query index's actor differs from its bytes",
        13: "entry 13 is missing from the query index",
        ENTRIES + 5: f"the query index holds an entry {ENTRIES + 5} that the log does not",
    }
    for idx, edit in edits.items():
        session = log.sessions()
        try:
            session.execute(edit)
            session.flush()
            assert _verify(session, log.keys) == (idx, expected[idx])
        finally:
            session.rollback()
            session.close()


def test_cli_verify_db_names_the_first_bad_entry(log: Log, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    save_keys(keys_dir, log.keys)
    save_identity(keys_dir, NodeIdentity(AUTHORITY, "Ministerio", "http://127.0.0.1:1"))
    with unit_of_work(log.sessions) as session:  # the node's record of what it signed
        head = read_head(session)
    SignedLogAnchor(keys_dir / RECORD_FILE).reset(head.size, head.root_hash)
    env = {**os.environ, "ENTRAIDE_DATABASE_URL": log.url, "ENTRAIDE_KEYS_DIR": str(keys_dir)}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app", "audit", "verify", "--db"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert f"OK: {ENTRIES} entries" in ok.stdout
    with unit_of_work(log.sessions) as session:
        change_field(session, random.Random(7))
    with unit_of_work(log.sessions) as session:
        expected = _verify(session, log.keys)
    assert expected is not None
    failed = run()
    assert failed.returncode == 1
    assert f"entry {expected[0]}" in failed.stderr

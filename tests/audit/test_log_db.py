"""The stored log: appends keep a correct compact range, entries are canonical JSON, and
proofs served from the stored subtree hashes verify against signed checkpoints (SQLite and
PostgreSQL)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.audit import log as audit_log
from app.audit import service as audit_service
from app.audit.checkpoints import (
    checkpoint_due,
    log_verifier,
    maybe_checkpoint,
    sign_checkpoint,
)
from app.audit.log import STORED_LEVEL, Event, entry_bytes, record, record_many
from app.audit.mac import append_with
from app.audit.merkle import root_from_leaf_hashes, verify_consistency, verify_inclusion
from app.audit.note import Checkpoint, open_note
from app.audit.service import prove_consistency, prove_inclusion, verify_database
from app.audit.verify import Report
from app.crypto.encoding import canonical_json, format_time, utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, read_snapshot, unit_of_work
from app.models import AuditEntry, AuditHead, AuditNode
from tests.conftest import BACKENDS, Databases, make_databases

SIZES = [1, 2, 3, 5, 8, 13, 21, 37]


def test_proofs_from_stored_nodes_verify_against_signed_checkpoints(databases: Databases) -> None:
    url = databases.new("proofs", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), keys.log)
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
            _assert_proofs_verify(session, leaves, roots, lambda size: range(size))
    finally:
        engine.dispose()


def _assert_proofs_verify(
    session: Session,
    leaves: list[bytes],
    roots: dict[int, bytes],
    indexes: Callable[[int], Iterable[int]],
) -> None:
    """Inclusion proofs for `indexes(size)` at every size of `roots`, and consistency proofs
    between every two of them, served by the node, verify against those roots."""
    for size, root in roots.items():
        for index in indexes(size):
            proof = prove_inclusion(session, index=index, size=size)
            hashes = [bytes.fromhex(item) for item in proof["proof"]]
            assert verify_inclusion(leaves[index], index, size, hashes, root)
    for old, old_root in roots.items():
        for new, new_root in roots.items():
            if old <= new:
                proof = prove_consistency(session, first=old, second=new)
                hashes = [bytes.fromhex(item) for item in proof["proof"]]
                assert verify_consistency(old, new, old_root, new_root, hashes)


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


def test_proofs_across_stored_and_recomputed_subtrees(databases: Databases) -> None:
    """Past 2**STORED_LEVEL entries a proof mixes stored subtrees with subtrees hashed again
    from leaf hashes; only the large ones are stored."""
    url = databases.new("large-proofs", migrated=True)
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    sizes = [255, 256, 257, 511, 512, 700, 1023, 1100]
    try:
        with unit_of_work(sessions) as session:
            for number in range(1, sizes[-1] + 1):
                record(session, actor="node", action="test.event", details={"n": number})
        with unit_of_work(sessions) as session:
            leaves = list(session.scalars(select(AuditEntry.leaf_hash).order_by(AuditEntry.idx)))
            levels = set(session.scalars(select(AuditNode.level)))
            assert levels == set(range(STORED_LEVEL, 11))  # 1100 entries: up to 2**10
            roots = {size: root_from_leaf_hashes(leaves[:size]) for size in sizes}
            _assert_proofs_verify(
                session,
                leaves,
                roots,
                lambda size: (
                    {0, 1, 127, 128, 255, size // 2, size - 2, size - 1} & set(range(size))
                ),
            )
    finally:
        engine.dispose()


TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
PLAIN = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), TEXT)


@settings(deadline=None, database=None)  # a busy host (parallel tests) is no failure
@given(
    fields=st.fixed_dictionaries(
        {"actor": TEXT, "idx": st.integers(0, 2**62), "prev_leaf": st.none() | TEXT},
        optional={"peer": st.none() | TEXT},
    ),
    details=st.dictionaries(
        TEXT,
        PLAIN | st.floats(allow_nan=False, allow_infinity=False) | st.lists(PLAIN, max_size=3),
        max_size=4,
    )
    | st.dictionaries(st.integers(), PLAIN, max_size=2)
    | st.dictionaries(TEXT, st.integers(2**64, 2**70), max_size=2),
)
def test_entry_bytes_are_canonical_json(fields: dict[str, Any], details: dict[Any, Any]) -> None:
    document = {**fields, "details": details}
    assert entry_bytes(document) == canonical_json(document)


def test_writers_that_share_a_log_keep_it_contiguous(databases: Databases) -> None:
    """Each process appends on top of the head it last wrote; another writer's appends, or a
    transaction of its own rolled back, make it read the head again, never fork the log."""
    url = databases.new("writers", migrated=True)
    engines = [make_engine(url), make_engine(url)]  # two processes, as to the log
    keys = NodeKeys.generate()
    writers = [append_with(make_session_factory(engine), keys.log) for engine in engines]
    expected = 0
    try:
        for turn in range(12):
            with unit_of_work(writers[turn % 3 % 2]) as session:
                count = 1 + turn % 3
                if turn % 2:  # several at once
                    events = [Event(actor="node", action="test.event")] * count
                    assert record_many(session, events) == list(range(expected, expected + count))
                    expected += count
                for _ in range(count):
                    assert record(session, actor="node", action="test.event") == expected
                    expected += 1
            if turn % 4 == 1:
                session = writers[0]()
                record(session, actor="node", action="test.rolled_back")
                session.rollback()
                session.close()
            if turn % 5 == 2:
                with unit_of_work(writers[1]) as session:
                    sign_checkpoint(session, authority_id="ES/MJ", log_key=keys.log)
        with unit_of_work(writers[0]) as session:
            report = verify_database(session, authority_id="ES/MJ", log_public=keys.log_public)
            assert report.ok, report.first
            assert report.entries == expected
            actions = set(session.scalars(select(AuditEntry.action)))
            assert actions == {"test.event"}
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_verifying_a_live_log_reads_one_snapshot_and_holds_off_no_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """`audit verify --db` on a running node: appends committed while the entries stream
    (PostgreSQL's read committed) once made the head disagree with them, a false FAILED for
    an intact log; on SQLite the check held the writer's lock, and the node could append
    nothing (every request it served waited, then failed) until the check was done. The
    node's append here commits while the check is under way, which verifies what it saw."""
    databases = make_databases(backend, tmp_path)
    url = databases.new("live", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), keys.log)

    def append(count: int) -> None:
        with unit_of_work(sessions) as session:
            for number in range(count):
                record(session, actor="node", action="test.event", details={"n": number})
            sign_checkpoint(session, authority_id="ES/MJ", log_key=keys.log)

    def verify() -> Report:
        with read_snapshot(sessions) as session:
            return verify_database(session, authority_id="ES/MJ", log_public=keys.log_public)

    streamed = audit_service._stored_entries

    def appended_meanwhile(session: Session) -> Iterator[tuple[list[int], list[bytes]]]:
        chunks = streamed(session)
        yield next(chunks)  # the cursor has run: what it returns is fixed
        started = time.monotonic()
        append(5)  # the node, committing while the check goes on
        assert time.monotonic() - started < 10, "the append waited for the check"
        yield from chunks

    try:
        append(20)
        monkeypatch.setattr(audit_service, "_stored_entries", appended_meanwhile)
        report = verify()
        assert report.ok, report.problems
        assert report.entries == 20
        monkeypatch.undo()
        report = verify()
        assert report.ok, report.problems
        assert report.entries == 25
    finally:
        engine.dispose()
        databases.drop_all()


def test_entry_times_never_go_back_when_a_clock_does(
    databases: Databases, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A verifier reports a time going backwards as a fault of the log: a clock stepped back,
    or a replica whose clock lags another's, must not write one. Two writers, as two
    processes sharing the log: one whose clock runs an hour ahead, then one on time."""
    url = databases.new("clock", migrated=True)
    engines = [make_engine(url), make_engine(url)]
    keys = NodeKeys.generate()
    ahead, on_time = (append_with(make_session_factory(engine), keys.log) for engine in engines)
    later = utc_now() + timedelta(hours=1)
    try:
        with unit_of_work(on_time) as session:  # the on-time writer's head is now cached
            record(session, actor="node", action="test.before")
        monkeypatch.setattr(audit_log, "utc_now", lambda: later)
        with unit_of_work(ahead) as session:
            record(session, actor="node", action="test.ahead")
        monkeypatch.undo()
        monkeypatch.setattr(audit_log, "_warned_at", -1e9)  # at most one a minute, per process
        with caplog.at_level(logging.WARNING, logger="app.audit.log"):
            for sessions in (on_time, ahead, on_time):  # another's head, then one's own
                with unit_of_work(sessions) as session:
                    record(session, actor="node", action="test.behind")
        with unit_of_work(on_time) as session:
            report = verify_database(session, authority_id="ES/MJ", log_public=keys.log_public)
            # Nothing out of order; but until the clock catches up, entries dated ahead of it
            # are reported (a forged entry would push every later time ahead the same way).
            assert [problem.message for problem in report.problems] == [
                f"entry {idx} is dated in the future ({format_time(later)})" for idx in range(1, 5)
            ]
            times = [
                json.loads(entry)["time"]
                for entry in session.scalars(select(AuditEntry.entry).order_by(AuditEntry.idx))
            ]
        assert times == sorted(times)
        assert times[1:] == [format_time(later)] * 4  # the latest time, until the clock catches up
        assert "clock is" in caplog.text  # and the operator is told
    finally:
        for engine in engines:
            engine.dispose()


def test_an_altered_head_row_neither_stops_checkpoints_nor_dates_entries_ahead(
    databases: Databases, caplog: pytest.LogCaptureFixture
) -> None:
    """Two numbers of the head row that no signature covers, each of which someone with SQL
    access could change to leave later entries unsigned (rewritable at leisure) or stamped in
    the future: how far checkpoints reach is read from the checkpoints, and the last entry's
    time from the entry (a fresh engine: a process that starts after the change)."""
    url = databases.new("head", migrated=True)
    keys = NodeKeys.generate()
    engine = make_engine(url)
    try:
        with unit_of_work(append_with(make_session_factory(engine), keys.log)) as session:
            for number in range(3):
                record(session, actor="node", action="test.event", details={"n": number})
            sign_checkpoint(session, authority_id="ES/MJ", log_key=keys.log)
            record(session, actor="node", action="test.unsigned")
            session.execute(
                update(AuditHead).values(
                    last_checkpoint_size=10**9, updated_at=datetime(2031, 6, 1, 12, tzinfo=UTC)
                )
            )
    finally:
        engine.dispose()
    engine = make_engine(url)
    try:
        sessions = append_with(make_session_factory(engine), keys.log)
        with caplog.at_level(logging.ERROR, logger="app.audit.log"):
            with unit_of_work(sessions) as session:
                record(session, actor="node", action="test.after")
        assert "head row was altered" in caplog.text
        with unit_of_work(sessions) as session:
            signed = maybe_checkpoint(
                session, authority_id="ES/MJ", log_key=keys.log, every=2, seconds=3600
            )
            assert signed is not None
            assert signed.size == 5
            times = [
                json.loads(entry)["time"]
                for entry in session.scalars(select(AuditEntry.entry).order_by(AuditEntry.idx))
            ]
            assert not any(time.startswith("2031") for time in times)
            report = verify_database(session, authority_id="ES/MJ", log_public=keys.log_public)
            assert report.ok, report.first
    finally:
        engine.dispose()

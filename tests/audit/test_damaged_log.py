"""A log whose stored rows were edited: the node stops appending rather than build on an
edited head (it signed a tree no entries make, or linked the next entry to a leaf that is
not the last one), and the verifier and the auditor's views name the damage instead of
failing with a Python error (from review)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta

import orjson
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.checkpoints import log_origin, sign_checkpoint
from app.audit.log import LogDamaged, read_head, record
from app.audit.mac import append_with, entry_mac, mac_key
from app.audit.merkle import CompactRange, leaf_hash
from app.audit.note import Checkpoint, sign_note
from app.audit.service import (
    EntryFilter,
    entry_view,
    prove_inclusion,
    query_entries,
    verify_database,
)
from app.crypto.encoding import format_time, utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, read_snapshot, unit_of_work
from app.models import AuditCheckpoint, AuditEntry, AuditHead
from tests.conftest import Databases

AUTHORITY = "ES/MJ"
KEYS = NodeKeys.generate()  # the node's: its entries' MACs and its checkpoints
KEY = mac_key(KEYS.log)


@pytest.fixture
def log_url(databases: Databases) -> str:
    url = databases.new("damaged", migrated=True)
    engine = make_engine(url)
    try:
        with unit_of_work(append_with(make_session_factory(engine), KEYS.log)) as session:
            for number in range(5):
                record(session, actor="node", action="test.event", details={"n": number})
    finally:
        engine.dispose()
    return url


@pytest.fixture
def fresh(log_url: str) -> Iterator[sessionmaker[Session]]:
    """A new engine: no head cached in this process, as in a node started after the edit."""
    engine = make_engine(log_url)
    yield append_with(make_session_factory(engine), KEYS.log)
    engine.dispose()


def _edit(log_url: str, **values: object) -> None:
    engine = make_engine(log_url)
    try:
        with unit_of_work(append_with(make_session_factory(engine), KEYS.log)) as session:
            session.execute(update(AuditHead).values(**values))
    finally:
        engine.dispose()


def _entries(factory: sessionmaker[Session]) -> int:
    with unit_of_work(factory) as session:
        return len(session.scalars(select(AuditEntry.idx)).all())


def _problems(factory: sessionmaker[Session]) -> list[str]:
    keys = KEYS  # no checkpoint signed: the log key plays no part here
    with read_snapshot(factory) as session:
        report = verify_database(session, authority_id=AUTHORITY, log_public=keys.log_public)
    return [problem.message for problem in report.problems]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"last_leaf_hash": b"\x11" * 32}, "does not name its last entry"),
        ({"compact_range": b"\x00" * 7}, "does not parse"),
        ({"last_leaf_hash": None}, "does not name its last entry"),
    ],
)
def test_an_edited_head_stops_the_log(
    log_url: str, fresh: sessionmaker[Session], edit: dict[str, object], words: str
) -> None:
    _edit(log_url, **edit)
    with pytest.raises(LogDamaged, match=words), unit_of_work(fresh) as session:
        record(session, actor="node", action="test.event", details={"n": 5})
    assert _entries(fresh) == 5  # nothing appended on top of it
    assert any(words in problem for problem in _problems(fresh))


def test_a_head_whose_tree_is_not_its_root_stops_the_log(
    log_url: str, fresh: sessionmaker[Session]
) -> None:
    with unit_of_work(fresh) as session:
        head = session.get(AuditHead, 1)
        assert head is not None
        compact = bytearray(head.compact_range)
    compact[-1] ^= 1  # one of the right edge's hashes, the size and root left alone
    _edit(log_url, compact_range=bytes(compact))
    with pytest.raises(LogDamaged, match="not its root"), unit_of_work(fresh) as session:
        record(session, actor="node", action="test.event", details={"n": 5})
    assert _entries(fresh) == 5


def test_an_entry_rewritten_as_text_or_with_nan_is_shown_and_verified(
    log_url: str, fresh: sessionmaker[Session], databases: Databases
) -> None:
    if databases.backend == "sqlite":  # SQLite keeps whatever type it is given
        with unit_of_work(fresh) as session:
            session.execute(text("UPDATE audit_entries SET entry = CAST(entry AS TEXT)"))
        assert _problems(fresh) == []  # the same bytes, the same leaves
        with unit_of_work(fresh) as session:  # text hashed as its bytes: a 500 (from review)
            proven = prove_inclusion(session, index=2, size=None)
        assert proven["leaf_hash"] == _shown(fresh)[2]["leaf_hash"]
    with unit_of_work(fresh) as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.idx == 3)).one()
        entry.entry = b'{"idx":3,"x":NaN}'
    shown = _shown(fresh)
    json.dumps(list(shown.values()), allow_nan=False)  # what the auditor's API answers with
    assert shown[3]["malformed"] is True
    assert any("entry 3" in problem for problem in _problems(fresh))


def _shown(factory: sessionmaker[Session], **where: str) -> dict[int, dict[str, object]]:
    """The entries as the auditor's API lists them (app/audit/router.py), by index."""
    with unit_of_work(factory) as session:
        rows, _ = query_entries(session, where=EntryFilter(**where), before=None, limit=100)
        return {entry.idx: entry_view(entry) for entry in rows}


def test_an_entry_rewritten_as_text_that_is_not_utf_8_is_shown_as_it_is(
    fresh: sessionmaker[Session], databases: Databases
) -> None:
    """From review: SQLite's driver cannot read such text, and every page holding the entry
    (every filtered query reading the tail, an inclusion proof of it) failed 500, where
    audit.md says it is shown as it is, so that the rest of the page can be read."""
    if databases.backend != "sqlite":
        pytest.skip("PostgreSQL's bytea column holds bytes only")
    with unit_of_work(fresh) as session:
        session.execute(
            text("UPDATE audit_entries SET entry = CAST(X'7b22ff' AS TEXT) WHERE idx = 3")
        )
    shown = _shown(fresh)
    assert sorted(shown) == [0, 1, 2, 3, 4]
    assert shown[3]["malformed"] is True
    assert shown[3]["entry_base64"] == base64.b64encode(b'{"\xff').decode()
    # Found by its columns, as before, and shown as it is.
    assert _shown(fresh, action="test.event")[3]["malformed"] is True
    with unit_of_work(fresh) as session:
        proven = prove_inclusion(session, index=3, size=None)
    assert proven["leaf_hash"] == shown[3]["leaf_hash"] == leaf_hash(b'{"\xff').hex()
    assert any("entry 3" in problem for problem in _problems(fresh))


def test_entry_times_pushed_ahead_are_named_for_good(
    log_url: str, fresh: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An insider re-dates the log's last (unsigned) entry a month ahead and mends the head
    with public hashing alone: every later entry takes that time (times never go back), and
    the node signs them. The checkpoint says when it was signed, so the verifier names the
    entries even once the forged date has passed (it said nothing then). (Entries now carry
    a MAC, which the node checks before signing, tests/audit/test_entry_macs.py: this
    insider also holds the log key, or it is the upgrade's window, docs/audit.md §4.)"""
    future = format_time(utc_now() + timedelta(days=30))
    with fresh.begin() as session:
        rows = session.execute(text("SELECT idx, entry FROM audit_entries ORDER BY idx")).all()
        idx, data = rows[-1]
        fields = orjson.loads(bytes(data))
        fields["time"] = future
        edited = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
        session.execute(
            update(AuditEntry)
            .where(AuditEntry.idx == idx)
            .values(entry=edited, leaf_hash=leaf_hash(edited), mac=entry_mac(KEY, edited))
        )
        compact = CompactRange()
        for row in [*rows[:-1], (idx, edited)]:
            compact.append(leaf_hash(bytes(row[1])))
        session.execute(
            update(AuditHead).values(
                compact_range=compact.to_bytes(),
                root_hash=compact.root(),
                last_leaf_hash=leaf_hash(edited),
            )
        )
    keys = KEYS
    for number in range(3):
        with unit_of_work(fresh) as session:
            record(session, actor="node", action="test.later", details={"n": number})
    with unit_of_work(fresh) as session:
        sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)

    def problems() -> list[str]:
        with read_snapshot(fresh) as session:
            report = verify_database(session, authority_id=AUTHORITY, log_public=keys.log_public)
        return [problem.message for problem in report.problems]

    assert any("pushed ahead" in problem for problem in problems())
    later = utc_now() + timedelta(days=31)  # the forged date has passed
    monkeypatch.setattr("app.audit.verify.utc_now", lambda: later)
    assert any(f"entry 7 is dated {future}, after checkpoint" in problem for problem in problems())


def test_a_clock_set_right_after_running_fast_is_not_taken_for_pushed_times(
    log_url: str, fresh: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's clock ran an hour fast: entries and a checkpoint carry that time. Set right,
    the entries after it keep the last entry's time until the clock catches up (times never
    go back), and the checkpoint that covers them is signed at the right time: they were
    signed at their time already (by the checkpoint of the fast hour), nothing was pushed."""
    keys = KEYS
    fast = utc_now() + timedelta(hours=1)
    for module in ("app.audit.log", "app.audit.checkpoints"):
        monkeypatch.setattr(f"{module}.utc_now", lambda: fast)
    with unit_of_work(fresh) as session:
        record(session, actor="node", action="test.fast")
        sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
    for module in ("app.audit.log", "app.audit.checkpoints"):
        monkeypatch.setattr(f"{module}.utc_now", utc_now)
    with unit_of_work(fresh) as session:
        record(session, actor="node", action="test.set_right")
        sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
    later = fast + timedelta(minutes=1)  # the verifier's clock: nothing dated in the future
    for module in ("app.audit.verify", "app.audit.service"):
        monkeypatch.setattr(f"{module}.utc_now", lambda: later)
    with read_snapshot(fresh) as session:
        report = verify_database(session, authority_id=AUTHORITY, log_public=keys.log_public)
    assert report.ok, report.problems


@pytest.mark.parametrize("line", ["time 9999-12-31T23:59:59Z", "time 2026-02-30T00:00:00Z"])
def test_a_checkpoint_with_a_time_that_is_no_date_is_checked_without_it(
    log_url: str, fresh: sessionmaker[Session], line: str
) -> None:
    keys = KEYS
    with unit_of_work(fresh) as session:
        head = read_head(session)
        origin = log_origin(AUTHORITY)
        body = Checkpoint(origin, head.size, head.root_hash, extensions=(line,)).format()
        session.add(
            AuditCheckpoint(
                size=head.size,
                root_hash=head.root_hash,
                note=sign_note(body, origin, keys.log),
                created_at=utc_now(),
            )
        )
    with read_snapshot(fresh) as session:
        report = verify_database(session, authority_id=AUTHORITY, log_public=keys.log_public)
    assert report.ok, report.problems

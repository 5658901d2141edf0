"""Entries no checkpoint covers yet are protected by their MAC, under a key only the node holds.

Hash links are hashes anyone can recompute: someone who could write to the database but not
read the keys folder rewrote the newest entries, rebuilt the links after them, and the next
checkpoint signed the forgery; `audit verify --db` said OK. Each entry now carries a keyed
BLAKE2b of its bytes (app/audit/mac.py), written by whichever process appends it, and
checked before a checkpoint signs it and by `audit verify --db` (docs/audit.md §4).

The entries of `entraide worker` processes, and their log upkeep failing, are in
test_entry_macs_workers.py (two files, so that two test processes share them).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, LargeBinary, delete, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.anchor import SignedLogAnchor
from app.audit.checkpoints import (
    latest_signed,
    log_origin,
    log_verifier,
    maybe_checkpoint,
    sign_checkpoint,
)
from app.audit.log import read_head, record
from app.audit.merkle import CompactRange, leaf_hash
from app.audit.note import Checkpoint, Verifier, sign_note
from app.audit.service import verify_database
from app.audit.verify import Report
from app.config import Settings
from app.crypto.encoding import format_time, utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, read_snapshot, unit_of_work
from app.localnodes import LocalNode
from app.migrate import upgrade
from app.models import AuditCheckpoint, AuditEntry, AuditHead
from app.node import load_node
from tests.conftest import Databases, migrated_sqlite

AUTHORITY = "ES/MJ"


BEFORE_MACS = "a7c2e9d41f08"


def _rewrite(engine: Engine, idx: int, details: dict[str, Any]) -> None:
    """What a database writer without the keys does: entry `idx` given other details, the
    links after it and the head rebuilt with public hashing alone (the MACs left as they
    were: computing new ones takes the key)."""
    with engine.begin() as connection:
        rows = connection.execute(text("SELECT idx, entry FROM audit_entries ORDER BY idx")).all()
        compact, previous = CompactRange(), None
        for number, data in rows:
            fields = orjson.loads(bytes(data))
            if number == idx:
                fields["details"] = details
            if number > idx:
                fields["prev_leaf"] = previous.hex() if previous else None
            entry = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
            previous = leaf_hash(entry)
            compact.append(previous)
            if number >= idx:
                connection.execute(
                    update(AuditEntry)
                    .where(AuditEntry.idx == number)
                    .values(entry=entry, leaf_hash=previous)
                )
        connection.execute(
            update(AuditHead).values(
                compact_range=compact.to_bytes(), root_hash=compact.root(), last_leaf_hash=previous
            )
        )


def _client_created(engine: Engine, name: str) -> int:
    with engine.connect() as connection:
        for idx, data in connection.execute(
            select(AuditEntry.idx, AuditEntry.entry).where(AuditEntry.action == "client.created")
        ):
            if orjson.loads(bytes(data))["details"]["client"] == name:
                return int(idx)
    raise AssertionError(f"no client.created entry for {name}")


def test_an_unsigned_entry_rewritten_with_its_links_rebuilt_is_never_signed(
    databases: Databases, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The insider changes which client `clients create` made (an entry a CLI process
    appended after `init`'s checkpoint), and rebuilds the links and the head: `audit verify
    --db` names the entry, and neither `audit checkpoint` nor the worker's upkeep signs it."""
    es_db = databases.new("es", migrated=True)
    node = LocalNode(AUTHORITY, "Ministerio de Justicia", tmp_path / "es", es_db)
    node.init(clients={"cms": ("officer",), "auditor": ("auditor",)})
    assert node.cli("audit", "verify", "--db").stdout.startswith("OK: ")
    assert "rewritten" not in node.cli("doctor", check=False).stdout

    engine = make_engine(node.database_url)
    try:
        forged = _client_created(engine, "auditor")
        _rewrite(engine, forged, {"client": "intruder", "expires_at": None, "roles": ["admin"]})
    finally:
        engine.dispose()
    why = f"entry {forged} does not carry its MAC, and no checkpoint covers it"
    verify = node.cli("audit", "verify", "--db", check=False)
    assert verify.returncode == 1
    assert f"FAILED: {why}" in verify.stderr
    signed = node.cli("audit", "checkpoint", check=False)
    assert signed.returncode == 1
    assert why in signed.stderr
    assert "entraide.log/" not in signed.stdout  # no note printed
    doctor = node.cli("doctor", check=False)  # said by the operator's check too
    assert doctor.returncode != 0
    assert f"audit log rolled back or rewritten: {why}" in doctor.stdout + doctor.stderr

    loaded = load_node(Settings(database_url=node.database_url, keys_dir=node.keys_dir))
    try:
        with caplog.at_level(logging.CRITICAL, logger="app.audit.checkpoints"):
            with unit_of_work(loaded.sessions) as session:
                upkeep = maybe_checkpoint(
                    session,
                    authority_id=AUTHORITY,
                    log_key=loaded.keys.log,
                    every=1,
                    seconds=0,
                    anchor=loaded.log_anchor,
                )
        assert upkeep is None  # and deliveries go on: the upkeep raises nothing
        assert f"audit log rolled back or rewritten: {why}" in caplog.text
        with unit_of_work(loaded.sessions) as session:
            latest = latest_signed(session, _verifier(loaded.keys))
        assert latest is not None
        assert latest.size <= forged
    finally:
        loaded.close()


def _forge_head(engine: Engine, idx: int, details: dict[str, Any]) -> tuple[bytes, bytes]:
    """The insider's other way (from review): the entries and their MACs left alone, only
    the head row given the root and compact range of a log whose entry `idx` (the last)
    says otherwise, and that entry's leaf column to match. Returns the forged entry and the
    forged root, to swap in once the node has signed that root."""
    with engine.begin() as connection:
        rows = connection.execute(text("SELECT idx, entry FROM audit_entries ORDER BY idx")).all()
        assert rows[-1][0] == idx, "the forged entry is the last"
        compact, forged = CompactRange(), b""
        for number, data in rows:
            if number == idx:
                fields = orjson.loads(bytes(data))
                fields["details"] = details
                forged = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
                data = forged
            compact.append(leaf_hash(bytes(data)))
        connection.execute(
            update(AuditEntry).where(AuditEntry.idx == idx).values(leaf_hash=leaf_hash(forged))
        )
        connection.execute(
            update(AuditHead).values(compact_range=compact.to_bytes(), root_hash=compact.root())
        )
    return forged, compact.root()


def test_a_head_given_a_root_of_the_writers_making_is_not_signed(
    databases: Databases, tmp_path: Path
) -> None:
    """The entries' MACs were checked, but what a checkpoint signs is the head row's root:
    a database writer put there the root of a log whose last entry made an intruder an
    administrator, had the node sign it, then swapped the entry in; every check said OK
    afterwards (from review). The entry the head ends on now vouches for the root."""
    es_db = databases.new("es", migrated=True)
    node = LocalNode(AUTHORITY, "Ministerio de Justicia", tmp_path / "es", es_db)
    node.init(clients={"cms": ("officer",), "auditor": ("auditor",)})
    engine = make_engine(node.database_url)
    try:
        last = _client_created(engine, "auditor")
        with engine.connect() as connection:
            size = connection.execute(select(AuditHead.size)).scalar_one()
        assert last == size - 1, "`clients create auditor` appended the log's last entry"
        _forge_head(engine, last, {"client": "intruder", "expires_at": None, "roles": ["admin"]})
        why = f"the log head's root is not one entry {last} was appended under"
        signed = node.cli("audit", "checkpoint", check=False)
        assert signed.returncode == 1, signed.stdout
        assert why in signed.stderr
        assert "entraide.log/" not in signed.stdout  # nothing signed
        verify = node.cli("audit", "verify", "--db", check=False)
        assert verify.returncode == 1
        doctor = node.cli("doctor", check=False)
        assert doctor.returncode != 0
        assert why in doctor.stdout + doctor.stderr
    finally:
        engine.dispose()


def _verifier(keys: NodeKeys) -> Verifier:
    return log_verifier(AUTHORITY, keys.log_public)


def _problems(sessions: sessionmaker[Session], keys: NodeKeys, anchor: SignedLogAnchor) -> Report:
    from app.audit.mac import mac_key

    with read_snapshot(sessions) as session:
        return verify_database(
            session,
            authority_id=AUTHORITY,
            log_public=keys.log_public,
            anchor=anchor,
            mac_key=mac_key(keys.log),
        )


def _append(sessions: sessionmaker[Session], count: int, tag: str = "event") -> None:
    with unit_of_work(sessions) as session:
        for number in range(count):
            record(session, actor="node", action=f"test.{tag}", details={"n": number})


def _sign(sessions: sessionmaker[Session], keys: NodeKeys, anchor: SignedLogAnchor | None) -> Any:
    with unit_of_work(sessions) as session:
        return sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log, anchor=anchor)


def _sign_before_macs(engine: Engine, keys: NodeKeys, anchor: SignedLogAnchor) -> int:
    """A checkpoint as a node of the version before MACs signed it: no `entry-macs` line."""
    with make_session_factory(engine).begin() as session:
        head = read_head(session)
        origin = log_origin(AUTHORITY)
        body = Checkpoint(
            origin, head.size, head.root_hash, extensions=(f"time {format_time(utc_now())}",)
        ).format()
        session.add(
            AuditCheckpoint(
                size=head.size,
                root_hash=head.root_hash,
                note=sign_note(body, origin, keys.log),
                created_at=utc_now(),
            )
        )
    anchor.reset(head.size, head.root_hash)
    return head.size


def test_entries_from_before_macs_are_signed_once_then_every_entry_needs_one(
    databases: Databases, tmp_path: Path
) -> None:
    """A node upgraded with entries after its last checkpoint: they have no MAC (the
    migration holds no key). The newest checkpoint was signed before MACs, so they are let
    off, and the next checkpoint signs them, saying `entry-macs`; from then on an entry
    without a MAC is refused, even once the checkpoints that say so are deleted."""
    from app.audit.checkpoints import LogRewritten
    from app.audit.mac import MACS_EXTENSION, append_with

    url = databases.new("upgraded")
    upgrade(url, BEFORE_MACS)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), keys.log)
    (tmp_path / "keys").mkdir(mode=0o700)
    anchor = SignedLogAnchor(tmp_path / "keys" / "log-signed.json")
    anchor.start()
    try:
        # The log as the version before left it: appends wrote no MAC (there was no column
        # for one; today's appends write it, so the column is there only while they write).
        blob = LargeBinary().compile(dialect=engine.dialect)
        with engine.begin() as connection:
            connection.execute(text(f"ALTER TABLE audit_entries ADD COLUMN mac {blob}"))
        _append(sessions, 7, "before")
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE audit_entries DROP COLUMN mac"))
        assert _sign_before_macs(engine, keys, anchor) == 7
        with engine.begin() as connection:
            connection.execute(text(f"ALTER TABLE audit_entries ADD COLUMN mac {blob}"))
        _append(sessions, 3, "unsigned_before")
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE audit_entries DROP COLUMN mac"))
        engine.dispose()
        upgrade(url)

        report = _problems(sessions, keys, anchor)
        assert report.problems == []
        assert (report.entries, report.signed, report.without_mac) == (10, 7, 3)
        _append(sessions, 2, "after")  # with MACs
        signed = _sign(sessions, keys, anchor)
        assert signed.size == 12
        assert signed.note.splitlines()[4] == MACS_EXTENSION
        assert _problems(sessions, keys, anchor).problems == []

        _append(sessions, 2, "newest")
        with engine.begin() as connection:  # an insider's entry: no MAC, as before MACs
            connection.execute(update(AuditEntry).where(AuditEntry.idx == 13).values(mac=None))
        why = "entry 13 carries no MAC, and no checkpoint covers it"
        with pytest.raises(LogRewritten, match=why):
            _sign(sessions, keys, anchor)
        assert [problem.message for problem in _problems(sessions, keys, anchor).problems] == [
            f"{why}: it was written, or its MAC removed, without the log key"
        ]
        # The checkpoints that say `entry-macs` deleted: the newest left is from before MACs,
        # but the record beside the keys reaches past it, so no entry is let off.
        with engine.begin() as connection:
            connection.execute(delete(AuditCheckpoint).where(AuditCheckpoint.size > 7))
        with pytest.raises(LogRewritten, match="entry 7 carries no MAC"):
            _sign(sessions, keys, anchor)
    finally:
        engine.dispose()


def test_a_mac_that_does_not_match_is_refused_even_before_the_first_checkpoint_with_macs(
    databases: Databases, tmp_path: Path
) -> None:
    """Letting entries from before MACs off never lets a wrong MAC through: an entry
    rewritten as it stands (its MAC kept) or given another entry's MAC."""
    from app.audit.checkpoints import LogRewritten
    from app.audit.mac import append_with

    url = databases.new("mixed", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), keys.log)
    try:
        _append(sessions, 4)
        with engine.begin() as connection:
            first = connection.scalar(select(AuditEntry.mac).where(AuditEntry.idx == 0))
            connection.execute(update(AuditEntry).where(AuditEntry.idx == 2).values(mac=first))
        with pytest.raises(LogRewritten, match="entry 2 does not carry its MAC"):
            _sign(sessions, keys, None)
        other = NodeKeys.generate()  # MACs under another node's key: not this log's
        with pytest.raises(LogRewritten, match="entry 0 does not carry its MAC"):
            _sign(sessions, other, None)
    finally:
        engine.dispose()


def _last_idx(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(AuditHead.size)).scalar_one()) - 1


def _set_mac(engine: Engine, idx: int, mac: bytes | None) -> None:
    with engine.begin() as connection:
        connection.execute(update(AuditEntry).where(AuditEntry.idx == idx).values(mac=mac))


def test_an_old_processs_entries_after_the_first_checkpoint_are_accepted_on_record(
    databases: Databases, tmp_path: Path
) -> None:
    """A process of the earlier version left running through the upgrade appends an entry
    after this version's first checkpoint: it has no MAC, and no checkpoint is signed again
    (from review: no old process can start against the migrated database to sign over it,
    so the log was stuck for good). The operator sees the entries and accepts them, on
    record; an entry whose MAC does not match is never accepted."""
    es_db = databases.new("es", migrated=True)
    node = LocalNode(AUTHORITY, "Ministerio de Justicia", tmp_path / "es", es_db)
    node.init(clients={"cms": ("officer",)})
    node.cli("audit", "checkpoint")  # this version's: `entry-macs` from here on
    node.cli("clients", "create", "late-worker", "--role", "officer")
    engine = make_engine(node.database_url)
    try:
        old = _last_idx(engine)
        _set_mac(engine, old, None)  # as the earlier version's INSERT writes it
        stuck = node.cli("audit", "checkpoint", check=False)
        assert stuck.returncode == 1
        assert f"entry {old} carries no MAC" in stuck.stderr

        shown = node.cli("audit", "checkpoint", "--accept-without-mac", check=False)
        assert shown.returncode == 1
        assert f"entry {old} " in shown.stderr
        assert "client.created" in shown.stderr
        assert "run again with --yes" in shown.stderr
        with engine.connect() as connection:
            assert (
                connection.execute(select(AuditEntry.mac).where(AuditEntry.idx == old)).scalar_one()
                is None
            )

        accepted = node.cli("audit", "checkpoint", "--accept-without-mac", "--yes")
        assert accepted.stdout.startswith("entraide.log/")
        assert node.cli("audit", "verify", "--db").stdout.startswith("OK: ")
        with engine.connect() as connection:
            entry = connection.execute(
                select(AuditEntry.entry).where(AuditEntry.action == "audit.entries_accepted")
            ).scalar_one()
        assert orjson.loads(bytes(entry))["details"] == {"first": old, "last": old, "count": 1}

        # An entry rewritten without the key (its MAC no longer fits) is not accepted.
        node.cli("clients", "create", "another", "--role", "officer")
        _set_mac(engine, _last_idx(engine), b"\x00" * 32)
        refused = node.cli("audit", "checkpoint", "--accept-without-mac", "--yes", check=False)
        assert refused.returncode == 1
        assert "carries a MAC that does not match" in refused.stderr
    finally:
        engine.dispose()


def _set_text_mac(database: Path, idx: int) -> None:
    """What a database writer can do on SQLite, which keeps any type it is given."""
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE audit_entries SET mac = 'x' WHERE idx = ?", (idx,))


def test_a_mac_rewritten_as_text_is_refused_as_a_wrong_one(tmp_path: Path) -> None:
    """From review: a MAC rewritten as TEXT made `audit verify --db` and `audit checkpoint`
    crash (TypeError) and doctor say "No problem found"; it is refused as a wrong MAC is."""
    database = tmp_path / "es.db"
    node = LocalNode(
        AUTHORITY, "Ministerio de Justicia", tmp_path / "es", migrated_sqlite(database)
    )
    node.init(clients={"cms": ("officer",)})
    node.cli("audit", "checkpoint")
    node.cli("clients", "create", "late", "--role", "officer")  # no checkpoint covers it
    engine = make_engine(node.database_url)
    try:
        forged = _last_idx(engine)
    finally:
        engine.dispose()
    _set_text_mac(database, forged)
    why = f"entry {forged} does not carry its MAC, and no checkpoint covers it"
    verify = node.cli("audit", "verify", "--db", check=False)
    assert verify.returncode == 1
    assert f"FAILED: {why}" in verify.stderr
    assert "Traceback" not in verify.stderr
    signed = node.cli("audit", "checkpoint", check=False)
    assert signed.returncode == 1
    assert why in signed.stderr
    assert "Traceback" not in signed.stderr
    doctor = node.cli("doctor", check=False)
    assert doctor.returncode != 0
    assert f"audit log rolled back or rewritten: {why}" in doctor.stdout + doctor.stderr
    accepted = node.cli("audit", "checkpoint", "--accept-without-mac", "--yes", check=False)
    assert accepted.returncode == 1
    assert "carries a MAC that does not match" in accepted.stderr

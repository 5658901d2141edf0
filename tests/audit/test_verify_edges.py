"""The verifier at its edges: an export that lost its last checkpoint, a checkpoint of the
empty log. Both were accepted before a review (nothing signed covered what they held)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from sqlalchemy import select

from app.audit.checkpoints import log_origin, log_verifier, log_verifier_key, sign_checkpoint
from app.audit.log import record
from app.audit.mac import append_with
from app.audit.merkle import CompactRange, leaf_hash, verify_inclusion
from app.audit.note import Checkpoint, sign_note
from app.audit.service import (
    EXPORT_CHECKPOINTS,
    EXPORT_ENTRIES,
    EXPORT_KEY,
    entry_view,
    prove_inclusion,
    verify_database,
    verify_export,
)
from app.audit.verify import LogVerifier
from app.crypto.encoding import canonical_json, format_time, utc_now
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, read_snapshot, unit_of_work
from app.models import AuditCheckpoint, AuditEntry, AuditNode
from tests.conftest import migrated_sqlite

AUTHORITY = "ES/MJ"


def _export(tmp_path: Path, keys: NodeKeys) -> Path:
    """A log of 40 entries signed at 16, 32 and, as `audit export` does, at the end."""
    url = migrated_sqlite(tmp_path / "log.db")
    engine = make_engine(url)
    try:
        with unit_of_work(append_with(make_session_factory(engine), keys.log)) as session:
            for number in range(40):
                record(session, actor="node", action="test.event", details={"n": number})
                if number + 1 in (16, 32, 40):
                    sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
            entries = list(session.scalars(select(AuditEntry.entry).order_by(AuditEntry.idx)))
            notes = list(session.scalars(select(AuditCheckpoint.note).order_by("id")))
    finally:
        engine.dispose()
    out = tmp_path / "export"
    out.mkdir()
    (out / EXPORT_ENTRIES).write_bytes(b"".join(entry + b"\n" for entry in entries))
    (out / EXPORT_CHECKPOINTS).write_text("".join(json.dumps({"note": n}) + "\n" for n in notes))
    (out / EXPORT_KEY).write_text(log_verifier_key(AUTHORITY, keys.log) + "\n")
    return out


def test_an_export_whose_last_checkpoint_was_removed_fails(tmp_path: Path) -> None:
    keys = NodeKeys.generate()
    out = _export(tmp_path, keys)
    report = verify_export(out)
    assert report.ok, report.problems
    assert (report.entries, report.signed) == (40, 40)
    # Take the last checkpoint out, and with it the only signature over entries 32 to 39:
    # drop four of them (their hash chain stays whole up to the cut).
    notes = (out / EXPORT_CHECKPOINTS).read_text().splitlines()
    (out / EXPORT_CHECKPOINTS).write_text("\n".join(notes[:-1]) + "\n")
    entries = (out / EXPORT_ENTRIES).read_bytes().splitlines()
    (out / EXPORT_ENTRIES).write_bytes(b"\n".join(entries[:36]) + b"\n")
    report = verify_export(out)
    assert not report.ok
    assert report.first is not None
    assert report.first.idx == 32
    assert "entries 32 to 35 are covered by no signed checkpoint" in report.first.message


def test_a_checkpoint_of_the_empty_log_must_have_its_root() -> None:
    keys = NodeKeys.generate()
    origin = log_origin(AUTHORITY)
    wrong = Checkpoint(origin=origin, size=0, root_hash=b"\x01" * 32).format()
    verifier = log_verifier(AUTHORITY, keys.log_public)
    report = LogVerifier(verifier, origin, [sign_note(wrong, origin, keys.log)]).finish()
    assert not report.ok
    assert "does not have the empty log's root" in report.problems[0].message
    empty_root = LogVerifier(verifier, origin, []).finish().root
    right = Checkpoint(origin=origin, size=0, root_hash=empty_root).format()
    assert LogVerifier(verifier, origin, [sign_note(right, origin, keys.log)]).finish().ok


def test_an_entry_altered_in_the_database_fails_its_inclusion_proof(tmp_path: Path) -> None:
    """Someone with SQL access edits an entry's bytes and leaves its leaf_hash column: the
    API shows the edited entry, and its proof must not verify (it did, with the column)."""
    keys = NodeKeys.generate()
    url = migrated_sqlite(tmp_path / "log.db")
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), keys.log)
    try:
        with unit_of_work(sessions) as session:
            for number in range(8):
                record(
                    session, actor="client:officer", action="request.read", details={"n": number}
                )
            note = sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log).note
        root = Checkpoint.parse(note.split("\n\n")[0] + "\n").root_hash
        with unit_of_work(sessions) as session:
            entry = session.get(AuditEntry, 5)
            assert entry is not None
            entry.entry = entry.entry.replace(b"client:officer", b"client:nobodyx")
        with unit_of_work(sessions) as session:
            entry = session.get(AuditEntry, 5)
            assert entry is not None
            shown = entry_view(entry)
            proof = prove_inclusion(session, index=5, size=8)
        assert shown["actor"] == "client:nobodyx"
        assert proof["leaf_hash"] == shown["leaf_hash"] == leaf_hash(entry.entry).hex()
        hashes = [bytes.fromhex(item) for item in proof["proof"]]
        assert not verify_inclusion(bytes.fromhex(shown["leaf_hash"]), 5, 8, hashes, root)
    finally:
        engine.dispose()


@pytest.mark.parametrize("edit", ["altered", "deleted", "planted"])
def test_a_stored_subtree_hash_edited_in_the_database_fails_verify_db(
    tmp_path: Path, edit: str
) -> None:
    """Proofs read the stored hashes of subtrees of 256 entries and more, not the entries:
    one edited with SQL made every inclusion proof under it fail against the signed root, and
    every peer's consistency check across it raise a split-view alarm against this node,
    while `audit verify --db` (which read only the entries) said OK."""
    keys = NodeKeys.generate()
    url = migrated_sqlite(tmp_path / "log.db")
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), keys.log)

    def verify() -> list[str]:
        with read_snapshot(sessions) as session:
            report = verify_database(session, authority_id=AUTHORITY, log_public=keys.log_public)
        return [problem.message for problem in report.problems]

    try:
        with unit_of_work(sessions) as session:
            for number in range(600):  # two subtrees of 256, and their parent of 512
                record(session, actor="node", action="test.event", details={"n": number})
            sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
        assert verify() == []
        with unit_of_work(sessions) as session:
            stored = {(node.level, node.position) for node in session.scalars(select(AuditNode))}
            assert stored == {(8, 0), (8, 1), (9, 0)}
            if edit == "altered":
                node = session.get(AuditNode, (8, 1))
                assert node is not None
                node.hash = bytes(32)
            elif edit == "deleted":
                session.delete(session.get(AuditNode, (9, 0)))
            else:
                session.add(AuditNode(level=8, position=2, hash=bytes(32)))
        expected = {
            "altered": "the stored subtree hash 8/1, which proofs read, differs from its entries",
            "deleted": "the stored subtree hash 9/0, which proofs read, is missing",
            "planted": "the stored subtree hash 8/2 belongs to no entries of the log",
        }[edit]
        assert verify() == [expected]
    finally:
        engine.dispose()


@pytest.mark.parametrize("line", ["[1]", '"x"', '{"note": 5}', '{"note": null}', "{}"])
def test_a_checkpoint_line_that_is_no_note_is_refused_by_name(tmp_path: Path, line: str) -> None:
    """Each was a TypeError traceback out of `entraide audit verify` (from review)."""
    out = _export(tmp_path, NodeKeys.generate())
    with (out / EXPORT_CHECKPOINTS).open("a") as handle:
        handle.write(line + "\n")
    with pytest.raises(ValueError, match=f"line 4 of {EXPORT_CHECKPOINTS} holds no"):
        verify_export(out)


def test_an_export_cut_back_fails_against_a_checkpoint_fetched_afterwards(
    tmp_path: Path,
) -> None:
    """A cut-back export is a verifiable prefix on its own (docs/audit.md §9): the auditor's
    own fresh checkpoint is what shows entries missing at its end."""
    keys = NodeKeys.generate()
    out = _export(tmp_path, keys)
    fresh = (out / EXPORT_CHECKPOINTS).read_text().splitlines()[-1]
    notes = (out / EXPORT_CHECKPOINTS).read_text().splitlines()
    (out / EXPORT_CHECKPOINTS).write_text("\n".join(notes[:-1]) + "\n")
    entries = (out / EXPORT_ENTRIES).read_bytes().splitlines()
    (out / EXPORT_ENTRIES).write_bytes(b"\n".join(entries[:32]) + b"\n")
    assert verify_export(out).ok  # alone, it passes: a prefix the node did sign
    report = verify_export(out, earlier=json.loads(fresh)["note"])
    assert not report.ok


def test_a_damaged_entry_is_shown_as_it_is_not_a_500(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "log.db")
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    try:
        with unit_of_work(sessions) as session:
            record(session, actor="node", action="test.event")
            entry = session.get(AuditEntry, 0)
            assert entry is not None
            entry.entry = b"\xff\x00"
        with read_snapshot(sessions) as session:
            entry = session.get(AuditEntry, 0)
            assert entry is not None
            shown = entry_view(entry)
        assert shown == {
            "idx": 0,
            "malformed": True,
            "entry_base64": "/wA=",
            "leaf_hash": leaf_hash(b"\xff\x00").hex(),
        }
    finally:
        engine.dispose()


def test_an_index_written_as_true_is_no_index(tmp_path: Path) -> None:
    """Python's `True == 1` let an entry claiming `"idx": true` pass at position 1 (from an
    auditor's review)."""
    keys = NodeKeys.generate()
    out = _export(tmp_path, keys)
    entries = (out / EXPORT_ENTRIES).read_bytes().splitlines()
    assert b'"idx":1,' in entries[1]
    entries[1] = entries[1].replace(b'"idx":1,', b'"idx":true,')
    (out / EXPORT_ENTRIES).write_bytes(b"\n".join(entries) + b"\n")
    report = verify_export(out)
    assert not report.ok
    assert "claims index True" in report.problems[0].message


def _signed_entries(keys: NodeKeys, times: list[object]) -> tuple[list[bytes], str]:
    """Entries with these times, chained and signed by the log key: only the times are odd."""
    origin = log_origin(AUTHORITY)
    entries: list[bytes] = []
    last: str | None = None
    tree = CompactRange()
    for idx, time in enumerate(times):
        fields = {"v": 1, "idx": idx, "time": time, "actor": "node", "action": "test.event"}
        data = canonical_json({**fields, "details": {}, "prev_leaf": last})
        entries.append(data)
        leaf = leaf_hash(data)
        last = leaf.hex()
        tree.append(leaf)
    body = Checkpoint(origin=origin, size=len(times), root_hash=tree.root()).format()
    return entries, sign_note(body, origin, keys.log)


def test_entry_times_must_be_timestamps_and_not_in_the_future() -> None:
    """A signed log whose entries' times are not timestamps (null, a number, text after the
    Z) or are dated ahead of the clock verified (from an auditor's review)."""
    keys = NodeKeys.generate()
    now = utc_now()
    ahead = format_time(now + timedelta(days=30))
    times: list[object] = [format_time(now), None, 17, format_time(now) + " junk", ahead]
    entries, note = _signed_entries(keys, times)
    verifier = LogVerifier(log_verifier(AUTHORITY, keys.log_public), log_origin(AUTHORITY), [note])
    verifier.feed_many(entries, None)
    assert [problem.message for problem in verifier.finish().problems] == [
        "entry 1: its time is not a timestamp (None)",
        "entry 2: its time is not a timestamp (17)",
        f"entry 3: its time is not a timestamp ('{format_time(now)} junk')",
        f"entry 4 is dated in the future ({ahead})",
    ]
    good, note = _signed_entries(keys, [format_time(now)] * 3)
    verifier = LogVerifier(log_verifier(AUTHORITY, keys.log_public), log_origin(AUTHORITY), [note])
    verifier.feed_many(good, None)
    assert verifier.finish().ok


def test_an_entry_changed_with_the_links_rebuilt_is_placed_in_its_range(tmp_path: Path) -> None:
    """From review: links are hashes anyone can recompute. An entry edited with every later
    link rebuilt was reported as "entry 31 was altered" (the range's last entry), sending an
    examiner to the wrong entry; the report now names the range it is in."""
    keys = NodeKeys.generate()
    out = _export(tmp_path, keys)
    lines = (out / EXPORT_ENTRIES).read_bytes().splitlines()
    previous: bytes | None = None
    for number, line in enumerate(lines):
        fields = json.loads(line)
        if number == 20:
            fields["actor"] = "client:someone-else"
        if number > 20:
            assert previous is not None
            fields["prev_leaf"] = previous.hex()
        lines[number] = canonical_json(fields) if number >= 20 else line
        previous = leaf_hash(lines[number])
    (out / EXPORT_ENTRIES).write_bytes(b"\n".join(lines) + b"\n")
    report = verify_export(out)
    assert report.first is not None
    assert "(size 32) does not match the entries: entries 16 to 31 were changed" in (
        report.first.message
    )
    assert "the last checkpoint that matches covers 16" in report.first.message


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_an_entry_of_another_version_is_named(version: object) -> None:
    """From an auditor's review: the verifier never read an entry's `v`, so entries of a
    format it does not know (`"v": 2`) passed as if it did."""
    keys = NodeKeys.generate()
    entries, _ = _signed_entries(keys, [format_time(utc_now())] * 3)
    fields = json.loads(entries[1])
    if version is None:
        del fields["v"]
    else:
        fields["v"] = version
    entries[1] = canonical_json(fields)
    # Re-linked and signed as the node would: only the version is wrong.
    fields = json.loads(entries[2])
    fields["prev_leaf"] = leaf_hash(entries[1]).hex()
    entries[2] = canonical_json(fields)
    compact = CompactRange()
    for entry in entries:
        compact.append(leaf_hash(entry))
    origin = log_origin(AUTHORITY)
    note = sign_note(Checkpoint(origin, 3, compact.root()).format(), origin, keys.log)
    checker = LogVerifier(log_verifier(AUTHORITY, keys.log_public), origin, [note])
    for entry in entries:
        checker.feed(entry)
    report = checker.finish()
    assert report.first is not None
    assert report.first.message.startswith("entry 1 is of version"), report.first.message

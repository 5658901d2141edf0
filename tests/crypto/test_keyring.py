"""A running node follows `keys rotate` made by another process (app/crypto/keyring.py):
one stat per use while nothing changed, a reload under the keys folder's lock when the chain
did, a rotation stopped half way finished or ignored as at a start, and a reload that fails
leaving the keys in use (it used to take a restart, which operators forget)."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.config import Settings
from app.crypto import keys as keys_module
from app.crypto.encoding import utc_now
from app.crypto.identity import parse_identity_document
from app.crypto.keyring import RETRY_SECONDS, Generation, KeyRing
from app.crypto.keys import (
    ROTATIONS_FILE,
    NodeIdentity,
    NodeKeys,
    keys_folder_lock,
    load_keys,
    rotate_keys,
    save_keys,
)
from app.localnodes import LocalNode
from app.models import AuditEntry
from app.node import Node, load_node
from app.obs.health import keys_reload_check
from tests.conftest import Databases

OVERLAP = timedelta(days=7)
IDENTITY = NodeIdentity("ES/MJ", "Ministerio de Justicia", "https://es.example")
PASSPHRASE = b"a long passphrase for the keys"


def _folder(tmp_path: Path, passphrase: bytes | None = None) -> Path:
    folder = tmp_path / "keys"
    save_keys(folder, NodeKeys.generate(), passphrase=passphrase)
    return folder


def _rotate(folder: Path, passphrase: bytes | None = None) -> tuple[NodeKeys, NodeKeys]:
    return rotate_keys(folder, authority_id="ES/MJ", passphrase=passphrase, overlap=OVERLAP)


def _ring(folder: Path, passphrase: bytes | None = None) -> KeyRing:
    return KeyRing.load(folder, IDENTITY, passphrase=lambda: passphrase)


def _published_signing_kid(generation: Generation) -> str:
    return parse_identity_document(generation.document).signing.kid


@pytest.mark.parametrize("passphrase", [None, PASSPHRASE], ids=["plain", "protected"])
def test_a_rotation_by_another_process_is_followed_at_the_next_use(
    tmp_path: Path, passphrase: bytes | None
) -> None:
    folder = _folder(tmp_path, passphrase)
    ring = _ring(folder, passphrase)
    started = ring.current()
    assert ring.current() is started  # nothing changed: nothing read again

    old, new = _rotate(folder, passphrase)  # as `entraide keys rotate` does, elsewhere
    after = ring.current()
    assert after.keys.signing_public == new.signing_public != old.signing_public
    assert after.keys.encryption_public == new.encryption_public
    assert after.keys.log_public == old.log_public
    assert ring.current() is after
    # The overlap: an envelope sealed to the old encryption key still opens, and is accepted.
    assert after.keys.encryption_key_for(old.encryption_kid) is not None
    assert after.keys.accepts_encryption_kid(old.encryption_kid, utc_now())
    # The published document: the new keys, with the chain from the old signing key.
    published = parse_identity_document(after.document)
    assert published.signing.kid == new.signing_kid
    assert published.encryption.kid == new.encryption_kid
    assert published.rotation_path(old.signing_public) == list(published.rotations)
    assert published.issued_at >= parse_identity_document(started.document).issued_at


def test_a_rotation_stopped_before_its_chain_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    ring = _ring(folder)
    started = ring.current()
    real_write = keys_module.write_private

    def full_disk(path: Path, content: bytes, *, replace: bool = False) -> None:
        if path.name == ROTATIONS_FILE:
            raise OSError(28, "No space left on device")
        real_write(path, content, replace=replace)

    monkeypatch.setattr(keys_module, "write_private", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _rotate(folder)
    monkeypatch.undo()
    assert list(folder.glob("*.next"))  # staged keys no chain names
    assert ring.current() is started  # the old keys stay, as at a start


def test_a_rotation_stopped_after_its_chain_is_finished_by_the_running_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    ring = _ring(folder)
    started = ring.current()
    real_replace = keys_module.os.replace

    def power_cut(source: Path, target: Path) -> None:
        if str(source).endswith(".next"):
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(keys_module.os, "replace", power_cut)
    with pytest.raises(OSError, match="Input/output"):
        _rotate(folder)
    monkeypatch.undo()
    after = ring.current()
    named = after.keys.rotations[-1].new
    assert (after.keys.signing_public, after.keys.encryption_public) == (
        named.signing,
        named.encryption,
    )
    assert after.keys.signing_public != started.keys.signing_public
    assert not list(folder.glob("*.next"))  # put in place, as a start would have


def test_two_processes_finishing_a_stopped_rotation_at_once_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve and a worker (two key rings, each taking the folder's lock) and several request
    threads each: one puts the staged keys in place, every one ends with them."""
    folder = _folder(tmp_path)
    rings = [_ring(folder), _ring(folder)]
    real_replace = keys_module.os.replace

    def power_cut(source: Path, target: Path) -> None:
        if str(source).endswith(".next"):
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(keys_module.os, "replace", power_cut)
    with pytest.raises(OSError, match="Input/output"):
        _rotate(folder)
    monkeypatch.undo()
    # wait=True: each thread needs the keys the folder holds (without it, a thread that
    # comes while another reloads goes on with the keys in use: the next test).
    with ThreadPoolExecutor(max_workers=8) as pool:
        seen = list(pool.map(lambda i: rings[i % 2].current(wait=True).keys.signing_kid, range(16)))
    on_disk = load_keys(folder)
    assert set(seen) == {on_disk.signing_kid}
    assert on_disk.signing_public == on_disk.rotations[-1].new.signing
    assert {_published_signing_kid(ring.current()) for ring in rings} == {on_disk.signing_kid}


def test_a_use_during_a_rotation_waits_for_it_and_gets_the_new_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain is written before the new keys go in place: a node that saw the chain then
    would read keys it does not name. It waits on the folder's lock, held by the rotation."""
    folder = _folder(tmp_path)
    ring = _ring(folder)
    real_write = keys_module.write_private
    used: list[NodeKeys] = []
    user: list[threading.Thread] = []

    def use_meanwhile(path: Path, content: bytes, *, replace: bool = False) -> None:
        real_write(path, content, replace=replace)
        if path.name == ROTATIONS_FILE:  # the chain is on disk, its keys not yet in place
            thread = threading.Thread(target=lambda: used.append(ring.current().keys))
            user.append(thread)
            thread.start()
            time.sleep(0.5)
            assert thread.is_alive()  # waiting for the rotation's lock

    monkeypatch.setattr(keys_module, "write_private", use_meanwhile)
    _old, new = _rotate(folder)
    monkeypatch.undo()
    user[0].join(timeout=30)
    assert [keys.signing_public for keys in used] == [new.signing_public]


def test_a_reload_that_fails_keeps_the_keys_in_use_and_is_tried_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A passphrase no longer configured (say): the node goes on with the keys it has, says
    why, and does not pay an Argon2id derivation per request to find out again."""
    folder = _folder(tmp_path, PASSPHRASE)
    configured: list[bytes | None] = [PASSPHRASE]
    asked: list[int] = []
    now = [1000.0]

    def passphrase() -> bytes | None:
        asked.append(1)
        return configured[0]

    ring = KeyRing(
        folder,
        IDENTITY,
        load_keys(folder, passphrase=PASSPHRASE),
        stamp=None,
        passphrase=passphrase,
        clock=lambda: now[0],
    )
    started = ring.current()
    _old, new = _rotate(folder, PASSPHRASE)
    configured[0] = None
    with caplog.at_level(logging.ERROR, logger="app.crypto.keyring"):
        assert ring.current() is started
    assert "could not be loaded" in caplog.text
    assert "protected by a passphrase" in caplog.text
    assert PASSPHRASE.decode() not in caplog.text
    tries = len(asked)
    for _ in range(5):
        assert ring.current() is started
    assert len(asked) == tries  # not read again within the retry period

    configured[0] = PASSPHRASE
    now[0] += RETRY_SECONDS + 1
    assert ring.current().keys.signing_public == new.signing_public


def test_a_failed_reload_is_kept_with_its_reason_until_a_reload_succeeds(tmp_path: Path) -> None:
    """What /readyz, the metrics and `doctor` report (from review: only a log line said it)."""
    folder = _folder(tmp_path, PASSPHRASE)
    configured: list[bytes | None] = [None]  # the node was started without the passphrase
    now = [1000.0]
    ring = KeyRing(
        folder,
        IDENTITY,
        load_keys(folder, passphrase=PASSPHRASE),
        stamp=None,
        passphrase=lambda: configured[0],
        clock=lambda: now[0],
    )
    started = ring.current()
    assert ring.failure is None
    assert ring.state().follows_disk
    _old, new = _rotate(folder, PASSPHRASE)
    assert not ring.state().follows_disk  # not loaded yet: no failure either
    assert ring.state().failure is None

    assert ring.current() is started
    state = ring.state()
    failure = state.failure
    assert failure is not None
    assert state.generation is started
    assert not state.follows_disk
    assert "signing.key is protected by a passphrase" in failure.reason
    assert str(folder) not in failure.reason  # shown on /readyz, which takes no token
    assert failure.since == failure.at
    # The chain it failed on, said: `keys rotate` tells a failure of its own rotation from
    # one an earlier rotation left, which the reload under way may mend (from review).
    assert failure.rotation == len(new.rotations) == 1
    assert "the keys folder changed (rotation 1) but" in keys_reload_check(state)

    now[0] += RETRY_SECONDS + 1  # tried again: still failing, since the first time
    assert ring.current() is started
    again = ring.failure
    assert again is not None
    assert again.since == failure.since
    assert again.at >= failure.at

    configured[0] = PASSPHRASE
    now[0] += RETRY_SECONDS + 1
    assert ring.current().keys.signing_public == new.signing_public
    assert ring.failure is None
    assert ring.state().follows_disk


def test_other_threads_keep_the_keys_in_use_while_one_reloads(tmp_path: Path) -> None:
    """Only the reloading thread waits (for the folder's lock, then Argon2id per key file):
    requests and /readyz go on meanwhile with the keys in use (from review: all stalled);
    a caller that needs the new keys (`wait=True`) waits for the reload."""
    folder = _folder(tmp_path)
    ring = _ring(folder)
    started = ring.current()
    _old, new = _rotate(folder)
    release = threading.Event()
    held = threading.Event()

    def hold_the_folder() -> None:  # as a rotation under way in another process does
        with keys_folder_lock(folder):
            held.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold_the_folder)
    holder.start()
    assert held.wait(timeout=10)
    results: dict[str, Generation] = {}

    def use(name: str, *, wait: bool = False) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, ring.current(wait=wait)))
        thread.start()
        return thread

    reloader = use("reloader")
    deadline = time.monotonic() + 10
    while not ring.state().reloading and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ring.state().reloading  # the first thread waits on the folder's lock
    others = [use(f"other{i}") for i in range(3)]
    for thread in others:
        thread.join(timeout=2)
        assert not thread.is_alive()  # answered at once, with the keys in use
    assert {results[f"other{i}"] is started for i in range(3)} == {True}
    needy = use("needy", wait=True)
    time.sleep(0.3)
    assert needy.is_alive()  # it needs the new keys: waits for the reload
    assert reloader.is_alive()

    release.set()
    for thread in (holder, reloader, needy):
        thread.join(timeout=30)
    assert results["reloader"].keys.signing_public == new.signing_public
    assert results["needy"] is results["reloader"]
    assert ring.current() is results["reloader"]
    assert not ring.state().reloading


def test_a_reload_that_brings_a_longer_chain_is_told_once(tmp_path: Path) -> None:
    """The node records it in the audit log (app/node.py); a failed reload tells nothing."""
    folder = _folder(tmp_path, PASSPHRASE)
    configured: list[bytes | None] = [None]
    now = [1000.0]
    ring = KeyRing(
        folder,
        IDENTITY,
        load_keys(folder, passphrase=PASSPHRASE),
        stamp=None,
        passphrase=lambda: configured[0],
        clock=lambda: now[0],
    )
    told: list[tuple[int, int]] = []
    ring.on_rotation = lambda before, after: told.append(
        (len(before.rotations), len(after.rotations))
    )
    _rotate(folder, PASSPHRASE)
    ring.current()
    assert told == []  # not loaded
    configured[0] = PASSPHRASE
    now[0] += RETRY_SECONDS + 1
    ring.current()
    ring.current()
    assert told == [(0, 1)]


def _stop_a_rotation_half_way(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After its chain, before its keys are put in place (a power cut)."""
    real_replace = keys_module.os.replace

    def power_cut(source: Path, target: Path) -> None:
        if str(source).endswith(".next"):
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(keys_module.os, "replace", power_cut)
    with pytest.raises(OSError, match="Input/output"):
        _rotate(folder)
    monkeypatch.undo()


def _recorded(node: Node) -> list[tuple[str, int]]:
    with node.sessions() as session:
        rows = session.execute(
            select(AuditEntry.actor, AuditEntry.entry)
            .where(AuditEntry.action == "key.rotated")
            .order_by(AuditEntry.idx)
        )
        return [(actor, json.loads(entry)["details"]["seq"]) for actor, entry in rows]


def test_a_rotation_made_to_take_effect_by_the_node_is_recorded_once(
    databases: Databases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes of a node (serve and a worker: two Nodes on one keys folder and one
    database) finish a stopped rotation at once: one `key.rotated` entry, actor node. The
    next command that loads the keys (the CLI's load_node) finishes another: recorded too,
    and the running processes that reload it afterwards add none (from review: no entry)."""
    local = LocalNode("ES/MJ", "Ministerio", tmp_path / "es", databases.new("es", migrated=True))
    local.init()
    settings = Settings(database_url=local.database_url, keys_dir=local.keys_dir)
    nodes = [load_node(settings), load_node(settings)]
    try:
        _stop_a_rotation_half_way(local.keys_dir, monkeypatch)
        with ThreadPoolExecutor(max_workers=4) as pool:
            kids = set(
                pool.map(
                    lambda i: nodes[i % 2].keyring.current(wait=True).keys.signing_kid, range(8)
                )
            )
        assert len(kids) == 1
        assert _recorded(nodes[0]) == [("node", 1)]
        # The entry names the rotation as the CLI's would.
        details = audit_rotation_details(nodes[0], 1)
        rotation = nodes[0].keys.rotations[0]
        assert details["new_signing_kid"] == rotation.new.signing_kid == nodes[0].keys.signing_kid
        assert details["old_signing_kid"] == rotation.old.signing_kid

        _stop_a_rotation_half_way(local.keys_dir, monkeypatch)
        cli = load_node(settings)  # `entraide keys show`, say: finishes it
        cli.close()
        assert _recorded(nodes[0]) == [("node", 1), ("node", 2)]
        for node in nodes:
            assert len(node.keyring.current(wait=True).keys.rotations) == 2
        assert _recorded(nodes[0]) == [("node", 1), ("node", 2)]
    finally:
        for node in nodes:
            node.close()


def audit_rotation_details(node: Node, seq: int) -> dict[str, object]:
    with node.sessions() as session:
        for entry in session.scalars(
            select(AuditEntry.entry).where(AuditEntry.action == "key.rotated")
        ):
            details: dict[str, object] = json.loads(entry)["details"]
            if details["seq"] == seq:
                return details
    raise AssertionError(f"no key.rotated entry for rotation {seq}")

"""A key rotation stopped half way (a full disk, a power cut) leaves a node that starts with a
consistent set of keys, and a rotation that can run again (from a recovery review: a retry
failed for ever on the retired key already saved, and a stop after the chain was written
left a node that would not start)."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from app.crypto import keyfile as keyfile_module
from app.crypto import keys as keys_module
from app.crypto.keys import (
    IDENTITY_FILE,
    ROTATIONS_FILE,
    NodeIdentity,
    NodeKeys,
    load_keys,
    protect_keys,
    rotate_keys,
    save_identity,
    save_keys,
)

OVERLAP = timedelta(days=7)


def _node_keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    save_keys(folder, NodeKeys.generate(), passphrase=None)
    return folder


def _rotate(folder: Path) -> tuple[NodeKeys, NodeKeys]:
    return rotate_keys(folder, authority_id="ES/MJ", passphrase=None, overlap=OVERLAP)


def test_a_rotation_stopped_before_its_chain_keeps_the_old_keys_and_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _node_keys(tmp_path)
    before = load_keys(folder)
    real_write = keys_module.write_private

    def full_disk(path: Path, content: bytes, *, replace: bool = False) -> None:
        if path.name == ROTATIONS_FILE:
            raise OSError(28, "No space left on device")
        real_write(path, content, replace=replace)

    monkeypatch.setattr(keys_module, "write_private", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _rotate(folder)
    monkeypatch.undo()
    after_crash = load_keys(folder)  # staged keys no chain names are not used
    assert after_crash.signing_public == before.signing_public
    assert after_crash.rotations == ()
    old, new = _rotate(folder)  # and a rotation runs again (writing over them)
    assert old.signing_public == before.signing_public
    assert len(new.rotations) == 1
    assert new.signing_public != before.signing_public


def test_a_rotation_stopped_after_its_chain_is_completed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _node_keys(tmp_path)
    before = load_keys(folder)
    real_replace = keys_module.os.replace
    moved: list[str] = []

    def power_cut(source: Path, target: Path) -> None:
        if str(source).endswith(".next"):
            if moved:  # the first staged key went in place, the second never does
                raise OSError(5, "Input/output error")
            moved.append(str(source))
        real_replace(source, target)

    monkeypatch.setattr(keys_module.os, "replace", power_cut)
    with pytest.raises(OSError, match="Input/output"):
        _rotate(folder)
    monkeypatch.undo()
    assert len(moved) == 1
    started = load_keys(folder)  # the chain names the staged keys: they go in place
    assert len(started.rotations) == 1
    assert started.signing_public == started.rotations[-1].new.signing
    assert started.encryption_public == started.rotations[-1].new.encryption
    assert started.signing_public != before.signing_public
    assert not list(folder.glob("*.next"))


def test_keys_loaded_while_a_rotation_runs_leave_its_staged_keys_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: a load (a doctor run, a worker starting) between the staging and the
    chain deleted the staged keys as leftovers; the chain then named keys that existed
    nowhere, and the node never started again."""
    folder = _node_keys(tmp_path)
    real_write = keys_module.write_private

    def load_meanwhile(path: Path, content: bytes, *, replace: bool = False) -> None:
        if path.name == ROTATIONS_FILE:
            load_keys(folder)  # another process, just before the chain is written
        real_write(path, content, replace=replace)

    monkeypatch.setattr(keys_module, "write_private", load_meanwhile)
    _old, new = _rotate(folder)
    monkeypatch.undo()
    started = load_keys(folder)
    assert started.signing_public == new.signing_public == new.rotations[-1].new.signing


def test_protecting_keys_finishes_or_removes_a_stopped_rotations_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: `keys protect` left staged keys unprotected, and the next start put
    them in place: a node whose signing and encryption keys were on disk in clear."""
    folder = _node_keys(tmp_path)
    real_replace = keys_module.os.replace

    def power_cut(source: Path, target: Path) -> None:
        if str(source).endswith(".next"):
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(keys_module.os, "replace", power_cut)
    with pytest.raises(OSError, match="Input/output"):
        _rotate(folder)
    monkeypatch.undo()
    passphrase = b"a long passphrase for the keys"
    protect_keys(folder, passphrase=passphrase)
    assert not list(folder.glob("*.next"))
    for name in ("signing.key", "encryption.key", "log.key"):
        assert json.loads((folder / name).read_text())["v"] == 2  # protected
    keys = load_keys(folder, passphrase=passphrase)
    assert keys.signing_public == keys.rotations[-1].new.signing


def test_keys_protect_during_a_rotation_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: `keys protect` run while a rotation was under way took its staged keys
    for leftovers and removed them; the chain then named keys that existed nowhere. The
    commands that change key files now take the keys folder's lock in turn."""
    folder = _node_keys(tmp_path)
    passphrase = b"a long passphrase for the keys"
    real_write = keys_module.write_private
    protecting: list[threading.Thread] = []

    def protect_meanwhile(path: Path, content: bytes, *, replace: bool = False) -> None:
        if path.name == ROTATIONS_FILE and not protecting:
            thread = threading.Thread(
                target=protect_keys, args=(folder,), kwargs={"passphrase": passphrase}
            )
            protecting.append(thread)
            thread.start()
            time.sleep(0.3)  # it would have run by now, were it not waiting
        real_write(path, content, replace=replace)

    monkeypatch.setattr(keys_module, "write_private", protect_meanwhile)
    _old, new = _rotate(folder)
    monkeypatch.undo()
    protecting[0].join(timeout=30)
    keys = load_keys(folder, passphrase=passphrase)  # protected after the rotation
    assert keys.signing_public == new.signing_public == keys.rotations[-1].new.signing


def test_a_failed_write_or_its_leftover_leaves_no_key_in_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _node_keys(tmp_path)

    def full_disk(_descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keyfile_module.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _rotate(folder)
    monkeypatch.undo()
    assert not list(folder.rglob("*.new"))  # the temporary file went with the failure
    # One left by an older version, or a kill between write and rename: protect removes it.
    (folder / "encryption.key.new").write_bytes(b"{}")
    protect_keys(folder, passphrase=b"a long passphrase for the keys")
    assert not list(folder.rglob("*.new"))


def _on_disk_record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """What reaches the disk, in order: ("sync", path) for each fsync (a file's or a
    folder's) and ("rename", target) for each os.replace."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        real_fsync(descriptor)
        events.append(("sync", os.readlink(f"/proc/self/fd/{descriptor}")))

    def replace(source: str | Path, target: str | Path) -> None:
        real_replace(source, target)
        events.append(("rename", str(Path(target).resolve())))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_retired_key_is_on_disk_before_the_new_keys_take_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: the retired encryption key (archived requests need it) was renamed into
    `retired/` and that folder never synced, so a power cut after the new keys were put in
    place could lose it, and every request sealed to it. Now every key file is durable,
    folder entry included, before the next step; and so are the files `init` writes."""
    folder = _node_keys(tmp_path).resolve()
    before = load_keys(folder)
    events = _on_disk_record(monkeypatch)
    _rotate(folder)
    retired = str(folder / "retired" / f"encryption-{before.encryption_kid}.key")
    in_place = events.index(("rename", str(folder / "encryption.key")))
    saved = events.index(("rename", retired))
    assert ("sync", retired + ".new") in events[:saved]  # its bytes, then its name
    assert ("sync", str(folder / "retired")) in events[saved:in_place]
    chain = events.index(("rename", str(folder / ROTATIONS_FILE)))
    assert ("sync", str(folder)) in events[chain:in_place]


def test_init_leaves_its_key_files_and_identity_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = (tmp_path / "keys").resolve()
    events = _on_disk_record(monkeypatch)
    save_keys(folder, NodeKeys.generate(), passphrase=None)
    save_identity(folder, NodeIdentity("ES/MJ", "Ministerio de Justicia", "https://es.example"))
    for name in ("signing.key", "encryption.key", "log.key", IDENTITY_FILE):
        written = next(
            i
            for i, event in enumerate(events)
            if event[1] in (str(folder / name), str(folder / (name + ".new")))
        )
        assert ("sync", str(folder)) in events[written + 1 :], name
    assert (folder / IDENTITY_FILE).stat().st_mode & 0o777 == 0o600

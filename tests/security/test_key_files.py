"""Acceptance 6: key files — permissions and optional passphrase protection — with real
`entraide` processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from app.crypto.keyfile import KeyFileError, decode_key_file, encode_key_file, read_passphrase
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry
from tests.security.conftest import new_node

PASSPHRASE = "correct horse battery staple, but longer"


def _serve(node: LocalNode, **env: str) -> tuple[int, str]:
    node.extra_env.update(env)
    result = node.cli("serve", "--port", str(node.port), check=False)
    return result.returncode, result.stdout + result.stderr


def test_a_key_file_readable_by_others_stops_the_node(tmp_path: Path) -> None:
    node = new_node(tmp_path)
    node.init()
    key = node.keys_dir / "signing.key"
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    code, output = _serve(node)
    assert code == 1
    assert f"{key} is accessible by group or others (mode 0644)" in output
    assert f"run: chmod 600 {key}" in output


def test_passphrase_protected_keys(tmp_path: Path) -> None:
    node = new_node(tmp_path, ENTRAIDE_KEY_PASSPHRASE=PASSPHRASE)
    node.init()
    for name in ("signing.key", "encryption.key", "log.key"):
        document = json.loads((node.keys_dir / name).read_bytes())
        assert document["v"] == 2
        assert "secret" not in document
        assert document["kdf"]["alg"] == "argon2id13"

    del node.extra_env["ENTRAIDE_KEY_PASSPHRASE"]
    code, output = _serve(node)
    assert code == 1
    assert "is protected by a passphrase; set ENTRAIDE_KEY_PASSPHRASE" in output

    code, output = _serve(node, ENTRAIDE_KEY_PASSPHRASE="not the passphrase")
    assert code == 1
    assert "does not open with the configured passphrase" in output
    assert "not the passphrase" not in output

    # From a file: refused while others can read it, used once it is private.
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o640)
    del node.extra_env["ENTRAIDE_KEY_PASSPHRASE"]
    code, output = _serve(node, ENTRAIDE_KEY_PASSPHRASE_FILE=str(secret))
    assert code == 1
    assert f"{secret} is accessible by group or others" in output
    secret.chmod(0o600)
    node.start()
    node.stop()
    assert PASSPHRASE not in node.log_path.read_text()


def test_keys_protect_encrypts_an_existing_node(tmp_path: Path) -> None:
    node = new_node(tmp_path)
    node.init()
    before = node.cli("keys", "show").stdout
    # A passphrase as short as a backup's may not be is refused, and nothing is rewritten.
    node.extra_env["ENTRAIDE_KEY_PASSPHRASE"] = "a" * 11
    short = node.cli("keys", "protect", check=False)
    assert short.returncode == 1
    assert "at least 12 characters" in short.stderr
    del node.extra_env["ENTRAIDE_KEY_PASSPHRASE"]
    assert node.cli("keys", "show").stdout == before  # still plain, still readable
    # Made long ago: protecting the keys does not make them new (their age is what
    # `doctor` advises rotation by; from review, every date was reset).
    for name in ("signing.key", "encryption.key", "log.key"):
        path = node.keys_dir / name
        document = json.loads(path.read_text())
        path.write_text(json.dumps({**document, "created_at": "2024-10-01T00:00:00Z"}))
    node.extra_env["ENTRAIDE_KEY_PASSPHRASE"] = PASSPHRASE
    assert "3 key files are protected" in node.cli("keys", "protect").stdout
    assert node.cli("keys", "show").stdout == before
    # On record, by whom (it was not, from review: a change to the key files).
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            protected = connection.execute(
                select(AuditEntry.actor).where(AuditEntry.action == "key.protected")
            ).all()
    finally:
        engine.dispose()
    assert len(protected) == 1
    assert protected[0].actor.startswith("operator:")
    for name in ("signing.key", "encryption.key", "log.key"):
        created = json.loads((node.keys_dir / name).read_text())["created_at"]
        assert created == "2024-10-01T00:00:00Z"
    advice = node.cli("doctor", check=False).stdout
    assert "the signing key is" in advice
    assert "the log key is" not in advice  # `keys rotate` keeps it: nothing to advise
    del node.extra_env["ENTRAIDE_KEY_PASSPHRASE"]
    assert node.cli("keys", "show", check=False).returncode == 1


def test_a_protected_file_of_one_kind_does_not_open_as_another() -> None:
    sealed = encode_key_file("encryption", bytes(range(32)), passphrase=b"pw")
    assert decode_key_file(sealed, kind="encryption", passphrase=b"pw")[0] == bytes(range(32))
    relabelled = json.dumps({**json.loads(sealed), "kind": "signing"}).encode()
    with pytest.raises(KeyFileError, match="is not a signing key file"):
        decode_key_file(relabelled, kind="signing", passphrase=b"pw")


def test_passphrase_sources(tmp_path: Path) -> None:
    assert read_passphrase(None, None) is None
    assert read_passphrase("x", None) == b"x"
    with pytest.raises(KeyFileError, match="not both"):
        read_passphrase("x", tmp_path / "file")
    with pytest.raises(KeyFileError, match="empty"):
        read_passphrase("", None)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\xff\xfe\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="not UTF-8"):
        read_passphrase(None, path)


def test_init_closes_a_keys_folder_that_was_already_there(tmp_path: Path) -> None:
    """The checkout ships `keys/` (its README and .gitignore), 0755 from git: `init` wrote its
    keys into it and left it open, so the node's own `doctor` failed straight after `init`
    (from an operator's review)."""
    node = new_node(tmp_path)
    node.keys_dir.mkdir(parents=True, mode=0o755)
    node.keys_dir.chmod(0o755)
    (node.keys_dir / "README.md").write_text("key material lives here\n")
    node.init()
    assert node.keys_dir.stat().st_mode & 0o777 == 0o700
    assert (node.keys_dir / "README.md").exists()

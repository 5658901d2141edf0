"""What a node and its commands write is readable by their own user only, whatever the umask
they start with: the database and its WAL (the audit trail, client names, addresses), audit
exports (case metadata), backups (a pre-existing partial file or a planted link does not
lend its mode), as key files already were."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.security.conftest import new_node, prepare


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_node_and_its_commands_write_for_their_user_only(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # the usual default: others may read what is created
    try:
        node = new_node(tmp_path, migrated=False)  # the database file is the node's to create
        prepare([node])
        node.stop()
        database = Path(node.database_url.removeprefix("sqlite:///"))
        written = [database, database.with_name(database.name + "-wal")]
        export = tmp_path / "export"
        node.cli("audit", "export", "--out", str(export))
        written += [export, *export.iterdir()]
        backup = tmp_path / "nightly.tar.gz"
        planted = tmp_path / "nightly.tar.gz.partial"
        planted.write_bytes(b"left over")
        os.chmod(planted, 0o644)
        node.cli("backup", "--out", str(backup))
        written.append(backup)
    finally:
        os.umask(previous)
    modes = {path.name: oct(_mode(path)) for path in written if path.exists()}
    assert database.name in modes
    expected = {
        path.name: oct(0o700 if path.is_dir() else 0o600) for path in written if path.exists()
    }
    assert modes == expected


def test_a_link_planted_as_the_backups_partial_file_is_not_followed(tmp_path: Path) -> None:
    node = new_node(tmp_path)
    node.init()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"must stay")
    (tmp_path / "nightly.tar.gz.partial").symlink_to(target)
    done = node.cli("backup", "--out", str(tmp_path / "nightly.tar.gz"), check=False)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == b"must stay"
    assert _mode(tmp_path / "nightly.tar.gz") == 0o600

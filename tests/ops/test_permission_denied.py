"""An operator's command run as a user who may not read the node's files (without the
`sudo -u entraide` of docs/operations.md §1, or as root without its privileges on a
root-squashed mount) says so in one line, and what to do; `doctor` goes on with its other
checks. From review: each printed a 56-line traceback ending in PermissionError, `doctor`
included, the very tool meant to say what is wrong.

The user without access is root with every capability dropped (`setpriv --bounding-set=-all`:
no CAP_DAC_OVERRIDE), the node's folder owned by another user with mode 0700, as it is when
the node runs as its own user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.localnodes import LocalNode

SETPRIV = shutil.which("setpriv")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None,
    reason="needs root and setpriv, to be root without the privilege of reading any file",
)
NOBODY = 65534
SAID = "permission denied: run the command as the user the node runs as"


@pytest.fixture(scope="module")
def closed_node(tmp_path_factory: pytest.TempPathFactory) -> LocalNode:
    base = tmp_path_factory.mktemp("closed")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", base / "es", f"sqlite:///{base}/es.db")
    node.init()
    for path in (node.keys_dir, *node.keys_dir.rglob("*")):
        os.chown(path, NOBODY, NOBODY)
    return node


def _unprivileged(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    return subprocess.run(
        [SETPRIV, "--bounding-set=-all", sys.executable, "-m", "app", *args],
        env=node.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "show"),
        ("backup", "--out", "{tmp}/backup.tar.gz"),
        ("migrate",),
        ("audit", "verify", "--db"),
        ("serve", "--port", "1"),
    ],
)
def test_a_command_that_may_not_read_the_keys_says_so(
    closed_node: LocalNode, tmp_path: Path, args: tuple[str, ...]
) -> None:
    done = _unprivileged(closed_node, *(arg.format(tmp=tmp_path) for arg in args))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "PermissionError" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: cannot read or write {closed_node.keys_dir}/")
    assert SAID in line


def test_doctor_says_which_file_it_may_not_read_and_checks_the_rest(
    closed_node: LocalNode,
) -> None:
    done = _unprivileged(closed_node, "doctor")
    assert "Traceback" not in done.stderr + done.stdout
    assert done.returncode == 1
    said = [line for line in done.stdout.splitlines() if SAID in line]
    assert said
    assert all(line.startswith("FAIL") for line in said)
    assert any(line.split()[1] == "keys" for line in said)
    # The database was readable: its own check ran, and found the node's schema.
    assert any(line.split()[1] == "database" for line in done.stdout.splitlines())


def test_doctor_names_files_the_nodes_user_may_not_read(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """From review: `restore` (or `init`) run as root leaves the keys and the SQLite file
    root's, mode 0600: the node, running as its own user, cannot read them, and `doctor`
    run as root said there was no problem. The keys folder's owner is the node's user."""
    base = tmp_path_factory.mktemp("owners")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", base / "es", f"sqlite:///{base}/es.db")
    node.init()
    os.chown(node.keys_dir, NOBODY, NOBODY)  # the service's folder; its files left root's
    done = subprocess.run(
        [sys.executable, "-m", "app", "doctor"],
        env=node.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    (line,) = [line for line in done.stdout.splitlines() if "not owned by" in line]
    assert line.startswith("FAIL  keys")
    assert str(node.keys_dir / "encryption.key") in line
    assert f"{base}/es.db," in line
    assert f"run: chown -R nobody {node.keys_dir} {base}/es.db*" in line

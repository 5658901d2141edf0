"""A node's processes raise their soft limit on open files to the hard one (up to 65,536):
at systemd's 1,024, one officer's uploads took every descriptor and the database could no
longer be synced (from review)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from app.localnodes import LocalNode
from app.openfiles import WANTED
from tests.conftest import migrated_sqlite
from tests.ops.nodes import serving

PROBE = (
    "import resource; from app.openfiles import raise_open_files_limit; "
    "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
)


def _lowered_to(soft: int) -> None:
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = WANTED if hard == resource.RLIM_INFINITY else min(hard, WANTED)
    if wanted <= 256:
        pytest.skip(f"this host's hard limit ({hard}) leaves nothing to raise")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: _lowered_to(256),
    )
    assert probe.stdout.split() == [str(wanted), str(wanted)]


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit in /proc")


def test_a_running_node_has_raised_it(tmp_path: Path) -> None:
    """`serve` started at a soft limit of 256, as a service manager may start it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = WANTED if hard == resource.RLIM_INFINITY else min(hard, WANTED)
    if wanted <= 256:
        pytest.skip(f"this host's hard limit ({hard}) leaves nothing to raise")
    node = LocalNode("ES/MJ", "x", tmp_path / "es", migrated_sqlite(tmp_path / "es.db"))
    node.init()
    with serving(node, preexec_fn=lambda: _lowered_to(256)) as process:
        assert _soft_limit(process.pid) == wanted

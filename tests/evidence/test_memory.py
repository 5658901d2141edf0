"""Memory stays flat: a part three times larger than the process may address streams through."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

LIMIT = 160 * 1024 * 1024
SIZE = 3 * LIMIT  # 480 MiB of plaintext, three times the whole address space allowed
HELPER = Path(__file__).with_name("_stream_under_limit.py")


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _run(size: int, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HELPER), str(root), str(size)],
        preexec_fn=_cap,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_part_far_larger_than_the_memory_limit_streams(tmp_path: Path) -> None:
    done = _run(SIZE, tmp_path / "blobs")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {**result, "size": SIZE, "match": True, "limit": LIMIT}
    assert result["peak_rss_kib"] < 100 * 1024


def test_the_limit_is_real(tmp_path: Path) -> None:
    """The same child, asked to hold more than the cap in memory, fails: the cap bites."""
    done = subprocess.run(
        [sys.executable, "-c", f"b = bytearray({LIMIT})"],
        preexec_fn=_cap,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "MemoryError" in done.stderr

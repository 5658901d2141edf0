"""`entraide requests ...` run as an officer at a terminal runs it: a process of its own,
given the node's URL and a token in its environment (and nothing else of the tests')."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping

from app.localnodes import run_entraide


def run_requests(
    url: str, token: str, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_entraide(
        ["requests", *args],
        {
            **{key: value for key, value in os.environ.items() if not key.startswith("ENTRAIDE_")},
            "ENTRAIDE_URL": url,
            "ENTRAIDE_TOKEN": token,
            **(env or {}),
        },
    )


def requests_output(url: str, token: str, *args: str, exit_code: int = 0) -> str:
    """Its stdout, or its stderr when it is to fail with `exit_code`."""
    done = run_requests(url, token, *args)
    assert done.returncode == exit_code, done.stderr
    return done.stdout if exit_code == 0 else done.stderr

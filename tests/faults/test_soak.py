"""The soak benchmark, small: run as an operator would, from the repository root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from app.migrate import ROOT

pytestmark = pytest.mark.e2e


def test_soak_loses_and_duplicates_nothing(request: pytest.FixtureRequest) -> None:
    command = [sys.executable, "bench/soak.py", "--requests", "30", "--seed", "4"]
    # Its own session, so that on a timeout its node and worker processes can be stopped
    # with it (it stops them itself on SIGTERM) instead of outliving the test.
    soak = subprocess.Popen(
        [*command, "--timeout", "120"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = soak.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(soak.pid, signal.SIGTERM)
        try:
            soak.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(soak.pid, signal.SIGKILL)
            soak.communicate()
        raise
    last = stdout.strip().splitlines()[-1] if stdout.strip() else "{}"
    figures = json.loads(last)
    request.node.user_properties.append(("soak", figures))
    assert soak.returncode == 0, (figures, stderr[-3000:])
    assert figures["sent"] == 30
    assert figures["delivered"] == 30
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["bad_receipts"] == 0
    faults = figures["faults"]
    assert faults["receiver_kills"] >= 1
    assert faults["worker_kills"] >= 1
    assert sum(faults.get(kind, 0) for kind in ("refuse", "cut", "stall", "drop", "hold")) > 0
    assert figures["workdir_removed"]

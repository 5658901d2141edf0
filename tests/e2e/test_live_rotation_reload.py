"""`entraide keys rotate` on a running node, when the reload does not go as planned
(operations.md §3): one node (AR) per test, `serve` without a delivery worker and an
`entraide worker` process beside it, on each database backend.

- A reload that fails (the keys protected by a passphrase the running node was not given)
  is said by /readyz, the metrics, `entraide doctor` and the CLI itself; restarted with the
  passphrase, the node and its worker follow.
- A rotation whose CLI stopped half way is finished by the running processes, and the audit
  log holds one `key.rotated` entry for it (actor node), one for a later rotation by the CLI.

(A rotation followed by three running nodes is test_live_rotation.py; two files, so that two
test processes share them.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry
from tests.conftest import BACKENDS, make_databases
from tests.e2e.conftest import wait_for
from tests.e2e.rotation import PASSPHRASE, Process, identity, start_worker

pytestmark = pytest.mark.e2e


# A rotation stopped by a power cut after its chain was written, before its keys were put in
# place (the CLI killed): `os._exit` where `rotate_keys` puts the staged keys in place.
STOPPED_ROTATION = """
import os, sys
from datetime import timedelta
from pathlib import Path
import app.crypto.keys as keys
keys._put_in_place = lambda *args: os._exit(137)
keys.rotate_keys(Path(sys.argv[1]), authority_id="AR/MPF", passphrase=None,
                 overlap=timedelta(days=30))
"""


@dataclass
class Solo:
    ar: LocalNode
    worker: Process
    worker_log: Path


def _stop_worker(worker: Process) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(timeout=20)


@pytest.fixture(params=BACKENDS)
def solo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Solo]:
    databases = make_databases(request.param, tmp_path)
    ar = LocalNode(
        "AR/MPF",
        "Ministerio Publico Fiscal",
        tmp_path / "ar",
        databases.new("ar"),
        extra_env={"ENTRAIDE_RUN_WORKER": "false"},
    )
    solo: Solo | None = None
    try:
        ar.init(clients={"auditor": ("auditor",), "monitor": ("monitor",)})
        ar.start()
        worker_log = ar.workdir / "worker.log"
        solo = Solo(ar, _start_worker_loaded(ar, worker_log), worker_log)
        yield solo
    finally:
        if solo is not None:
            _stop_worker(solo.worker)
        ar.stop()
        databases.drop_all()


def _start_worker_loaded(node: LocalNode, log_path: Path) -> Process:
    """`entraide worker`, once it has loaded its keys (else it would load those rotated
    meanwhile at its start, and there would be no reload to see)."""
    started = log_path.read_text().count("started") if log_path.exists() else 0
    worker = start_worker(node, log_path)
    wait_for("the worker", lambda: log_path.read_text().count("started") > started)
    return worker


def rotations_recorded(node: LocalNode) -> list[tuple[str, int]]:
    """Every `key.rotated` entry: its actor and the rotation's seq."""
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(AuditEntry.actor, AuditEntry.entry)
                .where(AuditEntry.action == "key.rotated")
                .order_by(AuditEntry.idx)
            )
            return [(actor, json.loads(entry)["details"]["seq"]) for actor, entry in rows]
    finally:
        engine.dispose()


def metric(node: LocalNode, name: str, **labels: str) -> float:
    text = node.metrics().text
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    line = f"{name}{{{wanted}}} " if labels else f"{name} "
    (found,) = [row for row in text.splitlines() if row.startswith(line)]
    return float(found.split()[-1])


def test_a_reload_that_fails_is_said_by_readyz_metrics_doctor_and_the_cli(solo: Solo) -> None:
    """The review's case: the node started without a passphrase; the operator protects the
    keys and rotates them with one. The node goes on with its old keys, consistently, and
    now every place an operator looks says so; restarted with the passphrase, it follows."""
    ar = solo.ar
    old = identity(ar)
    assert httpx.get(ar.url + "/readyz", timeout=10).json()["checks"]["keys_reload"] == "ok"
    ar.extra_env["ENTRAIDE_KEY_PASSPHRASE"] = PASSPHRASE  # the operator's shell only
    ar.cli("keys", "protect")
    before_rotation = time.time()
    rotated = ar.cli("keys", "rotate")

    # The CLI says what the node does, not what it should.
    assert "publishes the new keys" not in rotated.stdout
    assert f"still publishes signing key {old.signing.kid}" in rotated.stderr
    assert "protected by a passphrase" in rotated.stderr
    assert "its /readyz says: failing:" in rotated.stderr
    after = identity(ar)
    assert after.signing.kid == old.signing.kid  # consistent on its old keys

    ready = httpx.get(ar.url + "/readyz", timeout=10)
    assert ready.status_code == 200  # in service: see operations.md §3
    body = ready.json()
    assert body["status"] == "degraded"
    assert body["failing"] == ["keys_reload"]
    check = body["checks"]["keys_reload"]
    assert "the keys folder changed (rotation 1) but" in check  # this rotation's failure
    assert "signing.key is protected by a passphrase" in check
    assert f"publishes signing key {old.signing.kid} (rotation 0)" in check
    assert str(ar.keys_dir) not in check
    assert PASSPHRASE not in ready.text

    # The metrics: the failure, the chains, and the age of the keys in use (the old ones).
    assert metric(ar, "entraide_keys_reload_failed") == 1.0
    assert metric(ar, "entraide_key_rotations", keys="in_use") == 0.0
    assert metric(ar, "entraide_key_rotations", keys="on_disk") == 1.0
    assert metric(ar, "entraide_key_age_seconds", purpose="signing") > (
        time.time() - before_rotation
    )

    doctor = ar.cli("doctor", check=False)
    assert doctor.returncode == 1, doctor.stdout
    assert f"the node answering at {ar.url} does not use the keys of the files" in doctor.stdout
    assert f"publishes signing key {old.signing.kid} (rotation 0)" in doctor.stdout

    # Fixed: restarted with the passphrase, the node and its worker take the new keys up.
    _stop_worker(solo.worker)
    ar.stop()
    ar.start()
    solo.worker = _start_worker_loaded(ar, solo.worker_log)
    new = identity(ar)
    assert new.signing.kid != old.signing.kid
    assert new.rotation_path(old.signing.public_key) == list(new.rotations)
    ready = httpx.get(ar.url + "/readyz", timeout=10)
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    assert metric(ar, "entraide_keys_reload_failed") == 0.0
    assert metric(ar, "entraide_key_rotations", keys="in_use") == 1.0
    # Made after `before_rotation`, dated to the second (rounded down): at most 1 s older.
    assert metric(ar, "entraide_key_age_seconds", purpose="signing") < (
        time.time() - before_rotation + 1.0
    )
    doctor = ar.cli("doctor", check=False)
    assert f"the node answering at {ar.url} publishes these keys" in doctor.stdout
    # One entry, the operator's: the restarted processes found it (no second one, "node").
    ((actor, seq),) = rotations_recorded(ar)
    assert (actor.startswith("operator:"), seq) == (True, 1)


def test_a_stopped_rotation_finished_by_the_running_node_is_audited_once(solo: Solo) -> None:
    """A rotation whose CLI stopped after writing its chain: `serve` and the worker both see
    the chain change, one puts the staged keys in place, both take them up; the audit log
    gets one `key.rotated` entry (actor node), and a rotation made by the CLI afterwards one
    entry of its own (actor the operator), though the running processes reload it too."""
    ar = solo.ar
    old = identity(ar)
    stopped = subprocess.run(
        [sys.executable, "-c", STOPPED_ROTATION, str(ar.keys_dir)],
        env=ar.env(),
        capture_output=True,
        check=False,
    )
    assert stopped.returncode == 137, stopped.stderr
    assert list(ar.keys_dir.glob("*.next"))  # half way: the chain written, keys staged

    finished = identity(ar)  # serve's next use of its keys
    assert finished.signing.kid != old.signing.kid
    assert not list(ar.keys_dir.glob("*.next"))
    reloaded = f"signing key {old.signing.kid} -> {finished.signing.kid}"
    wait_for("the worker's reload", lambda: reloaded in solo.worker_log.read_text())
    assert reloaded in ar.log_path.read_text()
    assert rotations_recorded(ar) == [("node", 1)]

    rotated = ar.cli("keys", "rotate")
    assert "publishes the new keys (no restart needed)" in rotated.stdout
    newest = identity(ar)
    again = f"signing key {finished.signing.kid} -> {newest.signing.kid}"
    wait_for("the worker's second reload", lambda: again in solo.worker_log.read_text())
    assert again in ar.log_path.read_text()
    (actor, seq) = rotations_recorded(ar)[-1]
    assert (actor.startswith("operator:"), seq) == (True, 2)
    assert [seq for _actor, seq in rotations_recorded(ar)] == [1, 2]
    with ar.client("auditor") as http:  # the auditor's view, through the API
        listed = http.get("/api/v1/audit", params={"action": "key.rotated"}).json()["items"]
    assert sorted((item["actor"] == "node", item["details"]["seq"]) for item in listed) == [
        (False, 2),
        (True, 1),
    ]

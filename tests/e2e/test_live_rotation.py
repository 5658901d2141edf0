"""`entraide keys rotate` on a node that keeps running: no restart (operations.md §3).

Three real nodes, ES/MJ ↔ AR/MPF ↔ FR/DACG, on each database backend. AR's key files are
protected by a passphrase, and its deliveries are made by a separate `entraide worker`
process (`serve` runs none). Requests are exchanged, then AR's operator rotates its keys with
the CLI while `serve` and the worker run. Without a restart:

- AR's identity document publishes the new keys and the chain from the old signing key;
- FR, still pinning AR's old keys, seals to the old encryption key: accepted in the overlap
  period, and receipted with AR's new signing key (FR follows the rotation from it);
- ES, refreshing AR (`entraide peers refresh`), pins the new keys; its next request is sealed
  to AR's new encryption key, which the running node opens;
- AR's answer after the rotation is signed with its new key, delivered and receipted;
- the worker process follows the rotation too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.crypto.encoding import b64d
from app.crypto.identity import PeerIdentity, parse_identity_document
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry
from tests.conftest import BACKENDS, make_databases
from tests.e2e.conftest import EXAMPLE, audit_details, read_request, wait_delivered, wait_for

pytestmark = pytest.mark.e2e

PASSPHRASE = "a long passphrase for AR's keys"
ROLES = {role: (role,) for role in ("admin", "officer")}


@dataclass
class Trio:
    es: LocalNode
    ar: LocalNode
    fr: LocalNode
    worker_log: Path


def _start_worker(node: LocalNode, log_path: Path) -> subprocess.Popen[bytes]:
    """`entraide worker` beside the node's `serve`, as an operator scales out."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "app", "worker"],
            env=node.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _prepare(node: LocalNode) -> None:
    node.init(clients=ROLES)
    node.start()


@pytest.fixture(scope="module", params=BACKENDS)
def trio(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Trio]:
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    base = tmp_path_factory.mktemp("live-rotation")
    es = LocalNode("ES/MJ", "Ministerio de Justicia", base / "es", databases.new("es"))
    ar = LocalNode(
        "AR/MPF",
        "Ministerio Publico Fiscal",
        base / "ar",
        databases.new("ar"),
        extra_env={"ENTRAIDE_KEY_PASSPHRASE": PASSPHRASE, "ENTRAIDE_RUN_WORKER": "false"},
    )
    fr = LocalNode("FR/DACG", "Direction", base / "fr", databases.new("fr"))
    worker: subprocess.Popen[bytes] | None = None
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(_prepare, (es, ar, fr)))
        for left, right in ((es, ar), (ar, es), (ar, fr), (fr, ar)):
            left.pin(right)
        worker_log = ar.workdir / "worker.log"
        worker = _start_worker(ar, worker_log)
        yield Trio(es, ar, fr, worker_log)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=20)
        for node in (es, ar, fr):
            node.stop()
        databases.drop_all()


def submit(sender: LocalNode, to: str, text: str) -> str:
    body = json.loads(json.dumps(EXAMPLE))
    body["to"] = to
    body["document"]["requesting_authority"] = sender.authority_id
    body["document"]["requested_authority"] = to
    body["document"]["summary_of_facts"] = text
    with sender.client("officer") as http:
        response = http.post("/api/v1/requests", json=body)
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    return request_id


def answer(node: LocalNode, request_id: str, text: str) -> None:
    with node.client("officer") as http:
        body = {"document": {"type": "note", "text": text}}
        response = http.post(f"/api/v1/requests/{request_id}/messages", json=body)
    assert response.status_code == 201, response.text


def identity(node: LocalNode) -> PeerIdentity:
    document = httpx.get(node.url + "/.well-known/entraide/node", timeout=10).json()
    return parse_identity_document(document)


def header_of(message: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(b64d(message["header"]))
    return parsed


def receipt_signer(message: dict[str, Any]) -> str:
    signer: str = json.loads(b64d(message["receipt"]["receipt"]))["signer_kid"]
    return signer


def pinned(node: LocalNode, authority: str) -> dict[str, Any]:
    with node.client("admin") as http:
        peers = {peer["authority_id"]: peer for peer in http.get("/api/v1/admin/peers").json()}
    found: dict[str, Any] = peers[authority]
    return found


def test_a_running_node_follows_its_own_rotation_without_a_restart(trio: Trio) -> None:
    es, ar, fr = trio.es, trio.ar, trio.fr
    before = submit(es, "AR/MPF", "facts before the rotation")
    wait_delivered(es, before)
    answer(ar, before, "Noted before the rotation.")  # delivered by AR's worker process
    wait_delivered(ar, before)
    old = identity(ar)
    serving = ar.process
    assert serving is not None

    rotated = ar.cli("keys", "rotate", "--overlap-days", "7")  # while AR runs
    assert "no restart" in rotated.stdout

    # The same process publishes the new keys, chained from the old signing key.
    assert ar.process is serving
    assert serving.poll() is None
    new = identity(ar)
    assert new.signing.kid != old.signing.kid
    assert new.encryption.kid != old.encryption.kid
    assert new.log.kid == old.log.kid
    assert new.rotation_path(old.signing.public_key) == list(new.rotations)
    assert new.issued_at > old.issued_at

    # FR has not heard of it: sealed to AR's old encryption key, accepted in the overlap, and
    # receipted with AR's new signing key, from which FR follows the rotation.
    overlap = submit(fr, "AR/MPF", "sealed to the old key after the rotation")
    sent = wait_delivered(fr, overlap)
    assert header_of(sent["messages"][0])["to"]["enc_kid"] == old.encryption.kid
    assert receipt_signer(sent["messages"][0]) == new.signing.kid
    assert read_request(ar, overlap)["document"]["summary_of_facts"] == (
        "sealed to the old key after the rotation"
    )
    assert pinned(fr, "AR/MPF")["signing_kid"] == new.signing.kid

    # ES refreshes AR: it pins the new keys, and its next request is sealed to AR's new
    # encryption key, which only the reloaded private key opens.
    es.cli("peers", "refresh", "AR/MPF")
    assert (pinned(es, "AR/MPF")["signing_kid"], pinned(es, "AR/MPF")["encryption_kid"]) == (
        new.signing.kid,
        new.encryption.kid,
    )
    after = submit(es, "AR/MPF", "facts after the rotation")
    sent = wait_delivered(es, after)
    assert header_of(sent["messages"][0])["to"]["enc_kid"] == new.encryption.kid
    assert receipt_signer(sent["messages"][0]) == new.signing.kid
    assert read_request(ar, after)["document"]["summary_of_facts"] == "facts after the rotation"
    assert [entry["outcome"] for entry in audit_details(es, "peer.keys_changed")] == ["ok"]

    # AR's answer after the rotation: signed with the new key, delivered by the worker
    # process, receipted by ES; the request from before the rotation still reads on both.
    answer(ar, before, "Signed with the new key.")
    delivered = wait_delivered(ar, before)
    assert header_of(delivered["messages"][-1])["from"]["sig_kid"] == new.signing.kid
    history = wait_for(
        "the answer on ES",
        lambda: (d := read_request(es, before)) and len(d["messages"]) == 3 and d,
    )
    signers = [header_of(message)["from"]["sig_kid"] for message in history["messages"][1:]]
    assert signers == [old.signing.kid, new.signing.kid]
    assert read_request(ar, before)["document"]["summary_of_facts"] == "facts before the rotation"

    # Both of AR's processes say they took the new keys up (serve, and the worker).
    reloaded = f"signing key {old.signing.kid} -> {new.signing.kid}"
    assert reloaded in ar.log_path.read_text()
    wait_for("the worker's reload", lambda: reloaded in trio.worker_log.read_text())
    assert serving.poll() is None


# Below, one node (AR) per test, `serve` without a delivery worker and an `entraide worker`
# process beside it: what the operator sees when a reload fails, and the audit trail of a
# rotation that a running process, not the CLI, made take effect.

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
    worker: subprocess.Popen[bytes]
    worker_log: Path


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
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


def _start_worker_loaded(node: LocalNode, log_path: Path) -> subprocess.Popen[bytes]:
    """`entraide worker`, once it has loaded its keys (else it would load those rotated
    meanwhile at its start, and there would be no reload to see)."""
    started = log_path.read_text().count("started") if log_path.exists() else 0
    worker = _start_worker(node, log_path)
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
    assert f"the running node at {ar.url} does not use the keys of the files" in doctor.stdout
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
    assert f"the running node at {ar.url} publishes these keys" in doctor.stdout
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

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

A reload that fails, and a rotation stopped half way, are in test_live_rotation_reload.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.crypto.encoding import b64d
from app.localnodes import LocalNode
from tests.conftest import BACKENDS, make_databases
from tests.e2e.conftest import EXAMPLE, audit_details, read_request, wait_delivered, wait_for
from tests.e2e.rotation import PASSPHRASE, Process, identity, start_worker

pytestmark = pytest.mark.e2e

ROLES = {role: (role,) for role in ("admin", "officer")}


@dataclass
class Trio:
    es: LocalNode
    ar: LocalNode
    fr: LocalNode
    worker_log: Path


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
    worker: Process | None = None
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(_prepare, (es, ar, fr)))
        for left, right in ((es, ar), (ar, es), (ar, fr), (fr, ar)):
            left.pin(right)
        worker_log = ar.workdir / "worker.log"
        worker = start_worker(ar, worker_log)
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

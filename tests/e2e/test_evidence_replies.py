"""Large evidence in a reply, between real nodes: the requested authority executes a request
and returns its evidence streamed (tens of megabytes, resumable, never held whole in memory),
and the requesting authority receives it byte for byte, with the hashes the result attests,
and can prove to a court what it received.

Issue 6 is about evidence "from megabytes to tens of gigabytes", and evidence is what a
requested authority sends back: before this, a reply could carry only inline attachments.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.crypto.envelope import CHUNK_BYTES
from app.db import make_engine
from app.models import EvidenceDraft
from tests.e2e.conftest import (
    Network,
    audit_details,
    read_request,
    submit_example,
    wait_delivered,
    wait_for,
)
from tests.e2e.evidence import download, upload
from tests.requests_cli import requests_output

MIB = 1 << 20


def _evidence(ref: str, data: bytes, attachment: int) -> dict[str, Any]:
    return {
        "ref": ref,
        "description": "Mailbox export produced under the order",
        "obtained_at": "2026-11-19T15:00:00-03:00",
        "obtained_from": "Proveedor Ejemplo S.A.",
        "sha256": hashlib.sha256(data).hexdigest(),
        "attachment": attachment,
        "use_limitation": "Only in proceedings DP 1873/2026.",
    }


def _reply(node: Any, request_id: str, document: dict[str, Any]) -> None:
    with node.client("officer") as http:
        response = http.post(f"/api/v1/requests/{request_id}/messages", json={"document": document})
    assert response.status_code == 201, response.text


def _accepted_at_ar(network: Network) -> str:
    request_id = submit_example(network.es)
    wait_delivered(network.es, request_id)
    wait_for("the request at AR", lambda: read_request(network.ar, request_id))
    _reply(network.ar, request_id, {"type": "acknowledgement", "text": "Registered."})
    _reply(network.ar, request_id, {"type": "acceptance", "text": "Accepted."})
    return request_id


def _sent_result(network: Network, request_id: str, files: list[bytes]) -> str:
    """AR/MPF's officer: a result draft, its files uploaded in pieces, submitted."""
    body = {
        "document": {
            "type": "result",
            "text": "Executed. The provider's exports are attached.",
            "evidence": [_evidence(f"E-{n}", data, n) for n, data in enumerate(files, 1)],
        },
        "attachments": [
            {"name": f"export-{n}.mbox", "media_type": "application/mbox", "size": len(data)}
            for n, data in enumerate(files, 1)
        ],
    }
    with network.ar.client("officer") as http:
        created = http.post(f"/api/v1/requests/{request_id}/messages/drafts", json=body)
        assert created.status_code == 201, created.text
        draft = created.json()
        for item, data in zip(draft["attachments"], files, strict=True):
            upload(http, item["href"], data, piece=3 * MIB + 1)
        submitted = http.post(f"/api/v1/evidence/drafts/{draft['id']}/submit")
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["status"] == "executed"
    msg_id: str = draft["id"]
    return msg_id


def _message(node: Any, request_id: str, msg_id: str) -> dict[str, Any] | None:
    found = [m for m in read_request(node, request_id)["messages"] if m["msg_id"] == msg_id]
    return found[0] if found else None


def test_a_result_returns_streamed_evidence_byte_for_byte(network: Network, tmp_path: Path) -> None:
    request_id = _accepted_at_ar(network)
    sizes = [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1, 20 * MIB]
    files = [os.urandom(size) for size in sizes]

    msg_id = _sent_result(network, request_id, files)

    def receipted() -> dict[str, Any] | None:
        sent = _message(network.ar, request_id, msg_id)
        return sent if sent is not None and sent["receipt"] else None

    wait_for("the result's receipt at AR", receipted, timeout=120.0)
    received = _message(network.es, request_id, msg_id)
    assert received is not None
    assert (received["direction"], received["in_reply_to"]) == (
        "inbound",
        _last_before(network, request_id, msg_id),
    )
    assert read_request(network.es, request_id)["status"] == "executed"
    assert read_request(network.ar, request_id)["status"] == "executed"
    attested = [item["sha256"] for item in received["content"]["evidence"]]
    assert attested == [hashlib.sha256(data).hexdigest() for data in files]
    for entry, data in zip(received["attachments"], files, strict=True):
        assert (entry["size"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        got, shown = download(network.es, entry["href"])
        assert got == data
        assert shown == entry["sha256"]
    submitted = audit_details(network.ar, "message.submitted")[-1]
    assert (submitted["type"], submitted["streamed"]) == ("result", True)

    # The requesting authority proves to its court what it received: the proof checks the
    # file itself, offline, against what AR/MPF signed and ES/MJ receipted.
    with network.es.client("officer") as http:
        answer = http.get(f"/api/v1/requests/{request_id}/messages/{msg_id}/proof")
    assert answer.status_code == 200, answer.text
    proof = tmp_path / "proof.json"
    proof.write_text(answer.text)
    largest = tmp_path / "export-5.mbox"
    largest.write_bytes(files[-1])
    checked = network.es.cli(
        "proof", "verify", str(proof), "--file", str(largest), "--attachment", "5"
    )
    assert "is attachment 5" in checked.stdout
    assert "received by     ES/MJ" in checked.stdout


def _last_before(network: Network, request_id: str, msg_id: str) -> str:
    """The message the result follows at its sender: the acceptance sent just before it."""
    ids = [m["msg_id"] for m in read_request(network.ar, request_id)["messages"]]
    previous: str = ids[ids.index(msg_id) - 1]
    return previous


def test_the_cli_replies_with_evidence_and_the_requester_downloads_it(
    network: Network, tmp_path: Path
) -> None:
    request_id = _accepted_at_ar(network)
    files = []
    for name, size in (("export.mbox", 3 * MIB + 5), ("empty.csv", 0)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        files.append(path)
    attach = [argument for path in files for argument in ("--attach", str(path))]
    document = {
        "type": "result",
        "text": "Executed.",
        "evidence": [_evidence(f"E-{n}", p.read_bytes(), n) for n, p in enumerate(files, 1)],
    }
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps({"document": {**document, "evidence": [_evidence("E-1", b"other", 1)]}})
    )
    message = tmp_path / "result.json"
    message.write_text(json.dumps({"document": document}))
    drafts_before = _drafts(network.ar)

    # A hash that is not the file's: refused before a draft is made or a byte uploaded.
    refused = _entraide(network.ar, "reply", request_id, str(wrong), *attach, exit_code=2)
    assert "document.evidence[0] attests a SHA-256 that is not that of" in refused
    assert _drafts(network.ar) == drafts_before

    sent = _entraide(network.ar, "reply", request_id, str(message), *attach)
    assert sent.count("\n") == 1  # the message's id alone, for scripts
    msg_id = sent.strip()
    again = _entraide(
        network.ar, "reply", request_id, str(message), "--draft", msg_id, *attach, exit_code=1
    )
    assert f"it is message {msg_id} of request {request_id}" in again

    wait_for("the result at ES", lambda: _message(network.es, request_id, msg_id))
    listing = _entraide(network.es, "download", request_id, "--out", str(tmp_path / "got"))
    for path in files:
        assert (tmp_path / "got" / path.name).read_bytes() == path.read_bytes()
        assert f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}" in listing


def _drafts(node: Any) -> int:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            return len(connection.execute(select(EvidenceDraft.id)).all())
    finally:
        engine.dispose()


def _entraide(node: Any, *args: str, exit_code: int = 0) -> str:
    return requests_output(node.url, node.tokens["officer"], *args, exit_code=exit_code)

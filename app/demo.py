"""`entraide demo`: two real nodes carry a request through its life: acknowledgement, a
question and its answer, acceptance, execution with a result and its evidence, closure.

Everything goes through the same commands and HTTP APIs an operator and a case-management
system would use. At the end, every envelope signature and every receipt is checked again
here, independently of the nodes, against keys fetched from the nodes' identity documents
and checked against the fingerprints `entraide init` printed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.crypto.encoding import b64d
from app.crypto.identity import parse_identity_document
from app.crypto.keys import fingerprints_match
from app.crypto.receipts import decode_receipt, verify_receipt
from app.crypto.signing import DOMAIN_ENVELOPE, verify
from app.localnodes import LocalNode
from app.migrate import ROOT

EXAMPLE = ROOT / "docs" / "examples" / "request.json"
RESULT_TEXT = (
    "Production order executed on 20 November 2026. Banco del Plata S.A. produced the account "
    "opening file and statements for account 0000003100012345678901 (1 June to 31 October "
    "2026). Chain of custody: received from the bank by the Fiscalía on 19 November 2026.\n"
)


class DemoFailure(Exception):
    pass


def _say(event: str, detail: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp}  {event:<33} {detail}", flush=True)  # noqa: T201  # the demo's output


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise DemoFailure(f"timed out waiting for {what}")


def _trusted_keys(node: LocalNode) -> bytes:
    """The node's signing key, as a peer would get it: fetched, then checked against the pin."""
    identity = parse_identity_document(httpx.get(node.url + "/.well-known/entraide/node").json())
    if not fingerprints_match(node.fingerprint, identity.fingerprint):
        raise DemoFailure(f"{node.authority_id} presents a key that does not match its fingerprint")
    return identity.signing.public_key


def _verify_request(detail: dict[str, Any], keys: dict[str, bytes]) -> tuple[int, int]:
    signatures = receipts = 0
    for message in detail["messages"]:
        header = b64d(message["header"])
        if hashlib.sha256(header).hexdigest() != message["envelope_hash"]:
            raise DemoFailure(f"envelope hash mismatch for {message['msg_id']}")
        if not verify(keys[message["sender"]], DOMAIN_ENVELOPE, header, b64d(message["signature"])):
            raise DemoFailure(f"envelope signature of {message['msg_id']} does not verify")
        signatures += 1
        if message["direction"] == "outbound":
            if message["receipt"] is None:
                raise DemoFailure(f"no receipt for {message['msg_id']}")
            verify_receipt(
                decode_receipt(
                    {
                        "receipt": message["receipt"]["receipt"],
                        "signature": message["receipt"]["signature"],
                    }
                ),
                signer_public=keys[message["recipient"]],
                msg_id=message["msg_id"],
                envelope_hash=message["envelope_hash"],
                from_authority=message["sender"],
                to_authority=message["recipient"],
            )
            receipts += 1
    return signatures, receipts


class _Steps:
    """One lifecycle step at a time: a message from one side, then both nodes must show the
    same new status (each derives it from the same signed messages)."""

    def __init__(self, es: httpx.Client, ar: httpx.Client, request_id: str) -> None:
        self.es, self.ar, self.request_id = es, ar, request_id

    def send(
        self,
        sender: httpx.Client,
        document: dict[str, Any],
        status: str,
        event: str,
        attachments: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        path = f"/api/v1/requests/{self.request_id}/messages"
        body = {"document": document, "attachments": attachments or []}
        response = sender.post(path, json=body)
        if response.status_code != 201:
            raise DemoFailure(f"{document['type']} refused: {response.text}")

        def agreed() -> dict[str, Any] | None:
            es = self.es.get(f"/api/v1/requests/{self.request_id}").json()
            ar = self.ar.get(f"/api/v1/requests/{self.request_id}").json()
            return es if es["status"] == ar["status"] == status else None

        detail: dict[str, Any] = _wait_for(f"both nodes to show {status}", agreed)
        _say(status, f"{event}; both nodes show {status}")
        return detail


def _journey(spain: LocalNode, argentina: LocalNode) -> None:
    body = json.loads(EXAMPLE.read_text())
    with spain.client("officer") as es, argentina.client("officer") as ar:
        submitted = es.post("/api/v1/requests", json=body)
        if submitted.status_code != 201:
            raise DemoFailure(f"submission refused: {submitted.text}")
        request_id = submitted.json()["id"]
        _say("sent", f"ES/MJ → AR/MPF  request {request_id} (urgent, 1 attachment)")

        def delivered() -> dict[str, Any] | None:
            detail: dict[str, Any] = es.get(f"/api/v1/requests/{request_id}").json()
            return detail if detail["messages"][0]["receipt"] else None

        detail = _wait_for("the signed receipt", delivered)
        receipt = detail["messages"][0]["receipt"]
        _say(
            "delivered with receipt",
            f"signed by AR/MPF key {receipt['signer_kid'][:12]}…, "
            f"envelope {detail['messages'][0]['envelope_hash'][:16]}…",
        )

        inbox = ar.get("/api/v1/requests", params={"direction": "inbound"}).json()["items"]
        if [item["id"] for item in inbox] != [request_id]:
            raise DemoFailure("the request is not in AR/MPF's inbox")
        received = ar.get(f"/api/v1/requests/{request_id}").json()
        attachment = received["messages"][0]["attachments"][0]
        letter = ar.get(attachment["href"])
        if hashlib.sha256(letter.content).hexdigest() != attachment["sha256"]:
            raise DemoFailure("the attachment does not match its manifest hash")
        _say(
            "read by AR/MPF",
            f"{received['document']['request_type']}, {attachment['name']} "
            f"({attachment['size']} bytes, SHA-256 checked)",
        )

        step = _Steps(es, ar, request_id)
        step.send(
            ar,
            {"type": "acknowledgement", "text": "Registered as AR-MPF-2026-4417."},
            "acknowledged",
            "AR/MPF registered the request",
        )
        step.send(
            ar,
            {
                "type": "additional_information_request",
                "text": "Please confirm the period of the statements sought.",
            },
            "additional_information_requested",
            "AR/MPF asked a question",
        )
        step.send(
            es,
            {
                "type": "additional_information",
                "text": "From 1 August 2026 to the date of execution.",
            },
            "additional_information_supplied",
            "ES/MJ answered it",
        )
        step.send(
            ar,
            {"type": "acceptance", "text": "The request will be executed."},
            "accepted",
            "AR/MPF accepted the request",
        )
        report_bytes = RESULT_TEXT.encode()
        result = {
            "type": "result",
            "text": "Execution results attached.",
            "evidence": [
                {
                    "ref": "E1",
                    "description": "Execution report: bank records produced by Banco del Plata",
                    "obtained_at": "2026-11-19T15:00:00-03:00",
                    "obtained_from": "Banco del Plata S.A.",
                    "sha256": hashlib.sha256(report_bytes).hexdigest(),
                    "attachment": 1,
                    "use_limitation": "Only in proceedings DP 1873/2026 (Juzgado n.º 4 Valencia).",
                    "custody": [
                        {
                            "at": "2026-11-19T16:30:00-03:00",
                            "action": "received",
                            "by": "Fiscalía Nacional en lo Criminal y Correccional n.º 12",
                        }
                    ],
                }
            ],
        }
        executed = step.send(
            ar,
            result,
            "executed",
            "AR/MPF sent the result with 1 evidence item",
            attachments=[
                {
                    "name": "execution-report.txt",
                    "media_type": "text/plain",
                    "content_base64": base64.b64encode(report_bytes).decode(),
                }
            ],
        )
        last = executed["messages"][-1]
        report = last["attachments"][0]
        evidence = last["content"]["evidence"][0]
        downloaded = es.get(report["href"]).content
        if (
            downloaded != report_bytes
            or hashlib.sha256(downloaded).hexdigest() != evidence["sha256"]
        ):
            raise DemoFailure("the execution report does not match its attested hash")
        _say(
            "evidence checked",
            f"ES/MJ downloaded {report['name']}; its SHA-256 is the attested one",
        )
        step.send(
            es,
            {"type": "closure", "text": "Results received; the request is closed."},
            "closed",
            "ES/MJ closed the request",
        )

        # Both sides' receipts must have been stored before we check them all.
        def all_receipted() -> bool:
            for http in (es, ar):
                detail = http.get(f"/api/v1/requests/{request_id}").json()
                for message in detail["messages"]:
                    if message["direction"] == "outbound" and message["receipt"] is None:
                        return False
            return True

        _wait_for("every receipt", all_receipted)
        keys = {"ES/MJ": _trusted_keys(spain), "AR/MPF": _trusted_keys(argentina)}
        signatures = receipts = 0
        for http in (es, ar):
            counted = _verify_request(http.get(f"/api/v1/requests/{request_id}").json(), keys)
            signatures += counted[0]
            receipts += counted[1]
        _say(
            "verified",
            f"all {signatures} envelope signatures and {receipts} receipts verified "
            "against the pinned keys",
        )


def run_demo(workdir: Path | None = None) -> int:
    base = workdir or Path(tempfile.mkdtemp(prefix="entraide-demo-"))
    spain = LocalNode(
        "ES/MJ",
        "Ministerio de Justicia (España)",
        base / "es-mj",
        f"sqlite:///{base / 'es-mj' / 'node.db'}",
    )
    argentina = LocalNode(
        "AR/MPF",
        "Ministerio Público Fiscal (Argentina)",
        base / "ar-mpf",
        f"sqlite:///{base / 'ar-mpf' / 'node.db'}",
    )
    try:
        for node in (spain, argentina):
            node.init(clients={"admin": ("admin",), "officer": ("officer",)})
            node.start()
            _say("node up", f"{node.authority_id} at {node.url}, fingerprint {node.fingerprint}")
        spain.pin(argentina)
        argentina.pin(spain)
        _say("pinned", "each node checked the other's fingerprint and pinned its keys")
        _journey(spain, argentina)
    except (DemoFailure, RuntimeError, httpx.HTTPError) as exc:
        _say("FAILED", str(exc))
        for node in (spain, argentina):
            _say("log", f"{node.authority_id}: {node.log_path}")
        return 1
    finally:
        for node in (spain, argentina):
            node.stop()
    _say("done", "both nodes stopped")
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0

"""The `exchange` service of docker-compose.yml: show two pinned nodes exchanging a request.

ES/MJ's case system submits docs/examples/request.json to AR/MPF; the script waits for the
signed receipt, reads the request in AR/MPF's inbox, has AR/MPF acknowledge it and waits for
ES/MJ to see the acknowledgement. Tokens come from the files the init services wrote.
Environment: ES_URL, AR_URL, SHARED_DIR. Exit 0 only if all of it happened.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 120.0


def say(text: str) -> None:
    sys.stdout.write(f"[exchange] {text}\n")
    sys.stdout.flush()


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"[exchange] FAILED: timed out waiting for {what}")


def client(url: str, token_file: Path) -> httpx.Client:
    token = token_file.read_text().strip()
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30.0)


def main() -> int:
    shared = Path(os.environ["SHARED_DIR"])
    es_url, ar_url = os.environ["ES_URL"], os.environ["AR_URL"]
    body = json.loads((ROOT / "docs" / "examples" / "request.json").read_text())
    with (
        client(es_url, shared / "es.officer.token") as es,
        client(ar_url, shared / "ar.officer.token") as ar,
    ):
        for http in (es, ar):
            wait_for(f"{http.base_url} to be ready", lambda h=http: h.get("/readyz").is_success)
        submitted = es.post("/api/v1/requests", json=body)
        if submitted.status_code != 201:
            say(f"FAILED: ES/MJ refused the submission: HTTP {submitted.status_code}")
            return 1
        request_id = submitted.json()["id"]
        say(
            f"ES/MJ sent request {request_id} to AR/MPF "
            f"(request id {submitted.headers.get('x-request-id')})"
        )
        detail = wait_for(
            "the signed receipt",
            lambda: (
                (d := es.get(f"/api/v1/requests/{request_id}").json())["messages"][0]["receipt"]
                and d
            ),
        )
        receipt = detail["messages"][0]["receipt"]
        say(f"delivered: AR/MPF signed the receipt with key {receipt['signer_kid'][:12]}")
        received = wait_for(
            "the request in AR/MPF's inbox",
            lambda: ar.get(f"/api/v1/requests/{request_id}").json().get("document"),
        )
        say(
            f"AR/MPF decrypted it: {received['request_type']}, urgency "
            f"{received['urgency']['level']}"
        )
        ack = {"document": {"type": "acknowledgement", "text": "Registered."}}
        if ar.post(f"/api/v1/requests/{request_id}/messages", json=ack).status_code != 201:
            say("FAILED: AR/MPF could not acknowledge")
            return 1
        wait_for(
            "the acknowledgement at ES/MJ",
            lambda: es.get(f"/api/v1/requests/{request_id}").json()["status"] == "acknowledged",
        )
        say("ES/MJ sees the request acknowledged: the exchange works")
    return 0


if __name__ == "__main__":
    sys.exit(main())

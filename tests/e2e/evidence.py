"""Two real nodes for the large-evidence tests, and what those tests do through the local
API: create a draft, upload its attachments in pieces, submit it, wait for its receipt,
download an attachment back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.crypto.envelope import CHUNK_BYTES
from app.localnodes import LocalNode
from tests.conftest import Databases, make_databases
from tests.e2e.conftest import EXAMPLE, wait_for

CHUNK = CHUNK_BYTES
MIB = 1 << 20


class Pair:
    def __init__(self, es: LocalNode, ar: LocalNode, databases: Databases) -> None:
        self.es, self.ar, self.databases = es, ar, databases


def _prepare(node: LocalNode) -> None:
    node.init(clients={"admin": ("admin",), "officer": ("officer",)})
    node.start()


@contextmanager
def evidence_pair(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """ES/MJ and AR/MPF on `backend`, each pinning the other, stopped and dropped after."""
    databases = make_databases(backend, tmp_path_factory.mktemp("db"))
    base = tmp_path_factory.mktemp("nodes")
    es = LocalNode("ES/MJ", "Ministerio de Justicia", base / "es", databases.new("es"))
    ar = LocalNode("AR/MPF", "Ministerio Publico Fiscal", base / "ar", databases.new("ar"))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # side by side: each mostly waits
            list(pool.map(_prepare, (es, ar)))
        es.pin(ar)
        ar.pin(es)
        yield Pair(es, ar, databases)
    finally:
        for node in (es, ar):
            node.stop()
        databases.drop_all()


def blob_dir(node: LocalNode) -> Path:
    return node.workdir / "blobs"


def newest_blob(node: LocalNode, length: int) -> Path:
    """The newest blob of this ciphertext length: the part a test has just sent."""
    blobs = [p for p in (blob_dir(node) / "blobs").rglob("*") if p.is_file()]
    return max((p for p in blobs if p.stat().st_size == length), key=lambda p: p.stat().st_mtime_ns)


def create_draft(node: LocalNode, sizes: list[int]) -> dict[str, Any]:
    body = json.loads(json.dumps(EXAMPLE))
    del body["attachments"]
    body["attachments"] = [
        {"name": f"evidence-{n}.bin", "media_type": "application/octet-stream", "size": size}
        for n, size in enumerate(sizes, 1)
    ]
    with node.client("officer") as http:
        response = http.post("/api/v1/evidence/drafts", json=body)
    assert response.status_code == 201, response.text
    draft: dict[str, Any] = response.json()
    return draft


def head_offset(http: httpx.Client, href: str) -> int:
    response = http.head(href)
    assert response.status_code == 204, response.status_code
    return int(response.headers["upload-offset"])


def upload(http: httpx.Client, href: str, data: bytes, piece: int) -> int:
    """PATCH in requests of `piece` bytes, each resuming from the node's answer; returns
    the number of bytes sent in all."""
    sent = 0
    offset = head_offset(http, href)
    while True:
        body = data[offset : offset + piece]
        response = http.patch(href, content=body, headers={"upload-offset": str(offset)})
        assert response.status_code == 204, response.text
        sent += len(body)
        offset = int(response.headers["upload-offset"])
        if response.headers["upload-complete"] == "?1":
            return sent


def submit(node: LocalNode, draft_id: str) -> dict[str, Any]:
    with node.client("officer") as http:
        response = http.post(f"/api/v1/evidence/drafts/{draft_id}/submit")
    assert response.status_code == 201, response.text
    submitted: dict[str, Any] = response.json()
    return submitted


def detail(node: LocalNode, request_id: str) -> dict[str, Any] | None:
    with node.client("officer") as http:
        response = http.get(f"/api/v1/requests/{request_id}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def wait_receipt(node: LocalNode, request_id: str, timeout: float = 120.0) -> dict[str, Any]:
    def receipted() -> dict[str, Any] | None:
        found = detail(node, request_id)
        return found if found and found["messages"][0]["receipt"] else None

    result: dict[str, Any] = wait_for("the receipt", receipted, timeout=timeout)
    return result


def download(node: LocalNode, href: str) -> tuple[bytes, str]:
    with node.client("officer") as http, http.stream("GET", href) as response:
        assert response.status_code == 200, response.read()
        data = b"".join(response.iter_bytes())
        return data, response.headers["x-entraide-sha256"]


def delivery_of(node: LocalNode, request_id: str) -> dict[str, Any]:
    with node.client("admin") as http:
        response = http.get("/api/v1/admin/deliveries", params={"limit": 20})
    assert response.status_code == 200, response.text
    found = [d for d in response.json()["items"] if d["request_id"] == request_id]
    assert len(found) == 1, found
    delivery: dict[str, Any] = found[0]
    return delivery

"""Real node processes on loopback, one small network per database backend and module."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select

from app.crypto.envelope import Recipient
from app.crypto.identity import parse_identity_document
from app.crypto.keys import NodeKeys, load_keys
from app.db import make_engine
from app.localnodes import LocalNode
from app.migrate import ROOT
from app.models import AuditEntry, Message
from tests.conftest import BACKENDS, Databases, make_databases

EXAMPLE = json.loads((ROOT / "docs" / "examples" / "request.json").read_text())


@dataclass
class Network:
    backend: str
    es: LocalNode  # requesting authority
    ar: LocalNode  # requested authority
    fr: LocalNode  # a third pinned node, for forwarding attacks
    databases: Databases

    def engine(self, node: LocalNode) -> Engine:
        return make_engine(node.database_url)


def _prepare(node: LocalNode) -> None:
    node.init(clients={role: (role,) for role in ("admin", "officer", "auditor")})
    node.start()


@pytest.fixture(scope="module", params=BACKENDS)
def network(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Network]:
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    base = tmp_path_factory.mktemp("nodes")
    nodes = [
        LocalNode(authority, name, base / label, databases.new(label, migrated=True))
        for authority, name, label in (
            ("ES/MJ", "Ministerio de Justicia", "es"),
            ("AR/MPF", "Ministerio Publico Fiscal", "ar"),
            ("FR/DACG", "Direction des affaires criminelles", "fr"),
        )
    ]
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(_prepare, nodes))
        es, ar, fr = nodes
        es.pin(ar)
        ar.pin(es)
        ar.pin(fr)
        fr.pin(ar)
        yield Network(request.param, es, ar, fr, databases)
    finally:
        for node in nodes:
            node.stop()
        databases.drop_all()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def submit_example(node: LocalNode, **changes: Any) -> str:
    body = json.loads(json.dumps(EXAMPLE))
    body["document"].update(changes)
    with node.client("officer") as http:
        response = http.post("/api/v1/requests", json=body)
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    return request_id


def read_request(node: LocalNode, request_id: str) -> dict[str, Any]:
    with node.client("officer") as http:
        response = http.get(f"/api/v1/requests/{request_id}")
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    return detail


def wait_delivered(node: LocalNode, request_id: str) -> dict[str, Any]:
    def delivered() -> dict[str, Any] | None:
        detail = read_request(node, request_id)
        outbound = [m for m in detail["messages"] if m["direction"] == "outbound"]
        return detail if all(m["receipt"] for m in outbound) else None

    result: dict[str, Any] = wait_for("delivery with receipt", delivered)
    return result


def count_messages(network: Network, node: LocalNode, direction: str = "inbound") -> int:
    engine = network.engine(node)
    try:
        with engine.connect() as connection:
            statement = select(func.count()).select_from(Message)
            return int(connection.scalar(statement.where(Message.direction == direction)) or 0)
    finally:
        engine.dispose()


def audit_outcomes(network: Network, node: LocalNode, action: str) -> list[str]:
    engine = network.engine(node)
    try:
        with engine.connect() as connection:
            rows = connection.scalars(
                select(AuditEntry.outcome)
                .where(AuditEntry.action == action)
                .order_by(AuditEntry.idx)
            )
            return list(rows)
    finally:
        engine.dispose()


def audit_details(node: LocalNode, action: str) -> list[dict[str, Any]]:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(AuditEntry.entry, AuditEntry.outcome)
                .where(AuditEntry.action == action)
                .order_by(AuditEntry.idx)
            )
            return [
                {**(json.loads(entry).get("details") or {}), "outcome": outcome}
                for entry, outcome in rows
            ]
    finally:
        engine.dispose()


def post_envelope(node: LocalNode, wire: object) -> httpx.Response:
    return httpx.post(node.url + "/p2p/v1/envelopes", json=wire, timeout=30.0)


def read_bytes(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def recipient_of(node: LocalNode) -> Recipient:
    """A node's encryption key as its identity document publishes it."""
    document = httpx.get(node.url + "/.well-known/entraide/node").json()
    identity = parse_identity_document(document)
    return Recipient(identity.authority_id, identity.encryption.public_key)


@pytest.fixture(scope="module")
def es_keys(network: Network) -> NodeKeys:
    return load_keys(network.es.keys_dir)


@pytest.fixture(scope="module")
def ar_recipient(network: Network) -> Recipient:
    return recipient_of(network.ar)

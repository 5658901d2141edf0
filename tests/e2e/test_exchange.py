"""The first whole journey between two real nodes, and what must never be at rest in clear."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from contextlib import suppress
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import inspect, text

from app.crypto.encoding import b64d
from app.crypto.identity import parse_identity_document
from app.crypto.receipts import decode_receipt, verify_receipt
from app.crypto.signing import DOMAIN_ENVELOPE, verify
from app.db import make_engine
from tests.conftest import PG_ADMIN
from tests.e2e.conftest import (
    EXAMPLE,
    Network,
    read_request,
    submit_example,
    wait_delivered,
    wait_for,
)
from tests.e2e.lifecycle import (  # noqa: F401  # collected here, on this module's network
    test_the_full_life_of_a_request_seen_alike_by_both_nodes,
)
from tests.test_routes import api_routes, is_public


def _signing_key(url: str) -> bytes:
    return parse_identity_document(
        httpx.get(url + "/.well-known/entraide/node").json()
    ).signing.public_key


def test_request_acknowledgement_and_result_round_trip(network: Network) -> None:
    es, ar = network.es, network.ar
    request_id = submit_example(es)
    sent = wait_delivered(es, request_id)
    assert sent["status"] == "delivered"

    received = read_request(ar, request_id)
    assert received["direction"] == "inbound"
    assert received["status"] == "delivered"  # the same status on both nodes
    assert received["document"] == EXAMPLE["document"] | received["document"]
    assert received["document"]["summary_of_facts"] == EXAMPLE["document"]["summary_of_facts"]
    attachment = received["messages"][0]["attachments"][0]
    with ar.client("officer") as http:
        letter = http.get(attachment["href"])
        assert letter.status_code == 200
        assert letter.content == base64.b64decode(EXAMPLE["attachments"][0]["content_base64"])
        assert letter.headers["x-entraide-sha256"] == hashlib.sha256(letter.content).hexdigest()

        ack = {"document": {"type": "acknowledgement", "text": "Registered."}}
        assert http.post(f"/api/v1/requests/{request_id}/messages", json=ack).status_code == 201
        accept = {"document": {"type": "acceptance", "text": "Accepted."}}
        assert http.post(f"/api/v1/requests/{request_id}/messages", json=accept).status_code == 201
        result = {
            "document": {"type": "result", "text": "Results attached."},
            "attachments": [
                {
                    "name": "report.txt",
                    "media_type": "text/plain",
                    "content_base64": base64.b64encode(b"bank records").decode(),
                }
            ],
        }
        assert http.post(f"/api/v1/requests/{request_id}/messages", json=result).status_code == 201

    answered = wait_for(
        "the answer", lambda: (d := read_request(es, request_id))["status"] == "executed" and d
    )
    assert [m["content"].get("type") for m in answered["messages"][1:]] == [
        "acknowledgement",
        "acceptance",
        "result",
    ]
    with es.client("officer") as http:
        assert (
            http.get(answered["messages"][3]["attachments"][0]["href"]).content == b"bank records"
        )

    # Every envelope signature and receipt checks against keys fetched from the other node.
    keys = {"ES/MJ": _signing_key(es.url), "AR/MPF": _signing_key(ar.url)}
    wait_delivered(ar, request_id)
    checked = 0
    for node in (es, ar):
        for message in read_request(node, request_id)["messages"]:
            header = b64d(message["header"])
            assert verify(
                keys[message["sender"]], DOMAIN_ENVELOPE, header, b64d(message["signature"])
            )
            if message["direction"] == "outbound":
                receipt = message["receipt"]
                verify_receipt(
                    decode_receipt(
                        {"receipt": receipt["receipt"], "signature": receipt["signature"]}
                    ),
                    signer_public=keys[message["recipient"]],
                    msg_id=message["msg_id"],
                    envelope_hash=message["envelope_hash"],
                    from_authority=message["sender"],
                    to_authority=message["recipient"],
                )
                checked += 1
    assert checked == 4


def _database_dump(url: str) -> bytes:
    """Every value of every table, as the database returns it."""
    engine = make_engine(url)
    chunks: list[bytes] = []
    try:
        with engine.connect() as connection:
            for table in inspect(connection).get_table_names():
                for row in connection.execute(text(f'SELECT * FROM "{table}"')):  # noqa: S608
                    for value in row:
                        chunks.append(value if isinstance(value, bytes) else str(value).encode())
    finally:
        engine.dispose()
    return b"\n".join(chunks)


def _postgres_files(url: str) -> bytes:
    """The raw files of a PostgreSQL database, after a checkpoint flushed them to disk."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute("CHECKPOINT")
        oid = connection.execute(
            "SELECT oid FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        data_dir = connection.execute("SHOW data_directory").fetchone()
    assert oid is not None
    assert data_dir is not None
    found = b""
    base = Path(data_dir[0]) / "base" / str(oid[0])
    wal = Path(data_dir[0]) / "pg_wal"
    for path in [*base.iterdir(), *wal.glob("0*")]:
        # Another test's checkpoint (its DROP DATABASE) may recycle a WAL file meanwhile.
        with suppress(FileNotFoundError):
            found += path.read_bytes()
    return found


def test_no_plaintext_of_content_at_rest(network: Network) -> None:
    marker = f"MARKER{uuid.uuid4().hex}"
    attachment_marker = f"ATTACHED{uuid.uuid4().hex}"
    facts = f"{EXAMPLE['document']['summary_of_facts']} {marker}"
    body_attachments = [
        {
            "name": "evidence.txt",
            "media_type": "text/plain",
            "content_base64": base64.b64encode(attachment_marker.encode() * 50).decode(),
        }
    ]
    payload = json.loads(json.dumps(EXAMPLE))
    payload["document"]["summary_of_facts"] = facts
    payload["attachments"] = body_attachments
    with network.es.client("officer") as http:
        response = http.post("/api/v1/requests", json=payload)
    assert response.status_code == 201, response.text
    request_id = response.json()["id"]
    wait_delivered(network.es, request_id)
    # The recipient reads it too: decryption for a reader must not leave plaintext behind.
    assert marker in read_request(network.ar, request_id)["document"]["summary_of_facts"]

    needles = [marker.encode(), attachment_marker.encode()]
    for node in (network.es, network.ar):
        stores = [_database_dump(node.database_url)]
        if network.backend == "sqlite":
            db_file = Path(node.database_url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                candidate = Path(str(db_file) + suffix)
                if candidate.exists():
                    stores.append(candidate.read_bytes())
        else:
            stores.append(_postgres_files(node.database_url))
        # Everything else the node wrote: keys directory, logs.
        for path in node.workdir.rglob("*"):
            if path.is_file() and not path.name.startswith("node.db"):
                stores.append(path.read_bytes())
        for store in stores:
            for needle in needles:
                assert needle not in store, f"plaintext found at rest on {node.authority_id}"


BAD_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"authorization": "Bearer ent_not-a-real-token"},
    {"authorization": "Basic eDp5"},
]


def test_every_route_but_public_ones_requires_a_token(network: Network) -> None:
    checked = 0
    protected = [route for route in api_routes() if not is_public(route)]
    for route in protected:
        concrete = route.path.replace("{request_id}", "0" * 32).replace("{msg_id}", "0" * 32)
        concrete = concrete.replace("{index}", "1").replace("{draft_id}", "0" * 32)
        for method in route.methods:
            for headers in BAD_CREDENTIALS:
                url = network.es.url + concrete
                response = httpx.request(method, url, headers=headers, json={})
                assert response.status_code == 401, (method, route.path, response.text)
                if method != "HEAD":  # an answer to HEAD has no body
                    assert response.json()["error"] in {"missing_token", "invalid_token"}
                checked += 1
    assert checked == len(BAD_CREDENTIALS) * sum(len(route.methods) for route in protected)
    assert checked >= 3 * 14
    for path in ("/.well-known/entraide/node", "/healthz", "/readyz"):
        assert httpx.get(network.es.url + path).status_code == 200


def test_cli_refuses_a_wrong_fingerprint(network: Network) -> None:
    wrong = "00" * 32
    result = network.es.cli("peers", "add", network.fr.url, "--fingerprint", wrong, check=False)
    assert result.returncode == 1
    assert "different key than the fingerprint" in result.stderr
    listed = network.es.cli("peers", "list").stdout
    assert "FR/DACG" not in listed
    assert "AR/MPF" in listed

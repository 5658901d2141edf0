"""Upgrading a node that ran the first release: nothing is lost, on SQLite and PostgreSQL.

The database is built at the first migration and filled the way that release filled it: rows
shaped by that revision's schema (written with `sa.table`, not with today's models), audit
entries in that release's format (no `prev_leaf` link), a pinned peer, API clients, and an
outbound request sealed for the peer and queued in the outbox. Then `alembic upgrade head`.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from app.audit.checkpoints import sign_checkpoint
from app.audit.log import record
from app.audit.merkle import CompactRange, leaf_hash
from app.audit.service import verify_database
from app.auth.service import Principal, Role, authenticate, hash_token
from app.config import Settings
from app.crypto.encoding import canonical_json, format_time, sha256_hex
from app.crypto.envelope import Attachment, Recipient, parse_header, seal
from app.crypto.identity import build_identity_document, parse_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, save_identity, save_keys
from app.crypto.randomness import SystemRandomness
from app.db import make_engine, unit_of_work
from app.delivery.outbox import priority_of
from app.migrate import pending, upgrade
from app.node import load_node
from app.requests.service import read_request
from tests.conftest import Databases
from tests.e2e.conftest import EXAMPLE

FIRST = "b6bdb22bb194"
OFFICER_TOKEN = "first-release-officer-token-0123456789abcdef"  # test data
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)

# The first revision's tables, as that revision created them (only what we write).
dt = sa.DateTime(timezone=True)
PEERS = sa.table(
    "peers",
    *(sa.column(name) for name in ("id", "authority_id", "name", "public_url", "fingerprint")),
    *(sa.column(name) for name in ("signing_kid", "encryption_kid", "log_kid")),
    *(sa.column(name, sa.LargeBinary()) for name in ("signing_key", "encryption_key", "log_key")),
    sa.column("identity_document", sa.LargeBinary()),
    sa.column("identity_signature", sa.LargeBinary()),
    sa.column("added_at", dt),
    sa.column("updated_at", dt),
)
CLIENTS = sa.table(
    "api_clients",
    *(sa.column(name) for name in ("id", "name", "token_hash", "roles")),
    *(sa.column(name, dt) for name in ("created_at", "expires_at", "revoked_at")),
)
REQUESTS = sa.table(
    "requests",
    *(sa.column(name) for name in ("id", "direction", "peer_authority", "status", "urgency")),
    *(sa.column(name, dt) for name in ("created_at", "updated_at")),
)
MESSAGES = sa.table(
    "messages",
    *(sa.column(name) for name in ("id", "msg_id", "request_id", "direction")),
    *(sa.column(name) for name in ("sender_authority", "recipient_authority", "in_reply_to")),
    *(sa.column(name, dt) for name in ("created_at", "expires_at", "received_at")),
    *(sa.column(name, sa.LargeBinary()) for name in ("header", "signature")),
    sa.column("envelope_hash"),
    sa.column("size_bytes"),
)
PARTS = sa.table(
    "parts",
    sa.column("id"),
    sa.column("message_id"),
    sa.column("part_index"),
    sa.column("ciphertext", sa.LargeBinary()),
)
OUTBOX = sa.table(
    "outbox",
    *(sa.column(name) for name in ("id", "message_id", "peer_authority", "state", "attempts")),
    *(sa.column(name, dt) for name in ("next_attempt_at", "lease_until", "created_at")),
    sa.column("last_error"),
    sa.column("delivered_at", dt),
)
ENTRIES = sa.table(
    "audit_entries",
    *(sa.column(name) for name in ("idx", "actor", "action", "outcome")),
    *(sa.column(name) for name in ("request_id", "msg_id", "peer")),
    sa.column("recorded_at", dt),
    sa.column("entry", sa.LargeBinary()),
    sa.column("leaf_hash", sa.LargeBinary()),
)
HEAD = sa.table(
    "audit_head",
    sa.column("id"),
    sa.column("size"),
    sa.column("compact_range", sa.LargeBinary()),
    sa.column("root_hash", sa.LargeBinary()),
    sa.column("updated_at", dt),
)
FIRST_TABLES = ("peers", "api_clients", "requests", "messages", "parts", "outbox")


def _first_release_entries(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bytes]:
    """Audit entries as the first release wrote them, and the compact range they make."""
    compact = CompactRange()
    rows = []
    for idx, event in enumerate(events):
        when = T0 + timedelta(seconds=idx)
        fields = {
            "v": 1,
            "idx": idx,
            "time": format_time(when),
            "actor": event["actor"],
            "action": event["action"],
            "outcome": "ok",
            "request_id": event.get("request_id"),
            "msg_id": event.get("msg_id"),
            "peer": event.get("peer"),
            "details": event.get("details", {}),
        }
        data = canonical_json(fields)
        leaf = leaf_hash(data)
        compact.append(leaf)
        rows.append(
            {
                **{key: fields[key] for key in ("idx", "actor", "action", "outcome")},
                **{key: fields[key] for key in ("request_id", "msg_id", "peer")},
                "recorded_at": when,
                "entry": data,
                "leaf_hash": leaf,
            }
        )
    return rows, compact.to_bytes()


def fill_first_release(engine: Engine, keys: NodeKeys) -> str:
    """A node of the first release, one request queued to its peer. Returns the request id."""
    peer_keys = NodeKeys.generate()
    peer = parse_identity_document(
        build_identity_document(
            NodeIdentity("AR/MPF", "Ministerio Publico Fiscal", "https://mpf.example"),
            peer_keys,
            issued_at=T0,
        )
    )
    example = json.loads(json.dumps(EXAMPLE))
    envelope = seal(
        sender_keys=keys,
        sender_authority="ES/MJ",
        recipient=Recipient("AR/MPF", peer.encryption.public_key),
        content={"kind": "request", "document": example["document"]},
        attachments=[
            Attachment(
                name=item["name"],
                media_type=item["media_type"],
                data=base64.b64decode(item["content_base64"]),
            )
            for item in example["attachments"]
        ],
        conversation_id=None,
        in_reply_to=None,
        created_at=datetime.now(UTC),
        ttl=timedelta(days=7),
        randomness=SystemRandomness(),
    )
    header = parse_header(envelope.header, len(envelope.parts))
    request_id = header.conversation_id
    events = [
        *(
            {"actor": "operator:root", "action": "key.created", "details": {"purpose": p}}
            for p in ("signing", "encryption", "log")
        ),
        {"actor": "operator:root", "action": "client.created", "details": {"client": "case"}},
        {"actor": "operator:root", "action": "peer.added", "peer": "AR/MPF"},
        *(
            {
                "actor": "client:case",
                "action": action,
                "request_id": request_id,
                "msg_id": header.msg_id,
                "peer": "AR/MPF",
            }
            for action in ("request.submitted", "envelope.sealed")
        ),
    ]
    entries, compact = _first_release_entries(events)
    root = CompactRange.from_bytes(compact).root()
    with engine.begin() as connection:
        connection.execute(
            PEERS.insert(),
            {
                "id": 1,
                "authority_id": peer.authority_id,
                "name": peer.name,
                "public_url": peer.public_url,
                "fingerprint": peer.fingerprint,
                "signing_kid": peer.signing.kid,
                "signing_key": peer.signing.public_key,
                "encryption_kid": peer.encryption.kid,
                "encryption_key": peer.encryption.public_key,
                "log_kid": peer.log.kid,
                "log_key": peer.log.public_key,
                "identity_document": peer.document,
                "identity_signature": peer.signature,
                "added_at": T0,
                "updated_at": T0,
            },
        )
        connection.execute(
            CLIENTS.insert(),
            [
                {
                    "id": 1,
                    "name": "case",
                    "token_hash": hash_token(OFFICER_TOKEN),
                    "roles": "officer",
                    "created_at": T0,
                    "expires_at": None,
                    "revoked_at": None,
                },
                {
                    "id": 2,
                    "name": "ops",
                    "token_hash": sha256_hex(b"revoked-admin-token"),
                    "roles": "admin",
                    "created_at": T0,
                    "expires_at": None,
                    "revoked_at": T0,
                },
            ],
        )
        connection.execute(
            REQUESTS.insert(),
            {
                "id": request_id,
                "direction": "outbound",
                "peer_authority": "AR/MPF",
                "status": "queued",
                "urgency": example["document"]["urgency"]["level"],
                "created_at": T0,
                "updated_at": T0,
            },
        )
        connection.execute(
            MESSAGES.insert(),
            {
                "id": 1,
                "msg_id": header.msg_id,
                "request_id": request_id,
                "direction": "outbound",
                "sender_authority": "ES/MJ",
                "recipient_authority": "AR/MPF",
                "in_reply_to": None,
                "created_at": header.created_at,
                "expires_at": header.expires_at,
                "received_at": None,
                "header": envelope.header,
                "signature": envelope.signature,
                "envelope_hash": envelope.envelope_hash,
                "size_bytes": len(envelope.header) + sum(map(len, envelope.parts)),
            },
        )
        connection.execute(
            PARTS.insert(),
            [
                {"id": index + 1, "message_id": 1, "part_index": index, "ciphertext": data}
                for index, data in enumerate(envelope.parts)
            ],
        )
        connection.execute(
            OUTBOX.insert(),
            {
                "id": 1,
                "message_id": 1,
                "peer_authority": "AR/MPF",
                "state": "retry",
                "attempts": 2,
                "next_attempt_at": T0,
                "lease_until": None,
                "created_at": T0,
                "last_error": "transport: ConnectError",
                "delivered_at": None,
            },
        )
        connection.execute(ENTRIES.insert(), entries)
        connection.execute(
            HEAD.update().where(HEAD.c.id == 1),
            {"size": len(entries), "compact_range": compact, "root_hash": root, "updated_at": T0},
        )
    return request_id


def counts(engine: Engine, tables: tuple[str, ...]) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            name: int(connection.scalar(sa.text(f"SELECT COUNT(*) FROM {name}")) or 0)  # noqa: S608
            for name in tables
        }


def test_a_first_release_database_upgrades_to_head_losing_nothing(
    databases: Databases, tmp_path: Path
) -> None:
    url = databases.new("first-release")
    keys_dir = tmp_path / "keys"
    keys = NodeKeys.generate()
    save_keys(keys_dir, keys)
    save_identity(keys_dir, NodeIdentity("ES/MJ", "Ministerio de Justicia", "https://mj.example"))
    upgrade(url, FIRST)
    engine = make_engine(url)
    try:
        request_id = fill_first_release(engine, keys)
        before = counts(engine, (*FIRST_TABLES, "audit_entries"))
        assert pending(engine, url)

        upgrade(url, "head")

        assert not pending(engine, url)
        assert counts(engine, (*FIRST_TABLES, "audit_entries")) == before
        with engine.connect() as connection:
            outbox = connection.execute(
                sa.text("SELECT state, attempts, expires_at, priority, size_bytes FROM outbox")
            )
            state, attempts, expires_at, priority, size = outbox.one()
            urgency, sealed_size = connection.execute(
                sa.text(
                    "SELECT requests.urgency, messages.size_bytes FROM messages "
                    "JOIN requests ON requests.id = messages.request_id"
                )
            ).one()
        assert (state, attempts) == ("retry", 2)
        assert expires_at is not None  # the delivery deadline was filled from the envelope's
        # The claim's order and budget, filled from the message and its request.
        assert (priority, size) == (priority_of(urgency), sealed_size)
    finally:
        engine.dispose()

    node = load_node(Settings(database_url=url, keys_dir=keys_dir))
    try:
        with unit_of_work(node.sessions) as session:
            # The old log verifies as it is, then grows in today's format and still verifies.
            report = verify_database(
                session, authority_id=node.authority_id, log_public=node.keys.log_public
            )
            assert report.ok, report.problems
            assert report.entries == before["audit_entries"]
            principal = authenticate(session, OFFICER_TOKEN)
            assert principal.name == "case"
            assert Role.OFFICER in principal.roles
            # The request, sealed by the first release, opens with the node's keys.
            detail = read_request(
                session,
                node,
                request_id=request_id,
                principal=Principal(principal.client_id, principal.name, principal.roles),
                now=datetime.now(UTC),
            )
            assert detail.document["summary_of_facts"] == EXAMPLE["document"]["summary_of_facts"]
            assert detail.messages[0].delivery is not None
            assert detail.messages[0].delivery.attempts == 2
            record(session, actor="test", action="node.upgraded")
            sign_checkpoint(session, authority_id=node.authority_id, log_key=node.keys.log)
        with unit_of_work(node.sessions) as session:
            report = verify_database(
                session, authority_id=node.authority_id, log_public=node.keys.log_public
            )
            assert report.ok, report.problems
            # request.read (by read_request above), node.upgraded
            assert report.entries == before["audit_entries"] + 2
    finally:
        node.close()

"""A real node in process (AR/MPF, the requested authority), with a fixed clock for its routes.

The node is the real application (`create_app`) on a real, migrated database (SQLite and
PostgreSQL), served by uvicorn on a loopback port in a thread of the test process, so that
the test can fix its clock. Its peer ES/MJ is not a process:
its keys are real, pinned on AR/MPF like any peer's, and its envelopes are built with the real
sealing code and posted to AR/MPF's P2P API, as ES/MJ's delivery worker would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from app.auth.service import Role, create_client
from app.clock import get_clock
from app.config import Settings
from app.crypto.encoding import b64d, utc_now
from app.crypto.envelope import Attachment, Recipient, WireEnvelope, seal
from app.crypto.identity import build_identity_document, parse_identity_document
from app.crypto.keys import NodeIdentity, NodeKeys, save_identity, save_keys
from app.crypto.part_put import HEADER as PART_PUT_HEADER
from app.crypto.part_put import sign_part_put
from app.crypto.randomness import SystemRandomness
from app.db import make_engine, unit_of_work
from app.delivery.worker import Worker
from app.lingering import LingeringH11Protocol
from app.localnodes import free_port
from app.main import create_app
from app.migrate import ROOT
from app.models import AuditEntry, InboundTransfer, Message
from app.node import Node
from app.obs.health import schema_pending
from app.peers.service import pin_peer
from tests.conftest import BACKENDS, Databases, make_databases

EXAMPLE: dict[str, Any] = json.loads((ROOT / "docs" / "examples" / "request.json").read_text())


def example_document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(EXAMPLE["document"]))
    document.update(changes)
    return document


@dataclass
class Clock:
    now: datetime | None = None  # None: the real time

    def __call__(self) -> datetime:
        return self.now or utc_now()


@dataclass
class Harness:
    http: httpx.Client
    node: Node
    peer_keys: NodeKeys  # ES/MJ's
    tokens: dict[str, str]
    clock: Clock
    last_msg: dict[str, str] = field(default_factory=dict)  # request id -> latest msg_id

    def as_(self, client: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.tokens[client]}"}

    def get(self, path: str, client: str = "officer", **params: Any) -> httpx.Response:
        return self.http.get(path, headers=self.as_(client), params=params)

    def post(self, path: str, body: object, client: str = "officer") -> httpx.Response:
        return self.http.post(path, headers=self.as_(client), json=body)

    def status(self, request_id: str) -> str:
        response = self.get(f"/api/v1/requests/{request_id}")
        assert response.status_code == 200, response.text
        status: str = response.json()["status"]
        return status

    # --- AR/MPF's officer ------------------------------------------------------------------

    def reply(self, request_id: str, document: dict[str, Any]) -> httpx.Response:
        response = self.post(f"/api/v1/requests/{request_id}/messages", {"document": document})
        if response.status_code == 201:
            self.last_msg[request_id] = response.json()["msg_id"]
        return response

    # --- ES/MJ, the peer ----------------------------------------------------------------

    def announce_streamed(self) -> tuple[dict[str, Any], str, str]:
        """A request with one attachment announced (part 0 only): (wire, msg_id, part 1's
        href)."""
        content = {"kind": "request", "document": example_document()}
        wire = self._seal(content, None, None).to_wire()
        announced = self.http.post(
            "/p2p/v1/evidence/envelopes", json={**wire, "parts": wire["parts"][:1]}
        )
        assert announced.status_code == 202, announced.text
        msg_id = json.loads(b64d(wire["header"]))["msg_id"]
        return wire, msg_id, f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"

    def signed_put(self, msg_id: str, offset: int, index: int = 1) -> dict[str, str]:
        """The headers ES/MJ's node sends with a part's PUT: where it starts, signed for the
        envelope announced under `msg_id` (any envelope, if none is)."""
        with unit_of_work(self.node.sessions) as session:
            envelope_hash = session.scalar(
                select(InboundTransfer.envelope_hash).where(InboundTransfer.msg_id == msg_id)
            )
        signature = sign_part_put(self.peer_keys.signing, envelope_hash or "0" * 64, index, offset)
        return {"upload-offset": str(offset), PART_PUT_HEADER: signature}

    def _seal(
        self,
        content: dict[str, Any],
        conversation: str | None,
        in_reply_to: str | None,
        attachments: list[Attachment] | None = None,
    ) -> WireEnvelope:
        letter = Attachment("letter.txt", "text/plain", b"letter of request")
        return seal(
            sender_keys=self.peer_keys,
            sender_authority="ES/MJ",
            recipient=Recipient("AR/MPF", self.node.keys.encryption_public),
            content=content,
            attachments=[letter] if attachments is None else attachments,
            conversation_id=conversation,
            in_reply_to=in_reply_to,
            created_at=utc_now(),
            ttl=timedelta(days=1),
            randomness=SystemRandomness(),
        )

    def post_envelope(self, envelope: WireEnvelope) -> httpx.Response:
        return self.http.post("/p2p/v1/envelopes", json=envelope.to_wire())

    def receive_request(self, attachments: list[Attachment] | None = None, **changes: Any) -> str:
        content = {"kind": "request", "document": example_document(**changes)}
        envelope = self._seal(content, None, None, attachments)
        response = self.post_envelope(envelope)
        assert response.status_code == 201, response.text
        request_id = json.loads(envelope.header)["msg_id"]
        self.last_msg[request_id] = request_id
        return str(request_id)

    def seal_message(
        self, request_id: str, document: dict[str, Any], in_reply_to: str | None = None
    ) -> WireEnvelope:
        content = {"kind": "message", "document": document}
        return self._seal(content, request_id, in_reply_to or self.last_msg[request_id])

    def peer_sends(self, request_id: str, document: dict[str, Any]) -> httpx.Response:
        envelope = self.seal_message(request_id, document)
        response = self.post_envelope(envelope)
        if response.status_code == 201:
            self.last_msg[request_id] = json.loads(envelope.header)["msg_id"]
        return response

    # --- the database, read directly ----------------------------------------------------------

    def messages(self, request_id: str) -> int:
        with unit_of_work(self.node.sessions) as session:
            return len(
                list(session.scalars(select(Message).where(Message.request_id == request_id)))
            )

    def audit(self, action: str) -> list[tuple[str, str, str | None]]:
        with unit_of_work(self.node.sessions) as session:
            rows = session.execute(
                select(AuditEntry.actor, AuditEntry.outcome, AuditEntry.request_id)
                .where(AuditEntry.action == action)
                .order_by(AuditEntry.idx)
            )
            return [(actor, outcome, request_id) for actor, outcome, request_id in rows]


@contextmanager
def worker_against(
    node: Node, handle: Callable[[httpx.Request], httpx.Response]
) -> Iterator[Worker]:
    """A real delivery worker of `node`, its peer a fake at the HTTP edge (`handle`)."""
    worker = Worker(node, http=httpx.Client(transport=httpx.MockTransport(handle)))
    try:
        yield worker
    finally:
        worker._finish_in_flight()
        worker.witnessing.stop(5.0)
        worker._pool.shutdown()
        worker.http.close()


def _pin_es(node: Node, es_keys: NodeKeys, issued_at: datetime | None = None) -> None:
    document = build_identity_document(
        NodeIdentity("ES/MJ", "Ministerio de Justicia", "http://es.invalid"),
        es_keys,
        issued_at=issued_at or utc_now(),
    )
    with unit_of_work(node.sessions) as session:
        pin_peer(
            session,
            identity=parse_identity_document(document),
            url="http://es.invalid",
            own_authority="AR/MPF",
            own_keys=node.keys,
            clock_skew=timedelta(seconds=node.settings.clock_skew_seconds),
        )


@contextmanager
def serve_node(
    url: str, workdir: Path, *, keys: NodeKeys | None = None, es_keys: NodeKeys | None = None
) -> Iterator[Harness]:
    """AR/MPF on the database at `url`, migrated to head (`Databases.new(..., migrated=True)`,
    `migrated_sqlite`). `keys` (AR/MPF's) and `es_keys`: to serve the same node again, as
    after a restart."""
    keys_dir = workdir / "keys"
    save_keys(keys_dir, keys or NodeKeys.generate())
    save_identity(
        keys_dir, NodeIdentity("AR/MPF", "Ministerio Publico Fiscal", "http://ar.invalid")
    )
    engine = make_engine(url)
    try:  # an empty one fails later, half way through the start-up, on a missing table
        pending = schema_pending(engine)
    finally:
        engine.dispose()
    assert not pending, "serve_node serves a database migrated to head: new(..., migrated=True)"
    settings = Settings(
        database_url=url, keys_dir=keys_dir, run_worker=False, allow_insecure_http=True
    )
    app = create_app(settings)
    clock = Clock()
    app.dependency_overrides[get_clock] = lambda: clock
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            http=LingeringH11Protocol,  # as `entraide serve` runs it
        )
    )
    thread = threading.Thread(target=server.run, name="ar-node", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the node exited while starting"
        assert time.monotonic() < deadline, "the node did not start in 30 s"
        time.sleep(0.02)
    try:
        node: Node = app.state.node
        again = es_keys is not None
        es_keys = es_keys or NodeKeys.generate()
        if not again:
            _pin_es(node, es_keys)
        tokens = {}
        with unit_of_work(node.sessions) as session:
            for name, role in [
                ("officer", Role.OFFICER),
                ("alice", Role.OFFICER),
                ("bob", Role.OFFICER),
                ("admin", Role.ADMIN),
                ("auditor", Role.AUDITOR),
                ("monitor", Role.MONITOR),  # a Prometheus scraper's, for /metrics
            ]:
                if not again:  # served again: the clients exist (no token of theirs here)
                    tokens[name] = create_client(session, name=name, roles={role})[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield Harness(http, node, es_keys, tokens, clock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module", params=BACKENDS)
def ar(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    """One node per module and backend: tests create their own requests, and compare audit
    entries before and after, so they do not depend on each other."""
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    try:
        ar_db = databases.new("ar", migrated=True)
        with serve_node(ar_db, tmp_path_factory.mktemp("ar")) as harness:
            yield harness
    finally:
        databases.drop_all()


@pytest.fixture
def fresh_ar(databases: Databases, tmp_path: Path) -> Iterator[Harness]:
    """A node of its own, for tests that look at every request the node holds."""
    with serve_node(databases.new("ar", migrated=True), tmp_path) as harness:
        yield harness

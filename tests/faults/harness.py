"""Two real nodes, a fault proxy between them, and the exactly-once ledger.

Shared by the fault tests and `bench/soak.py`, so it imports nothing from pytest. The sender
(ES/MJ) pins the receiver (AR/MPF) at whatever URL the scenario needs, usually the proxy's;
the receiver pins the sender directly (it only has to recognise the sender's signatures).

The ledger reads both nodes' databases directly and answers one question: was every request
the sender accepted with a 201 delivered exactly once, with a receipt that verifies and that
is byte for byte the receipt the receiver issued?
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, func, select

from app.crypto.identity import parse_identity_document
from app.crypto.receipts import ReceiptError, SignedReceipt, verify_receipt
from app.db import make_engine
from app.forkserver import ForkedProcess
from app.localnodes import LocalNode, spawn_entraide
from app.migrate import ROOT
from app.models import AuditEntry, Message, OutboxItem, Receipt

EXAMPLE: dict[str, Any] = json.loads((ROOT / "docs" / "examples" / "request.json").read_text())
ADMIN = "ops"  # one API client with the admin and officer roles, to save a CLI run per node

# Short timeouts so a scenario runs in seconds: a lost answer costs one peer timeout, and a
# killed worker's rows come back after one lease (if it left no heartbeat; else once its
# heartbeat has stood still for three of its periods).
FAST_DELIVERY = {
    "ENTRAIDE_WORKER_POLL_SECONDS": "0.1",
    "ENTRAIDE_PEER_TIMEOUT_SECONDS": "3",
    "ENTRAIDE_LEASE_SECONDS": "5",
}


def reader_engine(url: str) -> Engine:
    # make_engine's SQLite setup begins every transaction IMMEDIATE: a poll would take the
    # write lock and stall the node. A plain engine reads without locking (WAL).
    if url.startswith("sqlite"):
        return create_engine(url)
    return make_engine(url)


@dataclass
class WorkerProcess:
    """An `entraide worker` process with the same environment as its node."""

    process: subprocess.Popen[bytes] | ForkedProcess
    log_path: Path

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=20)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(timeout=20)


@dataclass
class Pair:
    sender: LocalNode
    receiver: LocalNode
    receiver_signing_key: bytes = b""
    receiver_signing_kid: str = ""
    workers: list[WorkerProcess] = field(default_factory=list)
    last_ledger: Ledger | None = None
    _engines: dict[str, Engine] = field(default_factory=dict)

    def engine(self, node: LocalNode) -> Engine:
        if node.database_url not in self._engines:
            self._engines[node.database_url] = reader_engine(node.database_url)
        return self._engines[node.database_url]

    # --- setup -----------------------------------------------------------------------------

    def start(self, *, sender_pins_receiver_at: str | None = None) -> Pair:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(_prepare, (self.sender, self.receiver)))
        self.receiver.pin(self.sender, admin=ADMIN)
        self.pin_receiver(sender_pins_receiver_at or self.receiver.url)
        document = httpx.get(self.receiver.url + "/.well-known/entraide/node", timeout=10).json()
        signing = parse_identity_document(document).signing
        self.receiver_signing_key, self.receiver_signing_kid = signing.public_key, signing.kid
        return self

    def pin_receiver(self, url: str) -> None:
        """Pin the receiver at `url` (the proxy's), with the fingerprint read out of band."""
        with self.sender.client(ADMIN) as http:
            body = {"url": url, "fingerprint": self.receiver.fingerprint}
            response = http.post("/api/v1/admin/peers", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"pinning the receiver at {url} failed: {response.text}")

    def start_worker(self, label: str, **env: str) -> WorkerProcess:
        log_path = self.sender.workdir / f"worker-{label}.log"
        with log_path.open("ab") as log:
            process = spawn_entraide(["worker"], {**self.sender.env(), **env}, log.fileno())
        worker = WorkerProcess(process, log_path)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        # Every process gets its stop even if another fails to stop; all at once, as a stop
        # is mostly a wait for the process to wind down (four workers one after the other
        # took seconds).
        stops: list[Callable[[], None]] = [worker.stop for worker in self.workers]
        stops += [self.sender.stop, self.receiver.stop]
        try:
            run_all(stops, at_once=True)
        finally:
            run_all([engine.dispose for engine in self._engines.values()])

    # --- traffic ---------------------------------------------------------------------------

    def submit(self, count: int, *, concurrency: int = 2) -> list[str]:
        """Submit `count` requests; every one must be accepted. Returns their msg_ids."""
        with self.sender.client(ADMIN) as http, ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: submit_one(http), range(count)))
        failed = [result for result in results if result is None]
        if failed:
            raise AssertionError(f"{len(failed)} of {count} submissions were not accepted")
        return [msg_id for msg_id in results if msg_id is not None]

    def inbound_count(self) -> int:
        with self.engine(self.receiver).connect() as connection:
            statement = select(func.count()).select_from(Message)
            return int(connection.scalar(statement.where(Message.direction == "inbound")) or 0)

    def outbox_states(self) -> Counter[str]:
        with self.engine(self.sender).connect() as connection:
            return Counter(connection.scalars(select(OutboxItem.state)))

    def wait_delivered(self, expected: int, timeout: float) -> float:
        """Wait until the sender holds `expected` delivered rows and nothing else is due."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            states = self.outbox_states()
            if states["delivered"] >= expected and states["delivered"] == sum(states.values()):
                return time.monotonic() - started
            # Failed and cancelled are final: no point waiting for the rest of the timeout.
            final = states["failed"] + states["cancelled"]
            if final or time.monotonic() > deadline:
                why = "some ended undelivered" if final else f"not all delivered after {timeout}s"
                raise AssertionError(f"{why}: outbox {dict(states)}; {self.diagnosis()}")
            time.sleep(0.2)

    def diagnosis(self) -> str:
        with self.engine(self.sender).connect() as connection:
            rows = connection.execute(
                select(OutboxItem.state, OutboxItem.attempts, OutboxItem.last_error)
                .where(OutboxItem.state != "delivered")
                .limit(5)
            ).all()
        logs = {node.authority_id: tail(node.log_path) for node in (self.sender, self.receiver)}
        workers = {worker.log_path.name: tail(worker.log_path) for worker in self.workers}
        return f"undelivered rows {rows}; logs {logs}; workers {workers}"

    # --- the ledger ------------------------------------------------------------------------

    def ledger(self, accepted: list[str]) -> Ledger:
        self.last_ledger = build_ledger(self, accepted)
        return self.last_ledger


def _prepare(node: LocalNode) -> None:
    node.init(clients={ADMIN: ("admin", "officer")})
    node.start()


def submit_one(http: httpx.Client) -> str | None:
    """One request; its msg_id if the sender answered 201, else None."""
    try:
        response = http.post("/api/v1/requests", json=EXAMPLE)
    except httpx.HTTPError:
        return None
    if response.status_code != 201:
        return None
    msg_id: str = response.json()["msg_id"]
    return msg_id


class Submitter:
    """Submits requests from a background thread until told to stop or `limit` is reached.

    Failures are counted, not raised: during a fault an answer other than 201 is allowed;
    losing a request that got a 201 is not.
    """

    def __init__(
        self,
        node: LocalNode,
        *,
        limit: int,
        pause: float = 0.0,
        on_accept: Callable[[int], None] | None = None,
    ) -> None:
        self.node = node
        self.limit = limit
        self.pause = pause
        self.on_accept = on_accept  # called in the submitting thread, right after each 201
        self.accepted: list[str] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="submitter", daemon=True)

    def start(self) -> Submitter:
        self._thread.start()
        return self

    def _run(self) -> None:
        with self.node.client(ADMIN) as http:
            while not self._stop.is_set() and len(self.accepted) < self.limit:
                msg_id = submit_one(http)
                if msg_id is None:
                    self.failures += 1
                    time.sleep(0.2)
                else:
                    self.accepted.append(msg_id)
                    if self.on_accept is not None:
                        self.on_accept(len(self.accepted))
                if self.pause:
                    time.sleep(self.pause)

    def wait_accepted(self, count: int, timeout: float = 60.0) -> None:
        wait_until(f"{count} accepted submissions", lambda: len(self.accepted) >= count, timeout)

    def stop(self, timeout: float = 60.0) -> list[str]:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the submitter did not stop")
        return list(self.accepted)

    def join(self, timeout: float = 120.0) -> list[str]:
        self._thread.join(timeout)
        return self.stop()


@dataclass
class Ledger:
    sent: int  # accepted with a 201
    sender_outbound: int  # outbound messages at the sender (201s plus unanswered commits)
    delivered: int  # outbound messages delivered, receipted, and present once at the receiver
    duplicated: int  # extra copies at the receiver, by row, by audit entry, or unknown msg_ids
    lost: int  # accepted with a 201 but absent at the receiver
    undelivered: int  # sender rows not in state delivered or without a receipt
    bad_receipts: int  # a receipt that does not verify or differs from the receiver's
    attempts: Counter[int]  # outbox attempts per row: 1 means delivered at the first try
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "sender_outbound": self.sender_outbound,
            "delivered": self.delivered,
            "duplicated": self.duplicated,
            "lost": self.lost,
            "undelivered": self.undelivered,
            "bad_receipts": self.bad_receipts,
            "attempts": {str(key): value for key, value in sorted(self.attempts.items())},
        }

    def check(self) -> None:
        assert self.ok, f"{self.problems[:10]} ledger={self.as_dict()}"


def build_ledger(pair: Pair, accepted: list[str]) -> Ledger:
    problems: list[str] = []
    with pair.engine(pair.sender).connect() as connection:
        outbound = {
            row.msg_id: row
            for row in connection.execute(select(Message).where(Message.direction == "outbound"))
        }
        outbox = {row.message_id: row for row in connection.execute(select(OutboxItem))}
        sender_receipts = {row.message_id: row for row in connection.execute(select(Receipt))}
    with pair.engine(pair.receiver).connect() as connection:
        inbound_rows = list(
            connection.execute(
                select(Message.id, Message.msg_id).where(Message.direction == "inbound")
            )
        )
        receiver_receipts = {row.message_id: row for row in connection.execute(select(Receipt))}
        received_entries = Counter(
            connection.scalars(
                select(AuditEntry.msg_id).where(AuditEntry.action == "envelope.received")
            )
        )
    inbound_copies = Counter(row.msg_id for row in inbound_rows)
    inbound_id = {row.msg_id: row.id for row in inbound_rows}

    duplicated = sum(copies - 1 for copies in inbound_copies.values())
    duplicated += sum(entries - 1 for entries in received_entries.values() if entries > 1)
    phantoms = set(inbound_copies) - set(outbound)
    duplicated += len(phantoms)
    if duplicated:
        problems.append(
            f"duplicates at the receiver: rows {inbound_copies.most_common(3)}, audit "
            f"{received_entries.most_common(3)}, unknown msg_ids {sorted(phantoms)[:3]}"
        )
    lost_ids = [msg_id for msg_id in accepted if msg_id not in inbound_copies]
    missing_at_sender = [msg_id for msg_id in accepted if msg_id not in outbound]
    if missing_at_sender:
        problems.append(f"accepted with 201 but absent at the sender: {missing_at_sender[:3]}")
    if lost_ids:
        problems.append(f"accepted with 201 but never received: {lost_ids[:3]}")

    delivered = undelivered = bad = 0
    attempts: Counter[int] = Counter()
    for msg_id, message in outbound.items():
        item = outbox.get(message.id)
        mine = sender_receipts.get(message.id)
        attempts[item.attempts if item is not None else 0] += 1
        if item is None or item.state != "delivered" or mine is None:
            undelivered += 1
            state = item.state if item is not None else "no outbox row"
            problems.append(f"{msg_id} not delivered at the sender ({state})")
            continue
        try:
            verify_receipt(
                SignedReceipt(body=mine.body, signature=mine.signature),
                signer_public=pair.receiver_signing_key,
                signer_kid=pair.receiver_signing_kid,
                msg_id=msg_id,
                envelope_hash=message.envelope_hash,
                from_authority=message.sender_authority,
                to_authority=message.recipient_authority,
            )
        except ReceiptError as exc:
            bad += 1
            problems.append(f"{msg_id}: the sender's receipt does not verify: {exc}")
            continue
        theirs = receiver_receipts.get(inbound_id.get(msg_id, -1))
        if theirs is None:
            problems.append(f"{msg_id}: receipted at the sender but unknown to the receiver")
            continue
        if (theirs.body, theirs.signature) != (mine.body, mine.signature):
            bad += 1
            problems.append(f"{msg_id}: the sender kept another receipt than the one issued")
            continue
        if inbound_copies[msg_id] == 1:
            delivered += 1
    return Ledger(
        sent=len(accepted),
        sender_outbound=len(outbound),
        delivered=delivered,
        duplicated=duplicated,
        lost=len(set(lost_ids) | set(missing_at_sender)),
        undelivered=undelivered,
        bad_receipts=bad,
        attempts=attempts,
        problems=problems,
    )


def run_all(steps: list[Callable[[], None]], *, at_once: bool = False) -> None:
    """Run every step (side by side in threads if `at_once`); then raise the first failure,
    if any."""

    def attempt(step: Callable[[], None]) -> Exception | None:
        try:
            step()
        except Exception as exc:  # collected and re-raised below, after the other steps
            return exc
        return None

    if at_once and len(steps) > 1:
        with ThreadPoolExecutor(max_workers=len(steps)) as pool:
            outcomes = list(pool.map(attempt, steps))
    else:
        outcomes = [attempt(step) for step in steps]
    failures = [failure for failure in outcomes if failure is not None]
    if failures:
        raise failures[0]


def wait_until(what: str, check: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def new_pair(
    workdir: Path,
    sender_db: str,
    receiver_db: str,
    *,
    sender_env: dict[str, str] | None = None,
    receiver_env: dict[str, str] | None = None,
) -> Pair:
    """Two LocalNodes, not started: the proxy needs the receiver's port before they start."""
    sender = LocalNode(
        "ES/MJ",
        "Ministerio de Justicia",
        workdir / "es",
        sender_db,
        extra_env={**FAST_DELIVERY, **(sender_env or {})},
    )
    receiver = LocalNode(
        "AR/MPF",
        "Ministerio Publico Fiscal",
        workdir / "ar",
        receiver_db,
        extra_env={**FAST_DELIVERY, **(receiver_env or {})},
    )
    return Pair(sender, receiver)


@contextmanager
def running(pair: Pair, **start: Any) -> Iterator[Pair]:
    try:
        yield pair.start(**start)
    finally:
        pair.close()

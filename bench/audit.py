"""Audit-trail benchmark (issue 3, acceptance 6), on the real code paths, per database backend.

    python bench/audit.py [--entries 1000000] [--runs 3] [--backend sqlite|postgresql|both]
                          [--requests 600] [--queries 600] [--seed 1]

(a) What appending costs the request path. Two nodes (ES/MJ sends to AR/MPF) are set up by the
    operator's own commands (`entraide init`, `clients create`, pinning over HTTP between real
    node processes), then both apps run in this process, wired by Starlette's TestClient: an
    officer POSTs a 2 KiB request to /api/v1/requests, the sender's delivery worker
    (`Worker.run_once`, the real one) delivers it to the receiver's P2P route, which opens,
    stores and receipts it; the sender settles the delivery, stores the receipt and witnesses
    the checkpoint it carries. Requests run one after another, so time adds up. Two figures
    from the same run:
    - A/B: blocks of requests alternate, in pairs (in random order), between the shipped code
      and the same code with `app.audit.log.record` (and `record_many`) replaced, in this
      process only, by a function that does nothing (checkpoint signing, indexing and
      witnessing stay, but have nothing new to do). Each pair gives
      1 - throughput_with / throughput_without; the figure is the median over all pairs of
      all runs, so that a burst of other load on the machine during one block moves it
      little. It includes what an in-function timer cannot see, such as the audit rows'
      pages written at commit. The same pairs also give the overhead in CPU time of this
      process (both nodes run in it), which the machine's other load moves less: reported
      beside it, not judged.
    - timer: in the "with" blocks, every call of `record` (and, separately, of the log's
      upkeep and witnessing) is timed by a wrapper that calls the real function. `record`
      writes its own rows and never flushes the action's, so only the audit's work is billed
      to it. Throughput minus that time is the second estimate.
    The 5% target counts as met only if both estimates are within it.
(b) `entraide audit verify`. A log of --entries entries is written in bulk with the code of
    app/audit (canonical JSON, RFC 9162 leaf hashes, the compact range and the stored subtree
    nodes it completes, the query index filled as the worker fills it, a last batch not yet
    indexed, a signed checkpoint every 1000 entries as the node's default), from a
    simulation of a node's traffic over a year; then real `record` and `sign_checkpoint`
    calls extend it. It is exported with `export_log` and checked with `verify_export`,
    with `verify_database`, and with the `entraide audit verify DIR` command itself.
(c) The auditor's query (`app.audit.service.query_entries`, in a unit of work, rendered with
    `entry_view`, as GET /api/v1/audit does) over that log: random filter combinations drawn
    from real entries (time range, actor, action, request id, peer, outcome), 100 per page,
    newest first, following the cursor for some; p50 and p99 of all calls. PostgreSQL is
    ANALYZEd after the bulk load, as autovacuum would within a minute; SQLite is not (the
    node never runs ANALYZE).

Prints the figures, writes bench/results/audit.json (machine, every run, medians), and ends
with one JSON line. Exit status 0 when every target is met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Starlette asks TestClient users to move to httpx2; the node itself uses httpx.
warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import create_engine, event, func, insert, select, text, update  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from app.audit import checkpoints as audit_checkpoints  # noqa: E402
from app.audit import log as audit_log  # noqa: E402
from app.audit import witness as audit_witness  # noqa: E402
from app.audit.checkpoints import log_origin, sign_checkpoint  # noqa: E402
from app.audit.index import INDEX_BATCH  # noqa: E402
from app.audit.log import Event  # noqa: E402
from app.audit.mac import MACS_EXTENSION, entry_mac, mac_key  # noqa: E402
from app.audit.merkle import CompactRange, leaf_hash  # noqa: E402
from app.audit.note import Checkpoint, sign_note  # noqa: E402
from app.audit.service import (  # noqa: E402
    EntryFilter,
    entry_view,
    export_log,
    query_entries,
    verify_database,
    verify_export,
)
from app.config import Settings  # noqa: E402
from app.crypto.encoding import canonical_json, format_time, utc_now  # noqa: E402
from app.crypto.keys import NodeIdentity, NodeKeys  # noqa: E402
from app.db import make_engine, make_session_factory, unit_of_work  # noqa: E402
from app.delivery.worker import Worker  # noqa: E402
from app.localnodes import LocalNode  # noqa: E402
from app.main import create_app  # noqa: E402
from app.migrate import upgrade  # noqa: E402
from app.models import AuditCheckpoint, AuditEntry, AuditHead, Receipt  # noqa: E402
from app.node import Node  # noqa: E402
from bench._common import (  # noqa: E402
    machine,
    median,
    medians,
    percentile,
    postgres_available,
    postgres_database,
    write_results,
)

TARGET_APPEND_SHARE = 0.05
TARGET_VERIFY_PER_S = 300_000
TARGET_QUERY_P99_MS = 50.0
REQUEST_BYTES = 2048
CHECKPOINT_EVERY = 1000  # Settings.audit_checkpoint_every
BUILD_CHUNK = 20_000
PAGE = 100  # GET /api/v1/audit's default limit
AUTHORITY = "ES/MJ"


def say(message: str) -> None:
    print(f"[audit] {message}", file=sys.stderr, flush=True)


# --- (a) the request path -------------------------------------------------------------------------


def request_body() -> dict[str, Any]:
    """The example request of docs/examples cut to 2 KiB, mostly its summary of facts."""
    body = json.loads((ROOT / "docs" / "examples" / "request.json").read_text())
    document = body["document"]
    body["attachments"] = []
    document["assistance_sought"] = [{**document["assistance_sought"][0], "person_refs": ["P1"]}]
    document["offences"] = document["offences"][:1]
    document["persons"] = document["persons"][:1]
    for optional in ("electronic_data", "deadlines", "classification"):
        document.pop(optional, None)
    facts = document.pop("summary_of_facts")

    def cut(value: Any) -> Any:
        if isinstance(value, str) and " " in value:  # prose only: codes and ids stay whole
            return value[:40]
        if isinstance(value, list):
            return [cut(item) for item in value]
        if isinstance(value, dict):
            return {key: cut(item) for key, item in value.items()}
        return value

    result: dict[str, Any] = cut(body)
    size = len(json.dumps(result, ensure_ascii=False).encode())
    room = REQUEST_BYTES - size - len(', "summary_of_facts": ""')
    if room < 100:
        raise RuntimeError(f"the example request has outgrown {REQUEST_BYTES} bytes")
    while len(facts[:room].encode()) > room:
        room -= 1
    result["document"]["summary_of_facts"] = facts[:room]
    return result


class Clock:
    """Seconds spent inside wrapped functions, by category; nested calls count once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(
        self, category: str, real: Callable[..., Any], count: Callable[..., int] | None = None
    ) -> Any:
        """`real`, timed; `count(*args)` says how many things a call does (default: one)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return real(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[category] = self.seconds.get(category, 0.0) + (
                    time.perf_counter() - start
                )
                done = count(*args, **kwargs) if count else 1
                self.calls[category] = self.calls.get(category, 0) + done

        return timed


@contextmanager
def rebound(original: Callable[..., Any], replacement: Callable[..., Any]) -> Iterator[None]:
    """Replace `original` in every loaded app module that imported it by name (bench only)."""
    patched: list[tuple[ModuleType, str]] = []
    for module in list(sys.modules.values()):
        if module is None or not module.__name__.startswith("app"):
            continue
        for name, value in list(vars(module).items()):
            if value is original:
                setattr(module, name, replacement)
                patched.append((module, name))
    try:
        yield
    finally:
        for module, name in patched:
            setattr(module, name, original)


def _no_record(session: Session, **fields: Any) -> int:
    return 0


def _no_record_many(session: Session, events: Any) -> list[int]:
    return [0] * len(events)


def _entries(session: Session, events: Any) -> int:
    return len(events)


@contextmanager
def appending(record: Callable[..., Any], record_many: Callable[..., Any]) -> Iterator[None]:
    """Appending, as the app calls it, replaced by `record` and `record_many`."""
    with rebound(audit_log.record, record), rebound(audit_log.record_many, record_many):
        yield


def _receipts(node: Node) -> int:
    with node.sessions() as session:
        return session.scalar(select(func.count()).select_from(Receipt)) or 0


@dataclass
class Pair:
    es: LocalNode
    ar: LocalNode


def prepare_pair(workdir: Path, es_url: str, ar_url: str) -> Pair:
    """Two nodes set up exactly as an operator would, pinned to each other, then stopped."""
    es = LocalNode("ES/MJ", "Ministerio de Justicia", workdir / "es", es_url)
    ar = LocalNode("AR/MPF", "Ministerio Publico Fiscal", workdir / "ar", ar_url)
    for node in (es, ar):
        node.init()
        node.create_client("admin", "admin")
        node.create_client("officer", "officer")
    try:
        es.start()
        ar.start()
        es.pin(ar)
        ar.pin(es)
    finally:
        es.stop()
        ar.stop()
    return Pair(es, ar)


def node_settings(node: LocalNode) -> Settings:
    # The defaults as shipped; plain HTTP because the nodes were pinned at http:// URLs, and
    # no worker thread, since this loop drives the real worker's rounds itself.
    return Settings(
        database_url=node.database_url,
        keys_dir=node.keys_dir,
        allow_insecure_http=True,
        run_worker=False,
    )


def request_path_run(
    pair: Pair, *, requests: int, block: int, rng: random.Random
) -> dict[str, Any]:
    body = request_body()
    clock = Clock()
    with_appends = (
        clock.wrap("append", audit_log.record),
        clock.wrap("append", audit_log.record_many, count=_entries),
    )
    without_appends = (_no_record, _no_record_many)
    timed: list[tuple[Callable[..., Any], str]] = [
        (audit_checkpoints.maybe_checkpoint, "checkpoint"),
        (audit_checkpoints.sign_checkpoint, "checkpoint"),
        (audit_checkpoints.latest_checkpoint, "checkpoint"),
        (audit_witness.witness_receipt_checkpoint, "witness"),
    ]
    es_app = create_app(node_settings(pair.es))
    ar_app = create_app(node_settings(pair.ar))
    with (
        TestClient(es_app, base_url=pair.es.url) as es_http,
        TestClient(ar_app, base_url=pair.ar.url) as ar_http,
        ExitStack() as stack,
    ):
        for real, category in timed:
            stack.enter_context(rebound(real, clock.wrap(category, real)))
        es_http.headers["authorization"] = f"Bearer {pair.es.tokens['officer']}"
        es_worker = Worker(es_app.state.node, http=ar_http)
        receipts_before = _receipts(es_app.state.node)
        ar_worker = Worker(ar_app.state.node, http=es_http)
        poll = ar_app.state.node.settings.worker_poll_seconds
        last_poll = [time.perf_counter()]

        def one_request() -> None:
            response = es_http.post("/api/v1/requests", json=body)
            if response.status_code != 201:
                raise RuntimeError(f"submission failed: {response.status_code} {response.text}")
            while es_worker.run_once():  # the worker loops until a round finds nothing
                pass
            if time.perf_counter() - last_poll[0] >= poll:  # the receiver's idle worker
                ar_worker.run_once()
                last_poll[0] = time.perf_counter()

        with appending(*with_appends):
            for _ in range(max(20, block)):  # warm-up, not measured
                one_request()
        elapsed = {"with": 0.0, "without": 0.0}
        cpu = {"with": 0.0, "without": 0.0}
        done = {"with": 0, "without": 0}
        pairs: list[tuple[float, float]] = []  # each pair's overhead: wall time, CPU time
        inside: dict[str, float] = {}  # seconds inside audit functions, "with" blocks only
        appends = 0
        for _ in range(max(1, requests // (2 * block))):
            order = ["with", "without"]
            rng.shuffle(order)
            spent: dict[str, tuple[float, float]] = {}
            for mode in order:
                clock.reset()
                with appending(*(with_appends if mode == "with" else without_appends)):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    for _ in range(block):
                        one_request()
                    spent[mode] = (time.perf_counter() - start, time.process_time() - start_cpu)
                elapsed[mode] += spent[mode][0]
                cpu[mode] += spent[mode][1]
                done[mode] += block
                if mode == "with":
                    for category, seconds in clock.seconds.items():
                        inside[category] = inside.get(category, 0.0) + seconds
                    appends += clock.calls.get("append", 0)
            (with_s, with_cpu), (without_s, without_cpu) = spent["with"], spent["without"]
            pairs.append((1 - without_s / with_s, 1 - without_cpu / with_cpu))
        receipts = _receipts(es_app.state.node) - receipts_before
        submitted = done["with"] + done["without"] + max(20, block)
        if receipts < submitted:
            raise RuntimeError(f"only {receipts} of {submitted} requests were receipted")

    with_rate = done["with"] / elapsed["with"]
    without_rate = done["without"] / elapsed["without"]
    append_s = inside.get("append", 0.0)
    trail_s = append_s + inside.get("checkpoint", 0.0) + inside.get("witness", 0.0)
    return {
        "requests_with_audit": done["with"],
        "requests_without_appends": done["without"],
        "requests_per_s": round(with_rate, 2),
        "requests_per_s_without_appends": round(without_rate, 2),
        # Per pair, for the median over all runs' pairs (see summarise).
        "ab_pairs": [round(wall, 4) for wall, _ in pairs],
        "ab_cpu_pairs": [round(cpu_share, 4) for _, cpu_share in pairs],
        "ab_pooled_overhead": round(1 - with_rate / without_rate, 4),
        "cpu_ms_per_request": round(1000 * cpu["with"] / done["with"], 3),
        "cpu_ms_per_request_without_appends": round(1000 * cpu["without"] / done["without"], 3),
        "entries_per_request": round(appends / done["with"], 2),
        "append_ms_per_entry": round(1000 * append_s / max(1, appends), 3),
        "timer_append_share": round(append_s / elapsed["with"], 4),
        "timer_trail_share": round(trail_s / elapsed["with"], 4),
        "requests_per_s_minus_append_time": round(done["with"] / (elapsed["with"] - append_s), 2),
        "load_1m": round(os.getloadavg()[0], 2),
    }


# --- (b) a large log ---------------------------------------------------------------------------

PEERS = ["AR/MPF", "FR/DACG", "DE/BMJ", "IT/MG", "PT/PGR", "BR/MJSP", "MX/FGR", "CL/MP"]
PEERS += ["CO/FGN", "PE/MP", "UY/MEC", "BE/SPF"]
OFFICERS = [f"client:officer{number:02d}" for number in range(40)]


def traffic(rng: random.Random) -> Iterator[Event]:
    """A node's audit events: outbound and inbound journeys, reads, refusals, admin work."""

    def hexid(size: int = 16) -> str:
        return rng.randbytes(size).hex()

    while True:
        roll = rng.random()
        peer, officer, case, msg, envelope = (
            rng.choice(PEERS),
            rng.choice(OFFICERS),
            hexid(),
            hexid(),
            hexid(32),
        )
        if roll < 0.45:  # an outbound request: submitted, sealed, delivered, receipted
            urgency = rng.choice(["routine", "routine", "urgent", "very_urgent"])
            details = {"attachments": rng.randrange(4), "urgency": urgency}
            yield Event(officer, "request.submitted", "ok", case, msg, peer, details)
            details = {"envelope_hash": envelope, "size": rng.randrange(3000, 90000)}
            yield Event(officer, "envelope.sealed", "ok", case, msg, peer, details)
            attempt = 1
            while rng.random() < 0.06:
                details = {"attempt": attempt, "error": "transport: ConnectTimeout"}
                yield Event("node", "delivery.attempt", "retry", case, msg, peer, details)
                attempt += 1
            details = {"attempt": attempt, "error": None, "trace_id": hexid()}
            yield Event("node", "delivery.attempt", "delivered", case, msg, peer, details)
            details = {"envelope_hash": envelope, "signer_kid": hexid()}
            yield Event("node", "receipt.received", "ok", case, msg, peer, details)
            if rng.random() < 0.3:
                details = {"size": rng.randrange(10**6), "root": hexid(32)}
                yield Event("node", "witness.cosigned", peer=peer, details=details)
        elif roll < 0.85:  # an inbound request: received, receipted, read, answered
            details = {"envelope_hash": envelope, "type": "request"}
            yield Event(f"peer:{peer}", "envelope.received", "ok", case, msg, peer, details)
            details = {"envelope_hash": envelope}
            yield Event("node", "receipt.issued", "ok", case, msg, peer, details)
            for _ in range(rng.randrange(1, 4)):
                details = {"messages": rng.randrange(1, 4)}
                yield Event(rng.choice(OFFICERS), "request.read", "ok", case, None, peer, details)
            if rng.random() < 0.5:
                reply = hexid()
                details = {"type": "acknowledgement", "status": "acknowledged"}
                yield Event(officer, "message.submitted", "ok", case, reply, peer, details)
                details = {"attempt": 1, "error": None, "trace_id": hexid()}
                yield Event("node", "delivery.attempt", "delivered", case, reply, peer, details)
        elif roll < 0.93:
            address = "address:10." + ".".join(str(rng.randrange(256)) for _ in range(3))
            code = rng.choice(["invalid_token", "expired_token", "revoked_token"])
            yield Event(address, "auth.failed", code, details={"route": "/api/v1/requests"})
        elif roll < 0.97:
            details = {"index": 0, "sha256": hexid(32)}
            yield Event(officer, "attachment.downloaded", "ok", case, msg, peer, details)
        elif roll < 0.99:
            code = rng.choice(["bad_signature", "replayed", "expired", "unknown_sender"])
            details = {"code": code, "detail": "refused", "claimed": True}
            yield Event(f"peer:{peer}", "envelope.refused", code, None, msg, peer, details)
        else:
            action = rng.choice(["peer.changed", "client.created", "key.rotated", "client.revoked"])
            target = peer if action == "peer.changed" else None
            yield Event("operator:root", action, peer=target, details={"by": "administration"})


@dataclass
class BigLog:
    node: Node
    entries: int
    sample: list[dict[str, Any]]
    build_seconds: float


ENTRY_COLUMNS = ["idx", "recorded_at", "actor", "action", "outcome", "request_id", "msg_id"]
ENTRY_COLUMNS += ["peer", "entry", "leaf_hash", "mac"]
INDEX_COLUMNS = ["idx", "recorded_at", "actor", "action", "outcome", "request_id", "peer"]
NODE_COLUMNS = ["level", "position", "hash"]


class BulkWriter:
    """Writes the test log fast: COPY on PostgreSQL; on SQLite plain executemany, a large
    cache and no fsync per chunk. Only for building the log the benchmark reads."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.postgres = self.engine.dialect.name == "postgresql"
        if not self.postgres:

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA cache_size=-262144")
                cursor.execute("PRAGMA synchronous=OFF")
                cursor.close()

        # Times go in exactly as the model's column type would write them.
        column_type = AuditEntry.__table__.c.recorded_at.type
        processor = column_type.dialect_impl(self.engine.dialect).bind_processor(
            self.engine.dialect
        )
        self._time_processor: Callable[[Any], Any] | None = processor

    def to_db_time(self, moment: datetime) -> Any:
        return self._time_processor(moment) if self._time_processor else moment

    def write(
        self, connection: Any, table: str, columns: list[str], rows: list[tuple[Any, ...]]
    ) -> None:
        dbapi = connection.connection.dbapi_connection
        names = ", ".join(columns)  # the benchmark's own constants, not input
        if self.postgres:
            with (
                dbapi.cursor() as cursor,
                cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
            return
        marks = ", ".join("?" for _ in columns)
        dbapi.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)  # noqa: S608

    def close(self) -> None:
        self.engine.dispose()


def build_log(url: str, workdir: Path, *, entries: int, rng: random.Random) -> BigLog:
    """Entries exactly as `record` writes them, in bulk; then real appends and a checkpoint."""
    started = time.perf_counter()
    upgrade(url)
    bulk = BulkWriter(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    keys = NodeKeys.generate()
    identity = NodeIdentity(AUTHORITY, "Ministerio de Justicia", "https://es.example")
    settings = Settings(database_url=url, keys_dir=workdir / "unused-keys")
    node = Node(settings=settings, identity=identity, keys=keys, engine=engine, sessions=sessions)
    origin = log_origin(AUTHORITY)
    entries_key = mac_key(keys.log)
    compact = CompactRange()
    last_leaf: bytes | None = None
    end = utc_now() - timedelta(hours=1)
    step = timedelta(days=365) / max(entries, 1)
    start = moment = end - step * entries
    sample: list[dict[str, Any]] = []
    events = traffic(rng)
    rows: list[tuple[Any, ...]] = []
    nodes: list[tuple[int, int, bytes]] = []
    notes: list[dict[str, Any]] = []
    # The worker indexes in batches: the log ends with a tail not yet indexed.
    unindexed_from = entries - (INDEX_BATCH - 1)

    def keep(level: int, position: int, digest: bytes) -> None:
        if level >= audit_log.STORED_LEVEL:
            nodes.append((level, position, digest))

    def flush() -> None:
        with bulk.engine.begin() as connection:
            bulk.write(connection, "audit_entries", ENTRY_COLUMNS, rows)
            # The query index, as the worker fills it: all but the last batch's worth.
            indexed = [row[:6] + row[7:8] for row in rows if row[0] < unindexed_from]
            bulk.write(connection, "audit_index", INDEX_COLUMNS, indexed)
            bulk.write(connection, "audit_nodes", NODE_COLUMNS, nodes)
            if notes:
                connection.execute(insert(AuditCheckpoint), notes)
            connection.execute(
                update(AuditHead)
                .where(AuditHead.id == audit_log.HEAD_ID)
                .values(
                    size=compact.size,
                    compact_range=compact.to_bytes(),
                    root_hash=compact.root(),
                    last_leaf_hash=last_leaf,
                    last_checkpoint_size=compact.size - compact.size % CHECKPOINT_EVERY,
                    updated_at=moment,
                )
            )
        rows.clear()
        nodes.clear()
        notes.clear()

    for idx in range(entries):
        event = next(events)
        moment = start + step * (idx + rng.random())  # jittered, never backwards
        fields = {
            "v": audit_log.ENTRY_VERSION,
            "idx": idx,
            "time": format_time(moment),
            "actor": event.actor,
            "action": event.action,
            "outcome": event.outcome,
            "request_id": event.request_id,
            "msg_id": event.msg_id,
            "peer": event.peer,
            "details": event.details,
            "prev_leaf": last_leaf.hex() if last_leaf else None,
        }
        data = canonical_json(fields)
        last_leaf = leaf_hash(data)
        compact.append(last_leaf, visit=keep)
        row = (idx, bulk.to_db_time(moment), event.actor, event.action, event.outcome)
        mac = entry_mac(entries_key, data)  # as `record` writes it
        rows.append((*row, event.request_id, event.msg_id, event.peer, data, last_leaf, mac))
        if rng.random() < 0.02:
            sample.append({**fields, "recorded_at": moment})
        if compact.size % CHECKPOINT_EVERY == 0:
            marked = (MACS_EXTENSION,)  # as the node's: the entries after it carry MACs
            body = Checkpoint(origin, compact.size, compact.root(), extensions=marked).format()
            notes.append(
                {
                    "size": compact.size,
                    "root_hash": compact.root(),
                    "note": sign_note(body, origin, keys.log),
                    "created_at": moment,
                }
            )
        if len(rows) >= BUILD_CHUNK:
            flush()
            if idx // BUILD_CHUNK % 10 == 9:
                say(f"  built {idx + 1} entries")
    flush()
    bulk.close()
    # The shipped append path continues the bulk-written log: head, compact range and
    # subtree nodes must be exactly what `record` itself would have left.
    with unit_of_work(sessions) as session:
        for number in range(3):
            audit_log.record(session, actor="node", action="bench.appended", details={"n": number})
        sign_checkpoint(session, authority_id=AUTHORITY, log_key=keys.log)
    if url.startswith("postgresql"):
        with engine.connect() as connection:
            connection.execute(text("ANALYZE"))
            connection.commit()
    return BigLog(node, entries + 3, sample, time.perf_counter() - started)


# --- (b) verification --------------------------------------------------------------------------


def _cli_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("ENTRAIDE_")}


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (worker processes)."""
    mine, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def verify_run(log: BigLog, folder: Path) -> dict[str, Any]:
    node = log.node
    cpu, start = cpu_seconds(), time.perf_counter()
    report = verify_export(folder)
    export_s, export_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if not report.ok:
        raise RuntimeError(f"the export does not verify: {report.first}")
    start = time.perf_counter()
    with unit_of_work(node.sessions) as session:
        report = verify_database(
            session, authority_id=node.authority_id, log_public=node.keys.log_public
        )
    database_s = time.perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"the database log does not verify: {report.first}")
    cpu, start = cpu_seconds(), time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "app", "audit", "verify", str(folder)],
        cwd=ROOT,
        env=_cli_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    cli_s, cli_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if result.returncode != 0:
        raise RuntimeError(f"entraide audit verify failed: {result.stderr[-2000:]}")
    entries = report.entries
    return {
        "entries": entries,
        "checkpoints": report.checkpoints,
        "verify_export_s": round(export_s, 3),
        "verify_export_entries_per_s": round(entries / export_s),
        # All processes together: what the check costs, whatever else the machine is doing.
        "verify_export_cpu_s": round(export_cpu, 2),
        "verify_export_entries_per_cpu_s": round(entries / export_cpu),
        "verify_db_s": round(database_s, 3),
        "verify_db_entries_per_s": round(entries / database_s),
        "cli_verify_s": round(cli_s, 3),
        "cli_entries_per_s": round(entries / cli_s),
        "cli_cpu_s": round(cli_cpu, 2),
        "load_1m": round(os.getloadavg()[0], 2),
    }


# --- (c) queries -------------------------------------------------------------------------------

WINDOWS = [timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=30)]
WINDOWS += [timedelta(days=365)]
KINDS = ["time", "actor", "action", "request_id", "peer", "outcome"]


DISJOINT = [
    EntryFilter(actor="node", action="request.read"),
    EntryFilter(actor=OFFICERS[0], action="receipt.issued"),
    EntryFilter(peer=PEERS[0], action="auth.failed"),
]


def random_filter(rng: random.Random, sample: list[dict[str, Any]]) -> EntryFilter:
    if rng.random() < 0.05:
        return EntryFilter()
    entry = rng.choice(sample)
    kinds = rng.sample(KINDS, rng.choice([1, 1, 2, 2, 3]))
    values: dict[str, Any] = {}
    for kind in kinds:
        if kind == "time":
            window = rng.choice(WINDOWS)
            since = entry["recorded_at"] - window * rng.random()
            bounds = rng.choice(["both", "both", "since", "until"])
            if bounds != "until":
                values["since"] = since
            if bounds != "since":
                values["until"] = since + window
        elif entry[kind] is not None:
            values[kind] = entry[kind]
    return EntryFilter(**values)


def describe(where: EntryFilter) -> dict[str, str]:
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in vars(where).items()
        if value is not None
    }


def query_run(log: BigLog, *, queries: int, rng: random.Random) -> dict[str, Any]:
    sessions: sessionmaker[Session] = log.node.sessions
    timings: list[tuple[float, dict[str, Any]]] = []
    for _ in range(queries):
        where = random_filter(rng, log.sample)
        before: int | None = None
        for page in range(rng.choice([1, 1, 2, 3])):
            start = time.perf_counter()
            with unit_of_work(sessions) as session:
                rows, before = query_entries(session, where=where, before=before, limit=PAGE)
                items = [entry_view(row) for row in rows]
            elapsed = (time.perf_counter() - start) * 1000
            timings.append((elapsed, {**describe(where), "page": page + 1, "items": len(items)}))
            if before is None:
                break
    values = [elapsed for elapsed, _ in timings]
    slowest = sorted(timings, key=lambda item: item[0], reverse=True)[:5]
    # Not in the percentiles: two common values that never occur together. No single-column
    # index can answer that without reading one of them in full.
    disjoint = []
    for where in DISJOINT:
        start = time.perf_counter()
        with unit_of_work(sessions) as session:
            rows, _ = query_entries(session, where=where, before=None, limit=PAGE)
        disjoint.append((time.perf_counter() - start) * 1000)
        if rows:
            raise RuntimeError(f"{describe(where)} was meant to match nothing")
    return {
        "calls": len(values),
        "p50_ms": round(percentile(values, 0.50), 2),
        "p99_ms": round(percentile(values, 0.99), 2),
        "max_ms": round(max(values), 2),
        "disjoint_pair_max_ms": round(max(disjoint), 1),
        "load_1m": round(os.getloadavg()[0], 2),
        "slowest": [{"ms": round(ms, 2), **what} for ms, what in slowest],
    }


# --- one backend, then the report --------------------------------------------------------------


@contextmanager
def databases(backend: str, workdir: Path) -> Iterator[tuple[str, str, str]]:
    if backend == "sqlite":
        yield tuple(f"sqlite:///{workdir / name}.db" for name in ("es", "ar", "log"))  # type: ignore[misc]
        return
    with (
        postgres_database("es") as es,
        postgres_database("ar") as ar,
        postgres_database("log") as log,
    ):
        yield es, ar, log


def run_backend(backend: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"entraide-bench-audit-{backend}-"))
    try:
        with databases(backend, workdir) as (es_url, ar_url, log_url):
            say(f"{backend}: setting up two nodes")
            pair = prepare_pair(workdir, es_url, ar_url)
            path_runs = []
            for run in range(args.runs):
                say(f"{backend}: request path, run {run + 1}/{args.runs}")
                path_runs.append(
                    request_path_run(pair, requests=args.requests, block=args.block, rng=rng)
                )
            say(f"{backend}: building a log of {args.entries} entries")
            log = build_log(log_url, workdir, entries=args.entries, rng=rng)
            say(f"{backend}: built in {log.build_seconds:.0f}s; exporting")
            folder = workdir / "export"
            start = time.perf_counter()
            with unit_of_work(log.node.sessions) as session:
                export_log(session, log.node, folder)
            export_s = time.perf_counter() - start
            verify_runs, query_runs = [], []
            for run in range(args.runs):
                say(f"{backend}: verify, run {run + 1}/{args.runs}")
                verify_runs.append(verify_run(log, folder))
                say(f"{backend}: queries, run {run + 1}/{args.runs}")
                query_runs.append(query_run(log, queries=args.queries, rng=rng))
            log.node.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "backend": backend,
        "request_path": {"runs": path_runs, "medians": medians(path_runs)},
        "log": {"entries": log.entries, "build_s": round(log.build_seconds, 1)},
        "export_s": round(export_s, 2),
        "verify": {"runs": verify_runs, "medians": medians(verify_runs)},
        "query": {"runs": query_runs, "medians": medians(query_runs)},
    }


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    path = result["request_path"]["medians"]
    runs = result["request_path"]["runs"]
    verify = result["verify"]["medians"]
    query = result["query"]["medians"]
    # The median over every pair of every run: pairs are adjacent in time, so the machine's
    # other load shifts both halves of a pair alike, and an unlucky pair is outvoted.
    ab = median([share for run in runs for share in run["ab_pairs"]])
    ab_cpu = median([share for run in runs for share in run["ab_cpu_pairs"]])
    append_share = max(ab, path["timer_append_share"])
    return {
        "backend": result["backend"],
        "requests_per_s": path["requests_per_s"],
        "requests_per_s_without_appends": path["requests_per_s_without_appends"],
        "requests_per_s_minus_append_time": path["requests_per_s_minus_append_time"],
        "ab_append_overhead": round(ab, 4),
        "ab_pairs": sum(len(run["ab_pairs"]) for run in runs),
        "ab_cpu_overhead": round(ab_cpu, 4),
        "ab_pooled_overhead": path["ab_pooled_overhead"],
        "timer_append_share": path["timer_append_share"],
        "timer_trail_share": path["timer_trail_share"],
        "append_ok": append_share <= TARGET_APPEND_SHARE,
        "log_entries": result["log"]["entries"],
        "verify_export_entries_per_s": verify["verify_export_entries_per_s"],
        "verify_export_entries_per_cpu_s": verify["verify_export_entries_per_cpu_s"],
        "verify_db_entries_per_s": verify["verify_db_entries_per_s"],
        "cli_entries_per_s": verify["cli_entries_per_s"],
        "verify_ok": verify["verify_export_entries_per_s"] >= TARGET_VERIFY_PER_S,
        "query_p50_ms": query["p50_ms"],
        "query_p99_ms": query["p99_ms"],
        "query_ok": query["p99_ms"] < TARGET_QUERY_P99_MS,
        "query_disjoint_pair_max_ms": query["disjoint_pair_max_ms"],
    }


def print_backend(summary: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"== {summary['backend']} (medians of the runs)")
    print(
        f"  request path: {summary['requests_per_s']:.1f} req/s with appends, "
        f"{summary['requests_per_s_without_appends']:.1f} without (A/B): "
        f"{100 * summary['ab_append_overhead']:.1f}% overhead (median of "
        f"{summary['ab_pairs']} pairs; in CPU time {100 * summary['ab_cpu_overhead']:.1f}%); "
        "time inside record(): "
        f"{100 * summary['timer_append_share']:.1f}% "
        f"({summary['requests_per_s_minus_append_time']:.1f} req/s without it), "
        f"whole trail incl. checkpoints and witnessing {100 * summary['timer_trail_share']:.1f}%"
        f"  [target <= 5%: {verdict(summary['append_ok'])}]"
    )
    print(
        f"  verify {summary['log_entries']} entries: export "
        f"{summary['verify_export_entries_per_s']}/s "
        f"({summary['verify_export_entries_per_cpu_s']} per CPU-second), database "
        f"{summary['verify_db_entries_per_s']}/s, `entraide audit verify DIR` "
        f"{summary['cli_entries_per_s']}/s incl. start-up"
        f"  [target >= 300000/s: {verdict(summary['verify_ok'])}]"
    )
    print(
        f"  query: p50 {summary['query_p50_ms']} ms, p99 {summary['query_p99_ms']} ms"
        f"  [target p99 < 50 ms: {verdict(summary['query_ok'])}]; two common values that "
        f"never occur together: {summary['query_disjoint_pair_max_ms']} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--requests", type=int, default=600, help="per run, half of them A, half B")
    parser.add_argument("--block", type=int, default=10, help="requests per A or B block")
    parser.add_argument("--queries", type=int, default=600, help="filters per run")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if "postgresql" in backends and not postgres_available():
        say("PostgreSQL is not reachable; skipping it")
        backends.remove("postgresql")
    rng = random.Random(args.seed)
    started = datetime.now(UTC)
    results = [run_backend(backend, args, rng) for backend in backends]
    summaries = [summarise(result) for result in results]
    for summary in summaries:
        print_backend(summary)
    figures = {
        "benchmark": "audit",
        "entries": args.entries,
        "runs": args.runs,
        "targets": {
            "append_share_max": TARGET_APPEND_SHARE,
            "verify_entries_per_s_min": TARGET_VERIFY_PER_S,
            "query_p99_ms_max": TARGET_QUERY_P99_MS,
        },
        "backends": summaries,
        "ok": all(s["append_ok"] and s["verify_ok"] and s["query_ok"] for s in summaries),
    }
    path = write_results(
        "audit",
        {
            "started_at": started.isoformat(),
            "machine": machine(),
            "args": vars(args),
            "results": results,
            "summary": figures,
        },
    )
    say(f"wrote {path.relative_to(ROOT)}")
    print(json.dumps(figures, sort_keys=True))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

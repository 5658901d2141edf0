"""Pre-fill two stopped nodes with N requests each way, as if they had run for a year.

The sender (ES/MJ) gets N outbound requests, delivered and receipted: request, message,
sealed part, outbox row (delivered), delivery attempt, receipt, and the four audit entries a
real journey writes (request.submitted, envelope.sealed, delivery.attempt, receipt.received).
The receiver (AR/MPF) gets the same N requests inbound: request, message, part, issued
receipt, and its two audit entries (envelope.received, receipt.issued).

Rows are bulk-inserted (executemany on SQLite, COPY on PostgreSQL), never through the API, but
they are the real schema's rows at real sizes: headers and receipts are copies of real ones
from the warm-up (with their own msg_id), ciphertexts are random bytes of the real length. The
audit log is a true continuation of each node's own: canonical entries, RFC 9162 leaf hashes,
the compact range and every subtree node it completes, a checkpoint signed with the node's
log key every 1000 entries, so the peers' witnessing (consistency proofs across the jump)
keeps verifying, and the head is left where `record` would have left it.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import orjson
import psycopg

from app.audit.checkpoints import log_origin
from app.audit.log import STORED_LEVEL
from app.audit.mac import MACS_EXTENSION, entry_mac, mac_key, macs_of
from app.audit.merkle import CompactRange, leaf_hash
from app.audit.note import Checkpoint, sign_note
from app.crypto.encoding import canonical_json, format_time
from app.crypto.keys import load_keys
from app.delivery.outbox import priority_of
from app.localnodes import LocalNode
from bench._pair import Pair, Probe

CHUNK = 5_000  # requests per transaction
CHECKPOINT_EVERY = 1000  # Settings.audit_checkpoint_every

COLUMNS: dict[str, tuple[str, ...]] = {
    "requests": (
        "id direction peer_authority status urgency created_at updated_at requested_date "
        "acknowledge_by decide_by execute_by postponed_until due_at handling restricted"
    ).split(),
    "messages": (
        "id msg_id request_id direction sender_authority recipient_authority in_reply_to "
        "created_at expires_at received_at header signature envelope_hash size_bytes"
    ).split(),
    "parts": "id message_id part_index ciphertext".split(),
    "outbox": (
        "id message_id peer_authority state attempts next_attempt_at lease_until last_error "
        "created_at delivered_at expires_at lease_owner trace_id updated_at request_id "
        "priority size_bytes"
    ).split(),
    "delivery_attempts": (
        "id outbox_id attempt worker started_at finished_at outcome http_status error"
    ).split(),
    "receipts": "id message_id body signature signer_kid received_at stored_at".split(),
    "audit_entries": (
        "idx recorded_at actor action outcome request_id msg_id peer entry leaf_hash mac"
    ).split(),
    "audit_nodes": "level position hash".split(),
    "audit_index": "idx recorded_at actor action outcome request_id peer".split(),
    "audit_checkpoints": "id size root_hash note created_at".split(),
}


@dataclass(frozen=True)
class Target:
    """What the fill needs of a node (a LocalNode holds a process handle: not for a pool)."""

    authority_id: str
    database_url: str
    keys_dir: Path

    @classmethod
    def of(cls, node: LocalNode) -> Target:
        return cls(node.authority_id, node.database_url, node.keys_dir)


class Writer:
    """Bulk rows into one node's database; SQLite strings its times as SQLAlchemy does."""

    def __init__(self, url: str) -> None:
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            self.db = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
            # Setting up the test data only: the node's own writes keep their fsyncs.
            self.db.execute("PRAGMA synchronous=OFF")
            self.db.execute("PRAGMA cache_size=-262144")
        else:
            plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
            self.pg = psycopg.connect(plain)

    def scalar(self, sql: str) -> Any:
        if self.sqlite:
            return self.db.execute(sql).fetchone()[0]
        row = self.pg.execute(sql).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None

    def _value(self, value: Any) -> Any:
        kind = type(value)
        if kind is datetime:
            text = str(value.replace(tzinfo=None))  # every time here is UTC already
            return text if len(text) > 19 else text + ".000000"
        if kind is bool:
            return int(value)
        if kind is date:
            return value.isoformat()
        return value

    def write(self, batches: dict[str, list[tuple[Any, ...]]]) -> None:
        if self.sqlite:
            self.db.execute("BEGIN")
            for table, rows in batches.items():
                if not rows:
                    continue
                columns = COLUMNS[table]
                marks = ", ".join("?" * len(columns))
                convert = self._value
                self.db.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                    [tuple(map(convert, row)) for row in rows],
                )
            self.db.execute("COMMIT")
            return
        with self.pg.cursor() as cursor:
            for table, rows in batches.items():
                if not rows:
                    continue
                statement = f"COPY {table} ({', '.join(COLUMNS[table])}) FROM STDIN"
                with cursor.copy(statement) as copy:  # type: ignore[arg-type]
                    for row in rows:
                        copy.write_row(row)
        self.pg.commit()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        if self.sqlite:
            self.db.execute(sql.replace("%s", "?"), [self._value(value) for value in params])
        else:
            self.pg.execute(sql, params)  # type: ignore[arg-type]
            self.pg.commit()

    def finish(self) -> None:
        if self.sqlite:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
            return
        self.pg.autocommit = True
        for table in ("messages", "parts", "outbox", "delivery_attempts"):
            self.pg.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # type: ignore[arg-type]  # noqa: S608
                f"(SELECT coalesce(max(id), 1) FROM {table}))"
            )
        for table in ("receipts", "audit_checkpoints"):
            self.pg.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # type: ignore[arg-type]  # noqa: S608
                f"(SELECT coalesce(max(id), 1) FROM {table}))"
            )
        self.pg.execute("ANALYZE")  # as autovacuum would within a minute
        self.pg.close()


class AuditTail:
    """Appends entries exactly as app.audit.log.record does, from the node's current head."""

    def __init__(self, writer: Writer, node: Target) -> None:
        head = Probe(node.database_url)
        row = head.rows("SELECT size, compact_range, last_leaf_hash FROM audit_head WHERE id = 1")[
            0
        ]
        head.close()
        self.compact = CompactRange.from_bytes(bytes(row[1]))
        # The auditor's query index must stay a prefix of the log (app/audit/index.py): the
        # node's own entries so far go in before the pre-filled ones that follow them.
        writer.execute(
            "INSERT INTO audit_index (idx, recorded_at, actor, action, outcome, request_id, peer) "
            "SELECT idx, recorded_at, actor, action, outcome, request_id, peer FROM audit_entries "
            "WHERE idx < %s ON CONFLICT (idx) DO NOTHING",
            [self.compact.size],
        )
        self.last_entry: tuple[int, bytes] | None = None
        self.last_leaf: bytes | None = bytes(row[2]) if row[2] is not None else None
        self.origin = log_origin(node.authority_id)
        self.log_key = load_keys(node.keys_dir).log
        self.mac_key = mac_key(self.log_key)  # each entry's MAC, as the node's appends write it
        self.checkpoint_id = int(
            writer.scalar("SELECT coalesce(max(id), 0) FROM audit_checkpoints")
        )
        self.entries: list[tuple[Any, ...]] = []
        self.nodes: list[tuple[Any, ...]] = []
        self.index: list[tuple[Any, ...]] = []
        self.checkpoints: list[tuple[Any, ...]] = []
        self.moment = datetime.now(UTC)
        self.checked = 0

    def append(
        self,
        moment: datetime,
        actor: str,
        action: str,
        outcome: str,
        request_id: str,
        msg_id: str,
        peer: str,
        details: dict[str, Any],
    ) -> None:
        idx = self.compact.size
        fields = {
            "v": 1,
            "idx": idx,
            "time": format_time(moment),
            "actor": actor,
            "action": action,
            "outcome": outcome,
            "request_id": request_id,
            "msg_id": msg_id,
            "peer": peer,
            "details": details,
            "prev_leaf": self.last_leaf.hex() if self.last_leaf else None,
        }
        # orjson writes exactly canonical_json's bytes for these values (ASCII text, integers,
        # null, sorted keys, no spaces): checked on the first entries, then trusted.
        data = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
        if self.checked < 1000:
            if data != canonical_json(fields):
                raise RuntimeError("orjson and canonical_json disagree on an audit entry")
            self.checked += 1
        leaf = leaf_hash(data)
        # The node stores only subtrees of 2**STORED_LEVEL leaves and more (app/audit/log.py).
        self.compact.append(
            leaf,
            visit=lambda level, position, digest: (
                self.nodes.append((level, position, digest)) if level >= STORED_LEVEL else None
            ),
        )
        self.last_leaf = leaf
        self.last_entry = (idx, data)
        self.moment = moment
        self.entries.append(
            (
                idx,
                moment,
                actor,
                action,
                outcome,
                request_id,
                msg_id,
                peer,
                data,
                leaf,
                entry_mac(self.mac_key, data),
            )
        )
        self.index.append((idx, moment, actor, action, outcome, request_id, peer))
        if self.compact.size % CHECKPOINT_EVERY == 0:
            body = Checkpoint(
                origin=self.origin,
                size=self.compact.size,
                root_hash=self.compact.root(),
                extensions=(MACS_EXTENSION,),  # as the node's: the entries after it carry MACs
            ).format()
            self.checkpoint_id += 1
            self.checkpoints.append(
                (
                    self.checkpoint_id,
                    self.compact.size,
                    self.compact.root(),
                    sign_note(body, self.origin, self.log_key),
                    moment,
                )
            )

    def drain(self) -> dict[str, list[tuple[Any, ...]]]:
        out = {
            "audit_entries": self.entries,
            "audit_nodes": self.nodes,
            "audit_index": self.index,
            "audit_checkpoints": self.checkpoints,
        }
        self.entries, self.nodes, self.index, self.checkpoints = [], [], [], []
        return out

    def close(self, writer: Writer) -> None:
        last_checkpoint = self.compact.size - self.compact.size % CHECKPOINT_EVERY
        if self.last_entry is not None:
            # As `record` leaves it: the entry the head ends on vouches for the head's root.
            idx, data = self.last_entry
            writer.execute(
                "UPDATE audit_entries SET mac = %s WHERE idx = %s",
                (macs_of(self.mac_key, data, self.compact.root()), idx),
            )
        writer.execute(
            "UPDATE audit_head SET size = %s, compact_range = %s, root_hash = %s, "
            "last_leaf_hash = %s, last_checkpoint_size = %s, updated_at = %s WHERE id = 1",
            (
                self.compact.size,
                self.compact.to_bytes(),
                self.compact.root(),
                self.last_leaf,
                max(last_checkpoint, 0),
                self.moment,
            ),
        )


def _templates(pair: Pair) -> dict[str, Any]:
    """A real outbound message of the sender and its inbound copy at the receiver."""
    sender, receiver = Probe(pair.es.database_url), Probe(pair.ar.database_url)
    try:
        out = sender.rows(
            "SELECT m.msg_id, m.header, m.signature, m.size_bytes, p.ciphertext, r.body, "
            "r.signature, r.signer_kid FROM messages m JOIN parts p ON p.message_id = m.id "
            "JOIN receipts r ON r.message_id = m.id WHERE m.direction = 'outbound' "
            "ORDER BY m.id DESC LIMIT 1"
        )[0]
        inbound = receiver.rows(
            "SELECT r.body, r.signature, r.signer_kid FROM receipts r "
            "JOIN messages m ON m.id = r.message_id WHERE m.msg_id = %s",
            (out[0],),
        )[0]
    finally:
        sender.close()
        receiver.close()
    return {
        "msg_id": out[0],
        "header": bytes(out[1]),
        "signature_len": len(bytes(out[2])),
        "size_bytes": int(out[3]),
        "ciphertext_len": len(bytes(out[4])),
        "receipt_body": bytes(out[5]),
        "receipt_signature_len": len(bytes(out[6])),
        "signer_kid": out[7],
        "issued_body": bytes(inbound[0]),
        "issued_kid": inbound[2],
    }


def _ids(writer: Writer) -> dict[str, int]:
    return {
        table: int(writer.scalar(f"SELECT coalesce(max(id), 0) FROM {table}"))  # noqa: S608
        for table in ("messages", "parts", "outbox", "delivery_attempts", "receipts")
    }


def _journeys(count: int, rng: random.Random) -> Iterator[tuple[str, datetime]]:
    now = datetime.now(UTC) - timedelta(hours=1)
    step = timedelta(days=365) / max(count, 1)
    start = now - step * count
    for number in range(count):
        yield rng.randbytes(16).hex(), start + step * number


def _fill(
    node: Target, *, outbound: bool, count: int, seed: int, template: dict[str, Any]
) -> dict[str, Any]:
    rng = random.Random(seed)
    writer = Writer(node.database_url)
    audit = AuditTail(writer, node)
    ids = _ids(writer)
    sender, receiver = "ES/MJ", "AR/MPF"
    peer = receiver if outbound else sender
    direction = "outbound" if outbound else "inbound"
    old_id = template["msg_id"].encode()
    rows: dict[str, list[tuple[Any, ...]]] = {table: [] for table in COLUMNS}
    written = 0
    started = time.perf_counter()

    def flush() -> None:
        nonlocal rows, written
        batch = {**rows, **audit.drain()}
        writer.write(batch)
        written += sum(len(table) for table in batch.values())
        rows = {table: [] for table in COLUMNS}

    for number, (msg_id, created) in enumerate(_journeys(count, rng)):
        later = created + timedelta(milliseconds=40 + rng.randrange(200))
        header = template["header"].replace(old_id, msg_id.encode())
        envelope_hash = rng.randbytes(32).hex()
        ids["messages"] += 1
        message_id = ids["messages"]
        requested = (created + timedelta(days=rng.randrange(10, 60))).date()
        urgency = rng.choice(["routine", "urgent"])
        rows["requests"].append(
            (
                msg_id,
                direction,
                peer,
                "delivered",
                urgency,
                created,
                later,
                requested,
                created + timedelta(days=10),
                created + timedelta(days=30),
                created + timedelta(days=90),
                None,
                created + timedelta(days=10),
                "no_tipping_off",
                False,
            )
        )
        rows["messages"].append(
            (
                message_id,
                msg_id,
                msg_id,
                direction,
                sender,
                receiver,
                None,
                created,
                created + timedelta(days=7),
                None if outbound else later,
                header,
                rng.randbytes(template["signature_len"]),
                envelope_hash,
                template["size_bytes"],
            )
        )
        ids["parts"] += 1
        rows["parts"].append(
            (ids["parts"], message_id, 0, rng.randbytes(template["ciphertext_len"]))
        )
        ids["receipts"] += 1
        body = (template["receipt_body"] if outbound else template["issued_body"]).replace(
            old_id, msg_id.encode()
        )
        rows["receipts"].append(
            (
                ids["receipts"],
                message_id,
                body,
                rng.randbytes(template["receipt_signature_len"]),
                template["signer_kid"] if outbound else template["issued_kid"],
                later,
                later,
            )
        )
        if outbound:
            ids["outbox"] += 1
            rows["outbox"].append(
                (
                    ids["outbox"],
                    message_id,
                    peer,
                    "delivered",
                    1,
                    created,
                    None,
                    None,
                    created,
                    later,
                    created + timedelta(days=2),
                    None,
                    rng.randbytes(16).hex(),
                    later,
                    msg_id,  # the request's id: a request is its first message's id here
                    priority_of(urgency),
                    template["size_bytes"],
                )
            )
            ids["delivery_attempts"] += 1
            rows["delivery_attempts"].append(
                (
                    ids["delivery_attempts"],
                    ids["outbox"],
                    1,
                    "bench:prefill",
                    created,
                    later,
                    "delivered",
                    201,
                    None,
                )
            )
            officer = f"client:officer{rng.randrange(40):02d}"
            audit.append(
                created,
                officer,
                "request.submitted",
                "ok",
                msg_id,
                msg_id,
                peer,
                {"attachments": 0, "urgency": "urgent"},
            )
            audit.append(
                created,
                officer,
                "envelope.sealed",
                "ok",
                msg_id,
                msg_id,
                peer,
                {"envelope_hash": envelope_hash, "size": template["size_bytes"]},
            )
            audit.append(
                later,
                "node",
                "delivery.attempt",
                "delivered",
                msg_id,
                msg_id,
                peer,
                {"attempt": 1, "error": None, "trace_id": rng.randbytes(16).hex()},
            )
            audit.append(
                later,
                "node",
                "receipt.received",
                "ok",
                msg_id,
                msg_id,
                peer,
                {"envelope_hash": envelope_hash, "signer_kid": template["signer_kid"]},
            )
        else:
            audit.append(
                later,
                f"peer:{sender}",
                "envelope.received",
                "ok",
                msg_id,
                msg_id,
                peer,
                {"envelope_hash": envelope_hash, "type": "request", "status": "delivered"},
            )
            audit.append(
                later,
                "node",
                "receipt.issued",
                "ok",
                msg_id,
                msg_id,
                peer,
                {"envelope_hash": envelope_hash},
            )
        if (number + 1) % CHUNK == 0:
            flush()
    flush()
    if outbound:  # the totals settlement keeps for /metrics (app/delivery/settle.py)
        for name in ("attempts:delivered", "delivered"):
            writer.execute(
                "INSERT INTO delivery_counters (name, value) VALUES (%s, %s) ON CONFLICT (name) "
                "DO UPDATE SET value = delivery_counters.value + excluded.value",
                (name, count),
            )
    audit.close(writer)
    writer.finish()
    return {"rows": written, "seconds": round(time.perf_counter() - started, 1)}


def prefill_pair(pair: Pair, *, count: int, seed: int = 1) -> dict[str, Any]:
    """Both nodes must be stopped. Returns what was written and how long it took."""
    started = time.perf_counter()
    template = _templates(pair)
    # The two databases are independent: fill them side by side, one process each.
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("fork")) as pool:
        sending = pool.submit(
            _fill, Target.of(pair.es), outbound=True, count=count, seed=seed, template=template
        )
        receiving = pool.submit(
            _fill, Target.of(pair.ar), outbound=False, count=count, seed=seed, template=template
        )
        sender, receiver = sending.result(), receiving.result()
    sizes = {
        node.authority_id: round(os.path.getsize(node.database_url.split("///", 1)[1]) / 2**20)
        for node in pair.nodes
        if node.database_url.startswith("sqlite")
    }
    return {
        "requests": count,
        "sender": sender,
        "receiver": receiver,
        "database_mib": sizes,
        "seconds": time.perf_counter() - started,
    }

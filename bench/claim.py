"""The delivery worker's claim with a backlog: how long one round's claim takes when many
deliveries are due at once (a peer back after an outage) on a node with a long history.

    python bench/claim.py [--backend sqlite|postgresql|both] [--stored 1000000]
                          [--due 20000] [--rounds 30] [--runs 3]

A database at the schema's head (Alembic, as `entraide init` makes it) is filled with
`--stored` outbound requests already delivered (request, message, delivered outbox row) and
`--due` requests waiting (queued or backing off, due now; one in ten of them with a second
message queued behind the first, which the claim must hold back; urgencies mixed as a real
backlog's: 5% emergency, 15% urgent). Rows are bulk-inserted, never through the API, at real
sizes. Then `app.delivery.outbox.claim_due` runs exactly as the worker calls it (its round's
limit, lease, size budget and `max_size`), in the worker's transaction, which is rolled back
so that every round sees the same backlog. The figure is the wall time of one claim.

No baseline is needed beside it: the figure is compared with itself for a database without
history (`--stored 0`), and against a round's whole budget (a claim of a few milliseconds
against posts and settlements of tens).

Prints the figures, writes bench/results/claim.json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, Table  # noqa: E402

from app.db import make_engine, make_session_factory  # noqa: E402
from app.delivery import outbox  # noqa: E402
from app.delivery.worker import PRELOAD_BYTES, ROUND_CLAIMS, RoundBudget  # noqa: E402
from app.migrate import upgrade  # noqa: E402
from app.models import CaseFile, Message, OutboxItem  # noqa: E402
from bench._common import machine, median, percentile, postgres_database, write_results  # noqa: E402

CHUNK = 10_000
PEER = "AR/MPF"
HEADER = bytes(random.Random(7).getrandbits(8) for _ in range(640))  # a real header's size
SIZE = 3_900  # a 2 KiB request's envelope, sealed


def _urgency(rng: random.Random) -> str:
    draw = rng.random()
    return "emergency" if draw < 0.05 else "urgent" if draw < 0.20 else "routine"


def _rows(
    start: int, count: int, *, due: bool, rng: random.Random, now: datetime
) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]]:
    """Requests, messages and outbox rows, CHUNK requests at a time."""
    for first in range(start, start + count, CHUNK):
        cases, messages, items = [], [], []
        for number in range(first, min(first + CHUNK, start + count)):
            request_id = f"{number:032x}"
            created = now - timedelta(seconds=(start + count - number))
            urgency = _urgency(rng)
            cases.append(
                {
                    "id": request_id,
                    "direction": "outbound",
                    "peer_authority": PEER,
                    "status": "submitted" if due else "acknowledged",
                    "urgency": urgency,
                    "created_at": created,
                    "updated_at": created,
                }
            )
            follow = due and number % 10 == 0
            for index in range(2 if follow else 1):
                message_id = number * 2 + index + 1
                messages.append(
                    {
                        "id": message_id,
                        "msg_id": f"{message_id:032x}",
                        "request_id": request_id,
                        "direction": "outbound",
                        "sender_authority": "ES/MJ",
                        "recipient_authority": PEER,
                        "created_at": created,
                        "expires_at": created + timedelta(days=30),
                        "header": HEADER,
                        "signature": HEADER[:64],
                        "envelope_hash": f"{message_id:064x}",
                        "size_bytes": SIZE,
                    }
                )
                state = (
                    outbox.DELIVERED
                    if not due
                    else outbox.RETRY
                    if number % 4 == 1
                    else outbox.QUEUED
                )
                items.append(
                    {
                        "id": message_id,
                        "message_id": message_id,
                        "request_id": request_id,
                        "peer_authority": PEER,
                        "state": state,
                        "priority": outbox.priority_of(urgency),
                        "size_bytes": SIZE,
                        "attempts": 1 if state == outbox.RETRY else 0 if due else 1,
                        "next_attempt_at": created,
                        "created_at": created,
                        "updated_at": created,
                        "delivered_at": None if due else created,
                        "expires_at": created + timedelta(days=30),
                    }
                )
        yield cases, messages, items


def fill(engine: Engine, *, stored: int, due: int, seed: int) -> float:
    """Bulk rows through Core inserts (SQLAlchemy's insertmanyvalues); returns seconds."""
    started = time.perf_counter()
    rng = random.Random(seed)
    now = datetime.now(UTC) - timedelta(minutes=1)
    tables = [CaseFile.__table__, Message.__table__, OutboxItem.__table__]
    for start, count, is_due in ((0, stored, False), (stored, due, True)):
        for batches in _rows(start, count, due=is_due, rng=rng, now=now):
            with engine.begin() as connection:
                for table, rows in zip(tables, batches, strict=True):
                    connection.execute(Table.insert(table), rows)  # type: ignore[arg-type]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            for name in ("messages", "outbox"):
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "  # noqa: S608
                    f"(SELECT coalesce(max(id), 1) FROM {name}))"
                )
    if engine.dialect.name == "postgresql":
        # As autovacuum would within a minute. SQLite is left without statistics, as a
        # node's database is (nothing runs ANALYZE there).
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


def time_claims(engine: Engine, rounds: int) -> list[dict[str, Any]]:
    """Each round: the worker's claim, timed, then rolled back (the backlog stays)."""
    factory = make_session_factory(engine)
    results = []
    for _ in range(rounds):
        session = factory()
        try:
            started = time.perf_counter()
            claims = outbox.claim_due(
                session,
                now=datetime.now(UTC),
                lease=timedelta(seconds=300),
                limit=ROUND_CLAIMS,
                owner="bench",
                admit=RoundBudget(0).admit,
                max_size=PRELOAD_BYTES,
            )
            elapsed = time.perf_counter() - started
        finally:
            session.rollback()
            session.close()
        results.append({"ms": elapsed * 1000, "claimed": len(claims)})
    return results


@contextmanager
def database(backend: str, label: str) -> Iterator[str]:
    if backend == "postgresql":
        with postgres_database(label) as url:
            yield url
        return
    directory = tempfile.mkdtemp(prefix="entraide-claim-")
    try:
        yield f"sqlite:///{directory}/node.db"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(backend: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    with database(backend, "claim") as url:
        upgrade(url)
        engine = make_engine(url)
        try:
            fill_s = fill(engine, stored=args.stored, due=args.due, seed=seed)
            timings = time_claims(engine, args.rounds)
        finally:
            engine.dispose()
    times = [row["ms"] for row in timings]
    return {
        "backend": backend,
        "stored": args.stored,
        "due": args.due,
        "fill_s": round(fill_s, 1),
        "claimed_per_round": timings[0]["claimed"],
        "claim_ms_p50": round(median(times), 2),
        "claim_ms_p90": round(percentile(times, 0.9), 2),
        "claim_ms_max": round(max(times), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results-name", default="claim")
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    started_at = datetime.now(UTC).isoformat()
    runs: list[dict[str, Any]] = []
    for number in range(args.runs):
        for backend in backends:
            result = run(backend, args, seed=number)
            runs.append(result)
            print(json.dumps(result), flush=True)
    summary: dict[str, Any] = {"stored": args.stored, "due": args.due}
    for backend in backends:
        mine = [row for row in runs if row["backend"] == backend]
        summary[f"{backend}_claim_ms_p50"] = median([row["claim_ms_p50"] for row in mine])
        summary[f"{backend}_claim_ms_p90"] = median([row["claim_ms_p90"] for row in mine])
        summary[f"{backend}_claimed_per_round"] = mine[0]["claimed_per_round"]
    write_results(
        args.results_name,
        {
            "started_at": started_at,
            "machine": machine(),
            "args": vars(args),
            "runs": runs,
            "medians": summary,
            "summary": summary,
        },
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

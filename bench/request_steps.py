"""Where a request's CPU goes: each step of the request path, one thread, no HTTP.

    python bench/request_steps.py [--backend sqlite|postgresql|both] [--requests 200]
                                  [--runs 3] [--profile]

Two nodes are set up by the operator's commands (as bench/throughput.py does), then stopped;
their databases and keys are driven here in-process, step by step, with the real functions the
routes and the worker call, one worker round at a time (16 submissions, then the worker's
batch): authenticate the officer's token (through the node's token cache, as the routes do),
validate the 2 KiB document, seal and store the submission; the worker's one transaction for
the checkpoint check, the claim and the envelopes' load; per envelope the receiver's transport
check and acceptance and the receipt's verification; the batch's settlement in one
transaction, and the witnessing of each new checkpoint of the receiver. Per-batch steps are
divided among the batch's requests. For each step: CPU of this
thread (time.thread_time, so other work on the machine weighs less than in wall time), wall
time, and SQL statements executed. HTTP is left out: bench/throughput.py's floor is its cost.

The baseline, in the same run: the machine's raw cryptographic rates. `--profile` also writes
a cProfile of the last run (CPU time) to bench/results/request_steps-BACKEND.prof.

Prints the table, writes bench/results/request_steps.json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import event  # noqa: E402

from app.audit.checkpoints import maybe_checkpoint  # noqa: E402
from app.audit.witness import witness_receipt_checkpoint  # noqa: E402
from app.auth.cache import TokenCache  # noqa: E402
from app.auth.service import Principal, authenticate, hash_token  # noqa: E402
from app.auth.throttle import blocked_for  # noqa: E402
from app.config import Settings  # noqa: E402
from app.crypto.encoding import utc_now  # noqa: E402
from app.crypto.receipts import decode_receipt  # noqa: E402
from app.db import unit_of_work  # noqa: E402
from app.delivery import outbox  # noqa: E402
from app.delivery.settle import Outcome, settle_batch  # noqa: E402
from app.delivery.worker import load_jobs  # noqa: E402
from app.node import Node, load_node  # noqa: E402
from app.p2p.service import accept_envelope  # noqa: E402
from app.peers.client import peer_http_client  # noqa: E402
from app.peers.keys import verify_peer_receipt  # noqa: E402
from app.requests import service as requests_service  # noqa: E402
from app.requests.schemas import SubmitRequest  # noqa: E402
from bench._common import machine, median, postgres_available, write_results  # noqa: E402
from bench._load import crypto_rates, request_bodies  # noqa: E402
from bench._pair import make_pair  # noqa: E402
from bench.throughput import databases  # noqa: E402

STEPS = [
    ("auth", "sender", "authenticate the token (cached for 1 s)"),
    ("validate", "sender", "validate the document"),
    ("submit", "sender", "seal, store, outbox, audit entries"),
    ("claim", "sender", "worker: checkpoint check, claim, load (per batch)"),
    ("transport", "receiver", "parse the body, transport check"),
    ("accept", "receiver", "accept: checks, open, store, audit, receipt"),
    ("verify", "sender", "verify the receipt"),
    ("settle", "sender", "settle: attempt, receipt, status, audit (per batch)"),
    ("witness", "sender", "witness the receiver's checkpoint (new notes)"),
]
BATCH = 16  # the worker's default claim size


class Meter:
    def __init__(self, nodes: list[Node]) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.sql: dict[str, int] = defaultdict(int)
        self.statements = 0
        for node in nodes:
            event.listen(node.engine, "before_cursor_execute", self._count)

    def _count(self, *_args: Any, **_kwargs: Any) -> None:
        self.statements += 1

    def reset(self) -> None:
        self.cpu.clear()
        self.wall.clear()
        self.sql.clear()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        cpu, wall, sql = time.thread_time(), time.perf_counter(), self.statements
        try:
            yield
        finally:
            self.cpu[name] += time.thread_time() - cpu
            self.wall[name] += time.perf_counter() - wall
            self.sql[name] += self.statements - sql


def journey(
    es: Node, ar: Node, token: str, bodies: list[bytes], meter: Meter, http: Any
) -> Callable[[int], None]:
    """One worker round: BATCH submissions, then what the worker does with them."""
    worker_id = "bench:request_steps"
    lease = timedelta(seconds=es.settings.lease_seconds)
    tokens = TokenCache()
    witnessed: dict[str, str] = {}

    def authenticate_cached() -> Principal:
        # What app.deps.Policy does: the cache, else the throttle and token check.
        digest, now = hash_token(token), utc_now()
        principal = tokens.get(digest, "127.0.0.1", now)
        if principal is None:
            with unit_of_work(es.sessions) as session:
                blocked_for(session, ["address:127.0.0.1"])
                principal = authenticate(session, token)
            tokens.put(digest, "127.0.0.1", principal, now, expires_at=principal.expires_at)
        return principal

    def one(first: int) -> None:
        for number in range(first, first + BATCH):
            with meter.step("auth"):
                principal = authenticate_cached()
            with meter.step("validate"):
                body = SubmitRequest.model_validate_json(bodies[number % len(bodies)])
            with meter.step("submit"), unit_of_work(es.sessions) as session:
                requests_service.submit_request(session, es, body=body, principal=principal)
        with meter.step("claim"), unit_of_work(es.sessions) as session:
            maybe_checkpoint(
                session,
                authority_id=es.authority_id,
                log_key=es.keys.log,
                every=es.settings.audit_checkpoint_every,
                seconds=es.settings.audit_checkpoint_seconds,
            )
            claims = outbox.claim_due(
                session, now=utc_now(), lease=lease, limit=BATCH, owner=worker_id
            )
            jobs = load_jobs(session, claims)
            contents = [json.dumps(job.wire).encode() for job in jobs]
        results = []
        for job, content in zip(jobs, contents, strict=True):
            with meter.step("transport"):
                wire = json.loads(content)
                with unit_of_work(ar.sessions) as session:
                    blocked_for(session, ["p2p:127.0.0.1"])
            with meter.step("accept"):
                with unit_of_work(ar.sessions) as session:
                    accepted = accept_envelope(session, ar, wire=wire)
                answer = json.loads(json.dumps(accepted.receipt.to_wire()))
            with meter.step("verify"):
                signed = decode_receipt(answer)
                receipt = verify_peer_receipt(
                    es,
                    http,
                    signed,
                    authority=job.recipient,
                    signer_public=job.signer_public,
                    signer_kid=job.signer_kid,
                    msg_id=job.msg_id,
                    envelope_hash=job.envelope_hash,
                    from_authority=job.sender,
                    sealed_at=job.sealed_at or utc_now(),
                )
            outcome = Outcome(outbox.DELIVERED, http_status=201, signed=signed, receipt=receipt)
            results.append((job.claim, outcome))
        with meter.step("settle"), unit_of_work(es.sessions) as session:
            assert all(settle_batch(session, results, worker=worker_id))
        with meter.step("witness"):
            for _, outcome in results:
                note = outcome.receipt.checkpoint if outcome.receipt else None
                if note is not None and witnessed.get(ar.authority_id) != note:
                    if witness_receipt_checkpoint(
                        es.sessions,
                        http,
                        authority=ar.authority_id,
                        note=note,
                        own_authority=es.authority_id,
                        log_key=es.keys.log,
                    ):
                        witnessed[ar.authority_id] = note

    return one


def run_backend(backend: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    with databases(backend, workdir, "steps", ["es", "ar"]) as (es_url, ar_url):
        pair = make_pair(workdir / f"{backend}-steps", es_url, ar_url)
        pair.stop()

        def node(local: Any) -> Node:
            return load_node(
                Settings(
                    database_url=local.database_url,
                    keys_dir=local.keys_dir,
                    allow_insecure_http=True,
                    run_worker=False,
                )
            )

        es, ar = node(pair.es), node(pair.ar)
        http = peer_http_client(es.settings)
        try:
            meter = Meter([es, ar])
            one = journey(es, ar, pair.es.tokens["officer"], request_bodies(64), meter, http)
            for number in range(2):  # warm-up: caches, first checkpoint
                one(number * BATCH)
            runs = []
            profile = cProfile.Profile(time.thread_time) if args.profile else None
            for run in range(args.runs):
                meter.reset()
                last = run == args.runs - 1
                if profile is not None and last:
                    profile.enable()
                rounds = max(1, args.requests // BATCH)
                for number in range(rounds):
                    one(number * BATCH)
                if profile is not None and last:
                    profile.disable()
                n = rounds * BATCH
                runs.append(
                    {
                        **{f"{name}_cpu_ms": 1000 * meter.cpu[name] / n for name, *_ in STEPS},
                        **{f"{name}_sql": meter.sql[name] / n for name, *_ in STEPS},
                        "cpu_ms": 1000 * sum(meter.cpu.values()) / n,
                        "wall_ms": 1000 * sum(meter.wall.values()) / n,
                        "statements": sum(meter.sql.values()) / n,
                    }
                )
            if profile is not None:
                profile.dump_stats(
                    str(ROOT / "bench" / "results" / f"request_steps-{backend}.prof")
                )
        finally:
            http.close()
            es.close()
            ar.close()
    return {"backend": backend, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--requests", type=int, default=200, help="requests per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if "postgresql" in backends and not postgres_available():
        backends = ["sqlite"]
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="entraide-steps-"))
    try:
        crypto = crypto_rates()
        results = [run_backend(backend, workdir, args) for backend in backends]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summaries = []
    for result in results:
        runs = result["runs"]
        mid = {key: round(median([run[key] for run in runs]), 3) for key in runs[0]}
        print(f"\n{result['backend']}: median of {len(runs)} runs of {args.requests} requests")
        for name, node, label in STEPS:
            print(
                f"  {label:52s} {node:8s} {mid[f'{name}_cpu_ms']:7.3f} ms CPU"
                f"  {mid[f'{name}_sql']:5.1f} statements"
            )
        print(f"  {'total':52s} {'':8s} {mid['cpu_ms']:7.3f} ms CPU  {mid['statements']:5.1f}")
        summaries.append({"backend": result["backend"], **mid})
    write_results(
        "request_steps",
        {
            "machine": machine(),
            "args": vars(args),
            "crypto": crypto,
            "runs": results,
            "medians": summaries,
            "summary": summaries,
        },
    )
    print(json.dumps({"benchmark": "request_steps", "results": summaries, "crypto": crypto}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

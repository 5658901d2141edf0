"""Request path: submitted, delivered and receipted, end to end, between two real nodes.

    python bench/throughput.py [--backend sqlite|postgresql|both] [--duration 10] [--runs 3]
        [--rate 100] [--concurrency 16] [--prefill 0] [--growth-backend sqlite|postgresql|both]
        [--budget 3600]

Two `entraide serve` processes on loopback (ES/MJ sends to AR/MPF), set up with the operator's
commands and the shipped defaults: bearer authentication, validation, sealing, signatures,
audit entries, delivery by the in-process worker, signed receipts verified and stored, peers
witnessing each other's checkpoints. A load generator in this process (bench/_load.py, lean
asyncio HTTP/1.1, keep-alive connections) submits 2 KiB requests, each different, to
POST /api/v1/requests with an officer's token. Per run:

- floor: the bare endpoint of bench/_floor.py (same uvicorn settings, one row per request
  into the same kind of database), as fast as the same connections allow, then at --rate and
  --light-rate: its latency (due time to response) is the baseline beside the nodes';
- fixed: the nodes at --rate requests/s (open loop): latency from the moment a request was
  due to be sent to its receipt being stored at the sender (receipts.stored_at), p50/p99,
  and the same time in legs (LEGS: submitted, claimed, received, receipted) from the nodes'
  own timestamps;
- max: the nodes as fast as the connections allow (closed loop): how fast submissions are
  accepted, and how fast envelopes are received and receipts stored while they are;
- sustained: open-loop runs from just under the max run's end-to-end rate, lowered by 15% a
  step until the outbox backlog stops growing: `requests_per_s` is the highest rate at which
  submitting, delivering and receipting all kept up.

Counters and the backlog are sampled from the nodes' databases every 0.25 s; rates are taken
over the steady part of each window (the first 20% is ramp-up). Also measured in the same run:
the machine's raw cryptographic rates, each node's idle resident memory and its time from
start to /readyz 200, and, with --prefill N, the same figures with N requests already stored
at both nodes (bulk-inserted rows of the real schema, bench/_prefill.py) against empty.

Prints the figures, writes bench/results/throughput.json (machine, versions, every run, the
medians) and ends with one JSON line. Every process started here is stopped on exit, and the
whole benchmark is bounded by --budget seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from app.localnodes import free_port  # noqa: E402
from bench._common import (  # noqa: E402
    machine,
    median,
    medians,
    percentile,
    postgres_available,
    postgres_database,
    write_results,
)
from bench._load import (  # noqa: E402
    LoadResult,
    crypto_rates,
    http_request,
    process_cpu_seconds,
    request_bodies,
    resident_mib,
    run_load,
)
from bench._pair import Marks, Pair, Probe, Sample, Sampler, as_utc, make_pair, sample  # noqa: E402

SUBMIT_PATH = "/api/v1/requests"
WARMUP_FRACTION = 0.2
SAMPLE_SECONDS = 0.25
BODIES = 256

# Issue 7's targets (2-core machine, both nodes and the load generator on it).
TARGET_REQUESTS_PER_S = 1000.0
TARGET_FLOOR_SHARE = 0.12
TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
TARGET_GROWTH_RATIO = 0.90
TARGET_IDLE_MIB = 100.0
TARGET_READY_S = 2.0

# Published figures quoted in docs/benchmarks.md, for the comparison in the JSON line.
PUBLISHED = {
    "xroad_2vcpu_sizing_requests_per_s": round(50 / 60, 2),
    "xroad_two_32core_servers_requests_per_s": 110.0,
    "domibus_minimum_memory_mib": 4096.0,
}


def say(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


class OutOfTime(Exception):
    pass


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise OutOfTime("the benchmark's --budget ran out")


# --- measuring --------------------------------------------------------------------------------


def _at(samples: list[Sample], moment: float, attribute: str) -> float:
    """A sampled counter at `moment`, interpolated between the samples around it."""
    before = [item for item in samples if item.at <= moment]
    after = [item for item in samples if item.at >= moment]
    if not before:
        return float(getattr(samples[0], attribute))
    if not after:
        return float(getattr(samples[-1], attribute))
    low, high = before[-1], after[0]
    if high.at == low.at:
        return float(getattr(low, attribute))
    weight = (moment - low.at) / (high.at - low.at)
    return float(
        getattr(low, attribute) + weight * (getattr(high, attribute) - getattr(low, attribute))
    )


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second) of (time, value) points."""
    if len(points) < 3:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def backlog_growing(slope: float, end_backlog: float, submitted_per_s: float) -> bool:
    """The backlog grows when it rises by more than 3% of the arrival rate per second and is
    past a couple of worker batches (a steady backlog of a few rows is normal work)."""
    return slope > max(1.0, 0.03 * submitted_per_s) and end_backlog > 32


@dataclass
class Setup:
    pair: Pair
    sender: Probe
    receiver: Probe
    raw: list[bytes]  # pre-built HTTP requests to the sender's local API


def make_setup(pair: Pair, bodies: list[bytes]) -> Setup:
    token = pair.es.tokens["officer"]
    raw = [
        http_request(
            "127.0.0.1", pair.es.port, SUBMIT_PATH, body, {"authorization": f"Bearer {token}"}
        )
        for body in bodies
    ]
    return Setup(pair, Probe(pair.es.database_url), Probe(pair.ar.database_url), raw)


def _drain(setup: Setup, marks: Marks, timeout: float) -> float | None:
    """Seconds until every request of the run is receipted, or None at the timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        now = sample(setup.sender, setup.receiver, marks)
        if now.pending == 0 and now.receipted >= now.queued:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


# The legs of one request's journey, from the nodes' own timestamps (one clock: both nodes
# run on this machine). Their sum is the end-to-end latency.
LEGS = (
    "submitted",  # due at the load generator -> the outbox row written (sealed, in the txn)
    "claimed",  # -> the delivery worker claimed it (delivery_attempts.started_at)
    "received",  # -> the receiver stored it (its messages.received_at: post, checks, store)
    "receipted",  # -> its signed receipt stored at the sender (receipts.stored_at)
)


def _latencies(
    setup: Setup, marks: Marks, load: LoadResult
) -> tuple[list[float], int, dict[str, list[float]]]:
    """Milliseconds from each request's due time to its receipt stored at the sender, the
    number with no receipt, and the same time split into LEGS."""
    rows = setup.sender.rows(
        "SELECT m.request_id, m.msg_id, o.created_at, a.started_at, r.stored_at FROM receipts r "
        "JOIN messages m ON m.id = r.message_id JOIN outbox o ON o.message_id = m.id "
        "JOIN delivery_attempts a ON a.outbox_id = o.id AND a.outcome = 'delivered' "
        "WHERE r.id > %s",
        (marks.receipts,),
    )
    arrived = {
        msg_id: as_utc(moment).timestamp()
        for msg_id, moment in setup.receiver.rows(
            "SELECT msg_id, received_at FROM messages WHERE id > %s", (marks.received,)
        )
    }
    journeys = {
        request_id: (msg_id, *(as_utc(moment).timestamp() for moment in moments))
        for request_id, msg_id, *moments in rows
    }
    values: list[float] = []
    legs: dict[str, list[float]] = {leg: [] for leg in LEGS}
    missing = 0
    for item in load.ok:
        journey = journeys.get(json.loads(item.body).get("id"))
        if journey is None:
            missing += 1
            continue
        msg_id, queued, claimed, stored = journey
        values.append(1000 * (stored - item.scheduled))
        if msg_id in arrived:
            moments = (item.scheduled, queued, claimed, arrived[msg_id], stored)
            for leg, start, end in zip(LEGS, moments, moments[1:], strict=False):
                legs[leg].append(1000 * (end - start))
    return values, missing, legs


def measure_nodes(
    setup: Setup, *, rate: float | None, duration: float, concurrency: int
) -> dict[str, Any]:
    pids = setup.pair.pids()
    quiet = _drain(setup, Marks.take(setup.sender, setup.receiver), timeout=180)
    if quiet is None:
        raise RuntimeError("the outbox did not empty before the run; figures would mix runs")
    marks = Marks.take(setup.sender, setup.receiver)
    cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    sampler = Sampler(setup.sender, setup.receiver, marks, SAMPLE_SECONDS)
    sampler.start()
    load = run_load(
        "127.0.0.1",
        setup.pair.es.port,
        setup.raw,
        rate=rate,
        duration=duration,
        concurrency=concurrency,
    )
    samples = sampler.stop()
    cpu_after = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    drain = _drain(setup, marks, timeout=max(60.0, 4 * duration))
    final = sample(setup.sender, setup.receiver, marks)

    lower = load.started + WARMUP_FRACTION * duration
    upper = load.started + duration
    window = upper - lower
    submitted_per_s = load.rate(since=WARMUP_FRACTION * duration)
    received_per_s = (_at(samples, upper, "received") - _at(samples, lower, "received")) / window
    receipted_per_s = (_at(samples, upper, "receipted") - _at(samples, lower, "receipted")) / window
    steady = [(item.at, float(item.pending)) for item in samples if lower <= item.at <= upper]
    slope = _slope(steady)
    end_backlog = _at(samples, upper, "pending")
    e2e, missing, legs = _latencies(setup, marks, load)
    backlog_after = _at(samples, samples[-1].at, "pending") if samples else 0.0
    accepted = [1000 * (item.finished - item.scheduled) for item in load.ok]
    count = max(final.queued, 1)
    return {
        "mode": load.mode,
        "target_rate": rate,
        "concurrency": concurrency,
        "duration_s": duration,
        "submitted": len(load.ok),
        "statuses": load.statuses(),
        "submitted_per_s": round(submitted_per_s, 1),
        "received_per_s": round(received_per_s, 1),
        "receipted_per_s": round(receipted_per_s, 1),
        "backlog_slope_per_s": round(slope, 2),
        "backlog_at_end": int(end_backlog),
        "backlog_growing": backlog_growing(slope, end_backlog, submitted_per_s),
        "drain_s": round(drain, 2) if drain is not None else None,
        # Delivery alone, once submissions stopped: how fast the backlog went.
        "drain_per_s": round(backlog_after / drain, 1) if drain and backlog_after > 32 else None,
        "submit_p50_ms": round(percentile(accepted, 0.5), 1),
        "submit_p99_ms": round(percentile(accepted, 0.99), 1),
        "p50_ms": round(percentile(e2e, 0.5), 1),
        "p99_ms": round(percentile(e2e, 0.99), 1),
        "receipts_missing": missing,
        "legs_p50_ms": {leg: round(percentile(legs[leg], 0.5), 1) for leg in LEGS},
        "cpu_ms_per_request": {
            **{
                name: round(1000 * (cpu_after[name] - cpu_before[name]) / count, 2) for name in pids
            },
            "load_generator": round(1000 * load.cpu_seconds / max(len(load.sent), 1), 2),
        },
    }


def search_start(maxed: dict[str, Any]) -> float:
    """Where the sustained search starts: under the max run's submission rate and the rate
    at which delivery alone caught up afterwards (while submissions pour in, delivery gets
    less of the machine than it will need at a rate both keep up with)."""
    delivery = max(maxed["receipted_per_s"], maxed["drain_per_s"] or 0.0)
    return 0.95 * min(maxed["submitted_per_s"], delivery)


def sustained(
    setup: Setup, *, start_rate: float, duration: float, concurrency: int, steps: int
) -> dict[str, Any]:
    """The highest open-loop rate, from `start_rate` down by 15% a step, that all three
    (submitting, delivering, receipting) keep up with; the last attempt if none did."""
    rate = max(1.0, round(start_rate))
    attempts = []
    for _ in range(steps):
        say(f"  sustained: trying {rate:.0f} requests/s")
        result = measure_nodes(setup, rate=rate, duration=duration, concurrency=concurrency)
        attempts.append(result)
        kept_up = (
            not result["backlog_growing"]
            and result["submitted_per_s"] >= 0.95 * rate
            and result["receipted_per_s"] >= 0.95 * rate
        )
        if kept_up:
            return {**result, "kept_up": True, "attempts": attempts}
        rate = max(1.0, min(rate - 1, round(rate * 0.85)))
    return {**attempts[-1], "kept_up": False, "attempts": attempts}


# --- the floor -------------------------------------------------------------------------------


@contextmanager
def floor_server(database_url: str, workdir: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    log = (workdir / "floor.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench._floor",
            "--database-url",
            database_url,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor server did not start; see {workdir / 'floor.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def measure_floor(
    database_url: str,
    workdir: Path,
    bodies: list[bytes],
    *,
    duration: float,
    concurrency: int,
    rates: dict[str, float],
) -> dict[str, Any]:
    """The bare endpoint as fast as it goes, then at each of `rates` (name: requests/s) for
    the latency beside the nodes' at the same rates: one request's whole cost, accepted and
    committed by the simplest gateway, measured as the nodes' is, from its due time."""
    with floor_server(database_url, workdir) as (port, pid):
        raw = [http_request("127.0.0.1", port, "/floor", body) for body in bodies]
        run_load("127.0.0.1", port, raw, rate=None, duration=1.0, concurrency=concurrency)
        cpu_before = process_cpu_seconds(pid)
        load = run_load(
            "127.0.0.1", port, raw, rate=None, duration=duration, concurrency=concurrency
        )
        cpu = process_cpu_seconds(pid) - cpu_before
        fixed = {
            name: run_load(
                "127.0.0.1", port, raw, rate=rate, duration=duration, concurrency=concurrency
            )
            for name, rate in rates.items()
        }
    accepted = [1000 * (item.finished - item.started) for item in load.ok]
    figures: dict[str, Any] = {
        "floor_requests_per_s": round(load.rate(since=WARMUP_FRACTION * duration), 1),
        "floor_p50_ms": round(percentile(accepted, 0.5), 1),
        "floor_statuses": load.statuses(),
        "floor_cpu_ms_per_request": round(1000 * cpu / max(len(load.ok), 1), 3),
    }
    for name, at_rate in fixed.items():
        due = [1000 * (item.finished - item.scheduled) for item in at_rate.ok]
        figures[f"floor_{name}_p50_ms"] = round(percentile(due, 0.5), 1)
        figures[f"floor_{name}_p99_ms"] = round(percentile(due, 0.99), 1)
    return figures


# --- one backend -----------------------------------------------------------------------------


@contextmanager
def databases(backend: str, workdir: Path, label: str, names: list[str]) -> Iterator[list[str]]:
    if backend == "sqlite":
        folder = workdir / label
        folder.mkdir(parents=True, exist_ok=True)
        yield [f"sqlite:///{folder / f'{name}.db'}" for name in names]
        return
    with ExitStack() as stack:
        yield [stack.enter_context(postgres_database(f"{label}_{name}")) for name in names]


def warm_up(setup: Setup, count: int = 40) -> None:
    run_load(
        "127.0.0.1", setup.pair.es.port, setup.raw, rate=20.0, duration=count / 20, concurrency=4
    )
    marks = Marks(0, 0, 0)
    if _drain(setup, marks, timeout=60) is None:
        raise RuntimeError("the warm-up requests were not all delivered and receipted")


def footprint(setup: Setup) -> dict[str, Any]:
    """Start-to-ready of a restart of each node, and its resident memory once idle after a
    few requests."""
    setup.pair.stop()
    setup.pair.start()
    warm_up(setup, count=20)
    time.sleep(2.0)
    rss = {name: round(resident_mib(pid), 1) for name, pid in setup.pair.pids().items()}
    return {
        "ready_s": {name: round(value, 3) for name, value in setup.pair.ready_seconds.items()},
        "idle_rss_mib": rss,
    }


def one_run(
    setup: Setup, floor_url: str, workdir: Path, bodies: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    say("  floor (bare endpoint, max rate)")
    floor = measure_floor(
        floor_url,
        workdir,
        bodies,
        duration=args.duration,
        concurrency=args.concurrency,
        rates={"fixed": args.rate, "light": args.light_rate},
    )
    say(
        f"    {floor['floor_requests_per_s']} requests/s; at {args.rate}/s p50 "
        f"{floor['floor_fixed_p50_ms']} ms, p99 {floor['floor_fixed_p99_ms']} ms; at "
        f"{args.light_rate}/s p50 {floor['floor_light_p50_ms']} ms"
    )
    say(f"  nodes at a fixed {args.rate} requests/s")
    fixed = measure_nodes(
        setup, rate=args.rate, duration=args.duration, concurrency=args.concurrency
    )
    say(
        f"    p50 {fixed['p50_ms']} ms, p99 {fixed['p99_ms']} ms, "
        f"backlog growing {fixed['backlog_growing']}; legs p50 {fixed['legs_p50_ms']} ms"
    )
    light = measure_nodes(
        setup, rate=args.light_rate, duration=args.duration, concurrency=args.concurrency
    )
    say(
        f"  nodes at a light {args.light_rate}/s: "
        f"p50 {light['p50_ms']} ms, p99 {light['p99_ms']} ms; legs p50 {light['legs_p50_ms']} ms"
    )
    say("  nodes at max rate")
    maxed = measure_nodes(setup, rate=None, duration=args.duration, concurrency=args.concurrency)
    say(
        f"    submitted {maxed['submitted_per_s']}/s, received {maxed['received_per_s']}/s, "
        f"receipted {maxed['receipted_per_s']}/s, backlog growing {maxed['backlog_growing']}"
    )
    found = sustained(
        setup,
        start_rate=search_start(maxed),
        duration=args.duration,
        concurrency=args.concurrency,
        steps=args.search_steps,
    )
    say(f"    sustained {found['receipted_per_s']}/s (kept up: {found['kept_up']})")
    return {
        "requests_per_s": found["target_rate"] if found["kept_up"] else found["receipted_per_s"],
        "backlog_growing": found["backlog_growing"],
        "sustained_p50_ms": found["p50_ms"],
        "sustained_p99_ms": found["p99_ms"],
        "p50_ms": fixed["p50_ms"],
        "p99_ms": fixed["p99_ms"],
        "fixed_rate": args.rate,
        "fixed_backlog_growing": fixed["backlog_growing"],
        "light_rate": args.light_rate,
        "light_p50_ms": light["p50_ms"],
        "light_p99_ms": light["p99_ms"],
        # Where the time of one request goes, leg by leg (LEGS), at each fixed rate.
        "legs_p50_ms": fixed["legs_p50_ms"],
        "light_legs_p50_ms": light["legs_p50_ms"],
        "max_submitted_per_s": maxed["submitted_per_s"],
        "max_received_per_s": maxed["received_per_s"],
        "max_receipted_per_s": maxed["receipted_per_s"],
        "max_backlog_growing": maxed["backlog_growing"],
        # From the sustained run, where every request's work was done while the load ran.
        "sender_cpu_ms_per_request": found["cpu_ms_per_request"].get("ES/MJ"),
        "receiver_cpu_ms_per_request": found["cpu_ms_per_request"].get("AR/MPF"),
        **floor,
        "details": {"fixed": fixed, "light": light, "max": maxed, "sustained": found},
    }


def run_backend(
    backend: str, workdir: Path, bodies: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    say(f"{backend}: setting up two nodes")
    with databases(backend, workdir, "empty", ["es", "ar", "floor"]) as (es_url, ar_url, floor_url):
        pair = make_pair(workdir / f"{backend}-nodes", es_url, ar_url)
        setup = make_setup(pair, bodies)
        try:
            warm_up(setup)
            prints = footprint(setup)
            say(f"  ready in {prints['ready_s']} s, idle {prints['idle_rss_mib']} MiB")
            runs = []
            for number in range(args.runs):
                say(f"{backend}: run {number + 1} of {args.runs}")
                runs.append(one_run(setup, floor_url, workdir, bodies, args))
            rss_after = {name: round(resident_mib(pid), 1) for name, pid in pair.pids().items()}
        finally:
            pair.stop()
            setup.sender.close()
            setup.receiver.close()
    return {
        "backend": backend,
        "footprint": {**prints, "rss_after_load_mib": rss_after},
        "runs": runs,
    }


def run_growth(
    backend: str, workdir: Path, bodies: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    from bench._prefill import prefill_pair

    say(f"{backend}: growth, {args.prefill} requests stored at each node")
    with databases(backend, workdir, "grown", ["es", "ar"]) as (es_url, ar_url):
        pair = make_pair(workdir / f"{backend}-grown", es_url, ar_url)
        setup = make_setup(pair, bodies)
        try:
            warm_up(setup, count=10)
            pair.stop()
            filled = prefill_pair(pair, count=args.prefill, seed=args.seed)
            say(f"  prefilled in {filled['seconds']:.0f} s")
            pair.start()
            ready = dict(pair.ready_seconds)
            warm_up(setup)
            runs = []
            for number in range(args.runs):
                say(f"{backend} grown: run {number + 1} of {args.runs}")
                fixed = measure_nodes(
                    setup, rate=args.rate, duration=args.duration, concurrency=args.concurrency
                )
                light = measure_nodes(
                    setup,
                    rate=args.light_rate,
                    duration=args.duration,
                    concurrency=args.concurrency,
                )
                maxed = measure_nodes(
                    setup, rate=None, duration=args.duration, concurrency=args.concurrency
                )
                found = sustained(
                    setup,
                    start_rate=search_start(maxed),
                    duration=args.duration,
                    concurrency=args.concurrency,
                    steps=args.search_steps,
                )
                runs.append(
                    {
                        "requests_per_s": found["target_rate"]
                        if found["kept_up"]
                        else found["receipted_per_s"],
                        "backlog_growing": found["backlog_growing"],
                        "p50_ms": fixed["p50_ms"],
                        "p99_ms": fixed["p99_ms"],
                        "light_p50_ms": light["p50_ms"],
                        "light_p99_ms": light["p99_ms"],
                        "max_submitted_per_s": maxed["submitted_per_s"],
                        "max_receipted_per_s": maxed["receipted_per_s"],
                        "details": {
                            "fixed": fixed,
                            "light": light,
                            "max": maxed,
                            "sustained": found,
                        },
                    }
                )
                say(f"    sustained {runs[-1]['requests_per_s']}/s, p50 {fixed['p50_ms']} ms")
            alarms = setup.sender.scalar("SELECT count(*) FROM witness_alarms")
        finally:
            pair.stop()
            setup.sender.close()
            setup.receiver.close()
    return {
        "backend": backend,
        "stored_requests": args.prefill,
        "prefill": filled,
        "ready_s": {name: round(value, 3) for name, value in ready.items()},
        "witness_alarms": alarms,
        "runs": runs,
    }


# --- the report ------------------------------------------------------------------------------


def _median_legs(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {leg: median([run[key][leg] for run in runs]) for leg in LEGS}


def summarise(
    result: dict[str, Any], growth: dict[str, Any] | None, crypto: dict[str, float]
) -> dict[str, Any]:
    runs = result["runs"]
    mid = medians([{k: v for k, v in run.items() if k != "details"} for run in runs])
    floor = mid.get("floor_requests_per_s", float("nan"))
    rate = mid.get("requests_per_s", float("nan"))
    prints = result["footprint"]
    summary: dict[str, Any] = {
        "backend": result["backend"],
        "requests_per_s": rate,
        "floor_requests_per_s": floor,
        "share_of_floor": round(rate / floor, 3) if floor else None,
        "p50_ms": mid.get("p50_ms"),
        "p99_ms": mid.get("p99_ms"),
        "latency_at_rate": runs[0]["fixed_rate"],
        "light_rate": runs[0]["light_rate"],
        "light_p50_ms": mid.get("light_p50_ms"),
        "light_p99_ms": mid.get("light_p99_ms"),
        # The latency baseline: the bare endpoint at the same rates, in the same runs.
        "floor_p50_ms_at_rate": mid.get("floor_fixed_p50_ms"),
        "floor_p99_ms_at_rate": mid.get("floor_fixed_p99_ms"),
        "floor_light_p50_ms": mid.get("floor_light_p50_ms"),
        "floor_light_p99_ms": mid.get("floor_light_p99_ms"),
        "legs_p50_ms": _median_legs(runs, "legs_p50_ms"),
        "light_legs_p50_ms": _median_legs(runs, "light_legs_p50_ms"),
        "sustained_p50_ms": mid.get("sustained_p50_ms"),
        "sustained_p99_ms": mid.get("sustained_p99_ms"),
        "backlog_growing": any(run["backlog_growing"] for run in runs),
        "max_submitted_per_s": mid.get("max_submitted_per_s"),
        "max_receipted_per_s": mid.get("max_receipted_per_s"),
        "sender_cpu_ms_per_request": mid.get("sender_cpu_ms_per_request"),
        "receiver_cpu_ms_per_request": mid.get("receiver_cpu_ms_per_request"),
        "floor_cpu_ms_per_request": mid.get("floor_cpu_ms_per_request"),
        "idle_rss_mib": max(prints["idle_rss_mib"].values()),
        "ready_s": max(prints["ready_s"].values()),
        "runs": len(runs),
    }
    if growth is not None:
        grown = median([run["requests_per_s"] for run in growth["runs"]])
        summary.update(
            {
                "grown_stored_requests": growth["stored_requests"],
                "grown_requests_per_s": grown,
                "grown_p50_ms": median([run["p50_ms"] for run in growth["runs"]]),
                "grown_p99_ms": median([run["p99_ms"] for run in growth["runs"]]),
                "grown_light_p50_ms": median(
                    [run.get("light_p50_ms", float("nan")) for run in growth["runs"]]
                ),
                "growth_ratio": round(grown / rate, 3) if rate else None,
            }
        )
    summary["targets"] = {
        "requests_per_s": {"target": TARGET_REQUESTS_PER_S, "met": rate >= TARGET_REQUESTS_PER_S},
        "share_of_floor": {
            "target": TARGET_FLOOR_SHARE,
            "met": bool(floor) and rate / floor >= TARGET_FLOOR_SHARE,
        },
        "p50_ms": {
            "target": TARGET_P50_MS,
            "met": (mid.get("p50_ms") or 1e9) < TARGET_P50_MS,
            "floor": summary["floor_p50_ms_at_rate"],
        },
        "p99_ms": {
            "target": TARGET_P99_MS,
            "met": (mid.get("p99_ms") or 1e9) < TARGET_P99_MS,
            "floor": summary["floor_p99_ms_at_rate"],
        },
        "idle_rss_mib": {
            "target": TARGET_IDLE_MIB,
            "met": summary["idle_rss_mib"] < TARGET_IDLE_MIB,
        },
        "ready_s": {"target": TARGET_READY_S, "met": summary["ready_s"] < TARGET_READY_S},
    }
    if growth is not None:
        summary["targets"]["growth_ratio"] = {
            "target": TARGET_GROWTH_RATIO,
            "met": (summary["growth_ratio"] or 0) >= TARGET_GROWTH_RATIO,
        }
    summary["crypto"] = crypto
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=100.0, help="fixed rate for latency")
    parser.add_argument("--light-rate", type=float, default=10.0, help="a lighter fixed rate")
    parser.add_argument("--concurrency", type=int, default=16, help="load-generator connections")
    parser.add_argument("--search-steps", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=0, help="stored requests for growth")
    parser.add_argument(
        "--growth-backend", choices=["sqlite", "postgresql", "both"], default="sqlite"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds, then give up")
    parser.add_argument(
        "--results-name", default="throughput", help="writes bench/results/NAME.json"
    )
    args = parser.parse_args()

    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if "postgresql" in backends and not postgres_available():
        say("PostgreSQL is not reachable on 127.0.0.1:5432: measuring SQLite only")
        backends = ["sqlite"]
    growth_backends = (
        ["sqlite", "postgresql"] if args.growth_backend == "both" else [args.growth_backend]
    )
    growth_backends = [name for name in growth_backends if name in backends]

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(args.budget))
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="entraide-throughput-"))
    bodies = request_bodies(BODIES, seed=args.seed)
    try:
        say("crypto rates of this machine")
        crypto = crypto_rates()
        say(f"  {crypto}")
        results = [run_backend(backend, workdir, bodies, args) for backend in backends]
        growth = {
            backend: run_growth(backend, workdir, bodies, args)
            for backend in growth_backends
            if args.prefill > 0
        }
    finally:
        signal.alarm(0)
        shutil.rmtree(workdir, ignore_errors=True)
    crypto_after = crypto_rates()
    crypto_mid = {name: round((crypto[name] + crypto_after[name]) / 2, 1) for name in crypto}
    summaries = [summarise(result, growth.get(result["backend"]), crypto_mid) for result in results]
    write_results(
        args.results_name,
        {
            "started_at": started,
            "seconds": round(time.time() - started, 1),
            "machine": machine(),
            "args": vars(args),
            "request_bytes": sorted(len(body) for body in bodies)[len(bodies) // 2],
            "crypto": {"before": crypto, "after": crypto_after},
            "runs": results,
            "growth": growth,
            "medians": {
                summary["backend"]: {k: v for k, v in summary.items() if k != "crypto"}
                for summary in summaries
            },
            "published": PUBLISHED,
            "summary": summaries,
        },
    )
    for summary in summaries:
        print(
            f"{summary['backend']}: {summary['requests_per_s']} requests/s end to end "
            f"(floor {summary['floor_requests_per_s']}/s, {summary['share_of_floor']} of it), "
            f"at {summary['latency_at_rate']}/s p50 {summary['p50_ms']} ms p99 "
            f"{summary['p99_ms']} ms (floor {summary['floor_p50_ms_at_rate']} / "
            f"{summary['floor_p99_ms_at_rate']} ms), legs p50 {summary['legs_p50_ms']} ms, "
            f"backlog growing {summary['backlog_growing']}, "
            f"idle {summary['idle_rss_mib']} MiB, ready {summary['ready_s']} s"
            + (
                f", with {summary['grown_stored_requests']} stored: "
                f"{summary['grown_requests_per_s']}/s ({summary['growth_ratio']})"
                if "grown_requests_per_s" in summary
                else ""
            )
        )
    print(f"crypto: {crypto_mid}")
    print(json.dumps({"benchmark": "throughput", "results": summaries, "published": PUBLISHED}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: requests keep flowing while the network, the receiver and the workers keep failing.

    python bench/soak.py --requests 200 [--backend sqlite|postgresql] [--seed 1] [--workers 2]

Two real nodes; the sender runs no in-process worker but `--workers` separate `entraide
worker` processes, and reaches the receiver only through the fault proxy of tests/faults.
While the requests are submitted, the proxy refuses, cuts, delays, stalls, drops and holds
connections at random (seeded), and a seeded schedule SIGKILLs and restarts the receiver and
SIGKILLs workers (each replaced at once). Then the faults stop and the backlog drains.

The figure is the ledger of tests/faults/harness.py; the baseline is zero lost and zero
duplicated. The last line of output is one JSON object: sent, delivered, duplicated, lost,
undelivered, bad_receipts, duration_seconds, backend, seed and the count of every fault
injected. Everything lives in one temporary directory (a private PostgreSQL server too, for
`--backend postgresql`), removed at the end with every process started here. Exit status 0
when nothing was lost, duplicated or left undelivered.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.faults.harness import Pair, Submitter, new_pair, run_all  # noqa: E402
from tests.faults.pg import PrivatePostgres  # noqa: E402
from tests.faults.proxy import FaultProxy, Faults  # noqa: E402

RANDOM_FAULTS = Faults(
    refuse=0.08,
    cut=0.08,
    delay=0.08,
    stall=0.03,
    drop=0.08,
    hold=0.03,
    delay_seconds=(0.05, 0.4),
    stall_seconds=2.5,
)
SECONDS_PER_REQUEST = 0.2  # the pace of submissions, so the faults meet a steady stream
MIN_CHAOS_SECONDS = 8.0


def progress(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.events: Counter[str] = Counter()
        self.pg: PrivatePostgres | None = None
        self.proxy: FaultProxy | None = None
        self.pair: Pair | None = None
        self.worker_serial = 0

    def _databases(self) -> tuple[str, str]:
        if self.args.backend == "sqlite":
            return f"sqlite:///{self.workdir / 'es.db'}", f"sqlite:///{self.workdir / 'ar.db'}"
        self.pg = PrivatePostgres()
        self.pg.init()
        self.pg.start()
        return self.pg.create_database("es"), self.pg.create_database("ar")

    def _start_worker(self) -> None:
        assert self.pair is not None
        self.worker_serial += 1
        self.pair.start_worker(str(self.worker_serial))

    def _live_workers(self) -> list[Any]:
        assert self.pair is not None
        return [worker for worker in self.pair.workers if worker.process.poll() is None]

    def kill_receiver(self) -> None:
        assert self.pair is not None
        self.pair.receiver.kill()
        self.events["receiver_kills"] += 1
        time.sleep(self.rng.uniform(0.3, 1.5))
        self.pair.receiver.start()

    def kill_worker(self) -> None:
        live = self._live_workers()
        victim = self.rng.choice(live)
        victim.kill()
        self.events["worker_kills"] += 1
        self._start_worker()

    def run(self) -> dict[str, Any]:
        args = self.args
        sender_db, receiver_db = self._databases()
        self.pair = pair = new_pair(
            self.workdir / "nodes",
            sender_db,
            receiver_db,
            sender_env={"ENTRAIDE_RUN_WORKER": "false"},
        )
        self.proxy = proxy = FaultProxy(
            pair.receiver.port, seed=args.seed, max_hold_seconds=10
        ).start()
        pair.start(sender_pins_receiver_at=proxy.url)
        for _ in range(args.workers):
            self._start_worker()
        progress(f"nodes up ({args.backend}); {args.requests} requests, seed {args.seed}")

        started = time.monotonic()
        proxy.faults = RANDOM_FAULTS
        chaos_seconds = max(MIN_CHAOS_SECONDS, args.requests * SECONDS_PER_REQUEST)
        submitter = Submitter(
            pair.sender, limit=args.requests, pause=chaos_seconds / args.requests
        ).start()
        # The schedule: alternately the receiver and a worker, every 2-3 s, in a seeded order.
        actions: list[Callable[[], None]] = [self.kill_receiver, self.kill_worker]
        self.rng.shuffle(actions)
        turn = 0
        next_event = started + self.rng.uniform(1.0, 2.0)
        while time.monotonic() - started < chaos_seconds or turn < len(actions):
            if time.monotonic() >= next_event:
                actions[turn % len(actions)]()
                turn += 1
                next_event = time.monotonic() + self.rng.uniform(2.0, 3.0)
            if time.monotonic() - started > args.timeout / 2:
                break
            time.sleep(0.05)
        accepted = submitter.join(timeout=max(10.0, args.timeout / 2))
        proxy.faults = Faults()
        proxy.release()
        progress(f"faults over after {time.monotonic() - started:.1f}s: {dict(self.events)}")

        drained = True
        remaining = max(10.0, args.timeout - (time.monotonic() - started))
        try:
            pair.wait_delivered(len(accepted), timeout=remaining)
        except AssertionError as exc:
            drained = False
            progress(f"not drained: {str(exc)[:2000]}")
        ledger = pair.ledger(accepted)
        faults = {**self.events, **proxy.snapshot()}
        faults.pop("held_now", None)
        return {
            **ledger.as_dict(),
            "submit_failures": submitter.failures,
            "drained": drained,
            "duration_seconds": round(time.monotonic() - started, 2),
            "backend": args.backend,
            "seed": args.seed,
            "workers": args.workers,
            "faults": faults,
            "problems": ledger.problems[:5],
            "baseline": {"lost": 0, "duplicated": 0},
        }

    def close(self) -> None:
        steps: list[Callable[[], None]] = []
        steps += [self.proxy.stop] if self.proxy is not None else []
        steps += [self.pair.close] if self.pair is not None else []
        steps += [self.pg.destroy] if self.pg is not None else []
        run_all(steps)


class Interrupted(Exception):
    """SIGTERM (a CI timeout, an operator): unwind like Ctrl-C, stopping every process."""


def _interrupt(_signum: int, _frame: object) -> None:
    raise Interrupted("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the whole run")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.workers < 1:
        parser.error("--requests and --workers must be at least 1")

    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="entraide-soak-"))
    soak = Soak(args, workdir)
    started = time.monotonic()
    try:
        result = soak.run()
    except (Exception, KeyboardInterrupt) as exc:  # the JSON line says so: figures unknown
        progress(f"the soak itself failed: {exc!r}")
        result = {
            "error": repr(exc)[:500],
            **dict.fromkeys(("sent", "delivered", "duplicated", "lost", "undelivered")),
            "bad_receipts": None,
            "duration_seconds": round(time.monotonic() - started, 2),
            "backend": args.backend,
            "seed": args.seed,
            "faults": dict(soak.events),
        }
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        try:
            soak.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result["workdir_removed"] = not workdir.exists()
    print(json.dumps(result, sort_keys=True))
    if "error" in result:
        return 2
    clean = result["lost"] == 0 and result["duplicated"] == 0 and result["undelivered"] == 0
    return 0 if clean and result["bad_receipts"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

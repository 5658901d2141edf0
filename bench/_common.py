"""Shared by the benchmarks: the machine they ran on, medians, percentiles, results files,
and throwaway PostgreSQL databases.

Every benchmark writes `bench/results/NAME.json` with the same outer shape::

    {"benchmark": NAME, "started_at": ..., "machine": machine(), "args": {...},
     "runs": [...every run...], "medians": {...}, "summary": {...}}

and prints the summary as its last line of output, one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sqlite3
import statistics
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PG_ADMIN = os.environ.get("ENTRAIDE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def postgres_version(admin_url: str = PG_ADMIN) -> str | None:
    try:
        with psycopg.connect(admin_url, connect_timeout=3) as connection:
            row = connection.execute("SHOW server_version").fetchone()
    except psycopg.OperationalError:
        return None
    return str(row[0]) if row else None


def machine() -> dict[str, Any]:
    memory = _memory_bytes()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres_version(),
        # Benchmarks share the machine with whatever else runs: this says how much did.
        "load_average_1_5_15m": [round(value, 2) for value in os.getloadavg()],
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `fraction` of values <= it."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return float(ordered[int(rank) - 1])


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field that all runs share (booleans and text excluded)."""
    if not runs:
        return {}
    keys = [
        key
        for key, value in runs[0].items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    return {
        key: median([run[key] for run in runs])
        for key in keys
        if all(isinstance(run.get(key), int | float) for run in runs)
    }


def write_results(name: str, document: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "written_at": datetime.now(UTC).isoformat(), **document}
    path.write_text(json.dumps(body, indent=1, sort_keys=True, default=str) + "\n")
    return path


def postgres_available(admin_url: str = PG_ADMIN) -> bool:
    return postgres_version(admin_url) is not None


@contextmanager
def postgres_database(label: str, admin_url: str = PG_ADMIN) -> Iterator[str]:
    """A uniquely named database on the shared server, dropped afterwards; yields its URL."""
    name = f"entraide_bench_{label}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

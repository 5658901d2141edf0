"""Two real, pinned nodes (ES/MJ and AR/MPF) for the operations tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.localnodes import LocalNode
from tests.conftest import Databases, make_databases


@dataclass
class Pair:
    es: LocalNode
    ar: LocalNode
    databases: Databases


def prepare(node: LocalNode, *, start: bool = True) -> None:
    node.init(clients={"admin": ("admin",), "officer": ("officer",)})
    if start:
        node.start()


@contextmanager
def pinned_pair(backend: str, tmp_path: Path, *, migrated: bool = True) -> Iterator[Pair]:
    """`migrated=False`: on empty databases, which `init` migrates."""
    databases = make_databases(backend, tmp_path)
    es_db, ar_db = databases.new("es", migrated=migrated), databases.new("ar", migrated=migrated)
    es = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", es_db)
    ar = LocalNode("AR/MPF", "Ministerio Publico Fiscal", tmp_path / "ar", ar_db)
    pair = Pair(es, ar, databases)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(prepare, (es, ar)))
        es.pin(ar)
        ar.pin(es)
        yield pair
    finally:
        for node in (pair.es, pair.ar):
            node.stop()
        databases.drop_all()


@contextmanager
def serving(
    node: LocalNode, *options: str, preexec_fn: Callable[[], None] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`entraide serve` of an initialised node, with `options`, on a free port of its own,
    answering `/healthz` on 127.0.0.1; stopped after. For what `LocalNode.start` cannot
    set: the listening host, the process's limits."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", *options, "--port", str(port)],
        env=node.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve never answered on 127.0.0.1"
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=20)

"""Two real, pinned nodes (ES/MJ and AR/MPF) for the operations tests."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
def pinned_pair(backend: str, tmp_path: Path) -> Iterator[Pair]:
    databases = make_databases(backend, tmp_path)
    es = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", databases.new("es"))
    ar = LocalNode("AR/MPF", "Ministerio Publico Fiscal", tmp_path / "ar", databases.new("ar"))
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

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

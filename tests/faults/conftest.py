"""A lab per test: node pairs and fault proxies, every one stopped when the test ends; a
database factory on the shared PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Databases, make_databases
from tests.faults.harness import Pair, new_pair, run_all
from tests.faults.proxy import FaultProxy, Faults


class Lab:
    def __init__(self, tmp_path: Path, note: Callable[[str, object], None]) -> None:
        self.tmp_path = tmp_path
        self.note = note  # figures for reports (the test's user_properties)
        self.pairs: list[Pair] = []
        self.proxies: list[FaultProxy] = []

    def sqlite(self, label: str) -> str:
        return f"sqlite:///{self.tmp_path / f'{label}.db'}"

    def pair(
        self,
        sender_db: str | None = None,
        receiver_db: str | None = None,
        *,
        sender_env: dict[str, str] | None = None,
        receiver_env: dict[str, str] | None = None,
    ) -> Pair:
        pair = new_pair(
            self.tmp_path / f"pair{len(self.pairs)}",
            sender_db or self.sqlite(f"es{len(self.pairs)}"),
            receiver_db or self.sqlite(f"ar{len(self.pairs)}"),
            sender_env=sender_env,
            receiver_env=receiver_env,
        )
        self.pairs.append(pair)
        return pair

    def proxy(self, target_port: int, *, seed: int = 0, faults: Faults | None = None) -> FaultProxy:
        proxy = FaultProxy(target_port, seed=seed, faults=faults or Faults(), max_hold_seconds=30)
        self.proxies.append(proxy)
        return proxy.start()

    def close(self) -> None:
        # Proxies first: a worker blocked on a held answer is freed at once, so the nodes'
        # graceful stops do not wait for their peer timeout.
        run_all([proxy.stop for proxy in self.proxies] + [pair.close for pair in self.pairs])
        for index, proxy in enumerate(self.proxies):
            self.note(f"proxy{index}", proxy.snapshot())
        for index, pair in enumerate(self.pairs):
            if pair.last_ledger is not None:
                self.note(f"ledger{index}", pair.last_ledger.as_dict())


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(tmp_path, lambda name, value: request.node.user_properties.append((name, value)))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def shared_pg(tmp_path: Path) -> Iterator[Databases]:
    databases = make_databases("postgresql", tmp_path)
    try:
        yield databases
    finally:
        databases.drop_all()

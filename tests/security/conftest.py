"""Real node processes for the security tests (app.localnodes), on SQLite unless said otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.localnodes import LocalNode

CREDENTIALS = ("none", "expired", "revoked", "officer", "auditor", "admin", "officer+auditor")
ALL_ROLES = ("officer", "auditor", "admin")


def new_node(base: Path, authority: str = "ES/MJ", **env: str) -> LocalNode:
    label = authority.split("/")[0].lower()
    return LocalNode(
        authority, f"Node {authority}", base / label, f"sqlite:///{base / label}.db", extra_env=env
    )


def prepare(nodes: Sequence[LocalNode], clients: Sequence[str] = ("admin", "officer")) -> None:
    """`entraide init`, one client per role named after it, `entraide serve`: in parallel."""

    def one(node: LocalNode) -> None:
        node.init()
        for name in clients:
            node.create_client(name, name)
        node.start()

    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        list(pool.map(one, nodes))


def with_credentials(node: LocalNode) -> LocalNode:
    """Clients for every credential of the matrix, made with the operator's commands."""
    node.create_client("revoked", *ALL_ROLES)
    node.cli("clients", "revoke", "revoked")
    args = ["clients", "create", "short-lived", "--expires-in", "1s"]
    for role in ALL_ROLES:
        args += ["--role", role]
    node.tokens["expired"] = node.cli(*args).stdout.strip().splitlines()[-1]
    for role in ALL_ROLES:
        node.create_client(role, role)
    node.create_client("officer+auditor", "officer", "auditor")
    time.sleep(1.1)  # the short-lived token is now expired
    return node


def headers(node: LocalNode, credential: str) -> dict[str, str]:
    if credential == "none":
        return {}
    return {"authorization": f"Bearer {node.tokens[credential]}"}


@pytest.fixture(scope="module")
def matrix_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    node = new_node(tmp_path_factory.mktemp("matrix"))
    try:
        node.init()
        with_credentials(node)
        node.start()
        yield node
    finally:
        node.stop()

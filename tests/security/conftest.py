"""Real node processes for the security tests (app.localnodes), on SQLite unless said otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.localnodes import LocalNode, client_command
from tests.conftest import migrated_sqlite

CREDENTIALS = (
    "none",
    "expired",
    "revoked",
    "officer",
    "auditor",
    "admin",
    "monitor",
    "officer+auditor",
)
ALL_ROLES = ("officer", "auditor", "admin", "monitor")


def new_node(
    base: Path, authority: str = "ES/MJ", *, migrated: bool = True, **env: str
) -> LocalNode:
    """A node on a SQLite database at the latest migration (`init` finds nothing to migrate),
    or with `migrated=False` on none: `init` creates the file."""
    label = authority.split("/")[0].lower()
    path = base / f"{label}.db"
    url = migrated_sqlite(path) if migrated else f"sqlite:///{path}"
    return LocalNode(authority, f"Node {authority}", base / label, url, extra_env=env)


def prepare(nodes: Sequence[LocalNode], clients: Sequence[str] = ("admin", "officer")) -> None:
    """`entraide init`, one client per role named after it, `entraide serve`: in parallel."""

    def one(node: LocalNode) -> None:
        node.init(clients={name: (name,) for name in clients})
        node.start()

    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        list(pool.map(one, nodes))


def with_credentials(node: LocalNode) -> LocalNode:
    """Clients for every credential of the matrix, made with the operator's commands."""
    clients = {role: (role,) for role in ALL_ROLES} | {"officer+auditor": ("officer", "auditor")}
    outputs = node.cli_in_turn(  # one process for them all
        client_command("revoked", ALL_ROLES),
        ["clients", "revoke", "revoked"],
        [*client_command("short-lived", ALL_ROLES), "--expires-in", "1s"],
        *(client_command(name, roles) for name, roles in clients.items()),
    )
    node.tokens["revoked"] = outputs[0].strip().splitlines()[-1]
    node.tokens["expired"] = outputs[2].strip().splitlines()[-1]
    for name, output in zip(clients, outputs[3:], strict=True):
        node.tokens[name] = output.strip().splitlines()[-1]
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

"""Names of API clients (app/auth/service.py `check_client_name`).

From review: `clients create` took any name: an escape sequence or a line break forged rows
of `clients list` on the operator's terminal, a bidi override reversed it, and a lookalike
(`ofﬁcer`, with the ligature ﬁ) could be named among a restricted request's officers in
place of the real `officer`, who then lost sight of it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from app.localnodes import LocalNode
from tests.security.conftest import new_node, prepare

REFUSED = [
    "ZZINJ\x1b[31mred\nFAKE\tactive",
    "ZZINJ\u202eoff",
    "of\ufb01cer",
    "",
    ".officer",
    "a" * 101,
    "two words",
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    local = new_node(tmp_path_factory.mktemp("names"))
    try:
        prepare([local])
        yield local
    finally:
        local.stop()


@pytest.mark.parametrize("name", REFUSED)
def test_a_name_outside_the_rule_is_refused_and_nothing_is_created(
    node: LocalNode, name: str
) -> None:
    done = node.cli("clients", "create", name, "--role", "officer", check=False)
    assert done.returncode == 1
    assert "a client's name is 1 to 100 ASCII letters, digits and . _ @ + -" in done.stderr
    assert "token" not in done.stdout
    listed = node.cli("clients", "list").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["admin", "officer"]


def test_names_of_systems_and_people_are_taken(node: LocalNode) -> None:
    for name in ("case-system.prod", "maria.lopez@mj.es", "officer+auditor", "A" * 100):
        node.cli("clients", "create", name, "--role", "officer")
    names = [line.split("\t")[0] for line in node.cli("clients", "list").stdout.splitlines()]
    assert {"case-system.prod", "maria.lopez@mj.es", "officer+auditor", "A" * 100} <= set(names)


def test_a_damaged_client_row_is_named_in_one_line(tmp_path: Path) -> None:
    """From review: `clients list` over a row whose stored text is not UTF-8 printed a
    traceback quoting the damaged value. One line now, naming the column, exit 1."""
    local = new_node(tmp_path)
    local.init(clients={"admin": ("admin",), "officer": ("officer",)})
    with closing(sqlite3.connect(local.database_url.removeprefix("sqlite:///"))) as db:
        db.execute("UPDATE api_clients SET roles = CAST(X'C328FF' AS TEXT) WHERE name='officer'")
        db.commit()
    done = local.cli("clients", "list", check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: a value stored in column 'api_clients.roles' cannot be read (text that is not "
        "UTF-8): storage was altered or damaged; tell the operator"
    ]
    assert "Traceback" not in done.stderr

"""A node's keys with another node's database (a settings file copied from the other node, a
mistyped ENTRAIDE_DATABASE_URL) is refused in plain words by every command, `serve` first,
and named by `doctor`; the database is left as it was.

From review: ES/MJ's keys on AR/MPF's database started, answered /readyz "ready", took AR's
officer's token and listed AR's inbox, and said only that the audit log was "rolled back or
rewritten" (doctor, a critical log line), as if someone had tampered with it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from app.localnodes import LocalNode
from tests.conftest import migrated_sqlite


def _node(base: Path, authority: str, label: str) -> LocalNode:
    node = LocalNode(authority, "Authority", base / label, migrated_sqlite(base / f"{label}.db"))
    node.init()
    return node


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalNode, LocalNode, LocalNode]:
    """ES/MJ, AR/MPF, and a second ES/MJ (a test node beside the production one, say)."""
    base = tmp_path_factory.mktemp("owners")
    return _node(base, "ES/MJ", "es"), _node(base, "AR/MPF", "ar"), _node(base, "ES/MJ", "es2")


def _entries(node: LocalNode) -> int:
    database = node.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        return int(connection.execute("SELECT count(*) FROM audit_entries").fetchone()[0])


@pytest.mark.parametrize(
    ("other", "said"),
    [
        (1, "the database holds the audit log of AR/MPF, not ES/MJ's"),
        (2, "the database's audit log is signed by another log key than ES/MJ's"),
    ],
    ids=["another-authority", "another-node-of-the-authority"],
)
def test_keys_on_another_node_s_database_are_refused(
    nodes: tuple[LocalNode, LocalNode, LocalNode], other: int, said: str
) -> None:
    es, theirs = nodes[0], nodes[other]
    mixed = dataclasses.replace(es, database_url=theirs.database_url)
    before = _entries(theirs)
    for command in (["serve"], ["worker"], ["clients", "list"], ["peers", "list"]):
        refused = mixed.cli(*command, check=False)
        assert refused.returncode == 1, (command, refused.stdout)
        assert said in refused.stderr, (command, refused.stderr)
        assert "ENTRAIDE_DATABASE_URL names another node's database" in refused.stderr
        assert "Traceback" not in refused.stderr
    # The auditor's tool runs whatever the state, and says it first.
    audited = mixed.cli("audit", "verify", "--db", check=False)
    assert audited.stderr.startswith(f"warning: {said}"), audited.stderr
    doctor = mixed.cli("doctor", check=False)
    assert doctor.returncode == 1
    assert f"FAIL  database         {said}" in doctor.stdout, doctor.stdout
    assert "rolled back" not in doctor.stdout  # what it is, not what it looks like
    assert _entries(theirs) == before  # nothing written to it
    # Each with its own keys: as before.
    for node in (es, theirs):
        assert node.cli("clients", "list").returncode == 0
        assert "FAIL" not in node.cli("doctor", check=False).stdout


def test_rows_forged_without_the_log_key_do_not_make_a_node_another_s(tmp_path: Path) -> None:
    """From review: eight checkpoint rows of the largest sizes, copies of a real note with
    its signature changed (what someone who may write to the database but holds no log key
    can add), made the node refuse every command as "another node's", and doctor hide them.
    The node's first checkpoints are still its own: it runs, and the rows are named."""
    node = _node(tmp_path, "ES/MJ", "es")
    database = node.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        note, root, created = connection.execute(
            "SELECT note, root_hash, created_at FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        *text, signature, end = note.split("\n")
        changed = signature[:-3] + ("A" if signature[-3] != "A" else "B") + signature[-2:]
        forged = "\n".join([*text, changed, end])
        for extra in range(12):
            connection.execute(
                "INSERT INTO audit_checkpoints (size, root_hash, note, created_at) "
                "VALUES (?, ?, ?, ?)",
                (1000 + extra, root, forged, created),
            )
    assert node.cli("clients", "list").returncode == 0
    audited = node.cli("audit", "verify", "--db", check=False)
    assert audited.returncode == 1
    assert "another node" not in audited.stderr
    assert "does not verify" in audited.stderr, audited.stderr
    assert "another node" not in node.cli("doctor", check=False).stdout

"""`entraide requests` refused, at a terminal, against a real node process: by the node
(404, 401, 403, 422), by the command itself before any call (an id that is not one, a
token copied with its line ending), or for want of a node at the URL given. Each is one
line on stderr, never a traceback, and never the token."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.localnodes import LocalNode, free_port
from tests.conftest import BACKENDS, make_databases
from tests.e2e.test_requests_cli import entraide


@pytest.fixture(scope="module", params=BACKENDS)
def es(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    """One node (no peer is needed to be refused), with an officer's and an auditor's token."""
    databases = make_databases(request.param, tmp_path_factory.mktemp("db"))
    base = tmp_path_factory.mktemp("nodes")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", base / "es", databases.new("es"))
    try:
        node.init(clients={role: (role,) for role in ("officer", "auditor")})
        node.start()
        yield node
    finally:
        node.stop()
        databases.drop_all()


def one_line_refusal(done: subprocess.CompletedProcess[str], says: str, code: int = 1) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ")
    assert says in done.stderr, done.stderr


def test_refusals_and_an_unreachable_node_are_one_line_without_the_token(
    es: LocalNode, tmp_path: Path
) -> None:
    unknown = "ab" * 16
    one_line_refusal(entraide(es, "show", unknown), "HTTP 404 unknown_request")
    one_line_refusal(
        entraide(es, "list", "--token", "ent_not-a-token"),
        "HTTP 401",
    )
    wrong = "ent_" + "x" * 43
    refused = entraide(es, "show", unknown, token=wrong)
    one_line_refusal(refused, "the node did not take the token")
    assert wrong not in refused.stderr
    # An auditor's token reads the audit log, not requests.
    forbidden = entraide(es, "list", token=es.tokens["auditor"])
    one_line_refusal(forbidden, "HTTP 403", code=1)
    assert es.tokens["auditor"] not in forbidden.stderr
    # The node's 422s, with the field they name.
    misspelt = entraide(es, "list", "--status", "recieved")
    one_line_refusal(misspelt, "HTTP 422 invalid_request")
    assert "status: Input should be" in misspelt.stderr
    naive = entraide(es, "list", "--due-before", "2026-12-07T12:00:00")
    one_line_refusal(naive, "due_before:")
    # Refused here, before any call: an id that is not one (it would be another route).
    one_line_refusal(entraide(es, "show", "../admin/peers"), "32 lower-case hex digits", code=2)
    # A token copied with its line ending: httpx's own message quoted it, token and all.
    token = es.tokens["officer"]
    for copied in (token + "\r", token + "\n", f"{token[:8]} {token[8:]}"):
        # Every command of the group: `download` quoted it too (from review).
        for args in (("list",), ("download", unknown, "--out", str(tmp_path / "x"))):
            mangled = entraide(es, *args, token=copied)
            one_line_refusal(mangled, "line break", code=2)
            assert token[4:] not in mangled.stderr
            assert token[8:] not in mangled.stderr
    # Nothing listens there.
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (("list",), ("show", unknown)):
        one_line_refusal(entraide(es, *args, url=nowhere), f"cannot reach the node at {nowhere}")
    one_line_refusal(entraide(es, "list", url="http://[::1"), "not a URL", code=2)
    one_line_refusal(entraide(es, "list", url="localhost:8600"), "needs https://", code=2)
    # Never the token, whatever the refusal.
    for done in (refused, naive):
        assert token not in done.stderr + done.stdout

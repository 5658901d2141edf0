"""`entraide serve` and `entraide worker` start without the command-line framework
(app/launch.py, app/nodeproc.py): a node process no longer carries typer and the module of
some eighty commands for its whole life. Every other form of those commands goes
to the full command line, and both say a failure to start alike."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app import nodeproc
from app.launch import quick_command
from app.localnodes import LocalNode
from tests.conftest import migrated_sqlite


@pytest.mark.parametrize(
    ("args", "host", "port"),
    [
        (["serve"], "127.0.0.1", 8600),
        (["serve", "--port", "9000"], "127.0.0.1", 9000),
        (["serve", "--port=9000", "--host=0.0.0.0"], "0.0.0.0", 9000),  # noqa: S104
        (["serve", "--host", "::1", "--port", "65535"], "::1", 65535),
    ],
)
def test_serve_in_its_plain_forms_starts_without_the_command_line(
    args: list[str], host: str, port: int
) -> None:
    run = quick_command(args)
    assert run is not None
    assert run.func is nodeproc.serve  # type: ignore[attr-defined]
    assert run.args == (host, port)  # type: ignore[attr-defined]


def test_worker_alone_starts_without_the_command_line() -> None:
    assert quick_command(["worker"]) is nodeproc.worker


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["init"],
        ["serve", "--help"],
        ["serve", "--port"],  # a value missing: the command line says so
        ["serve", "--port", "8600", "--port", "8601"],
        ["serve", "--port", "+8600"],
        ["serve", "--port", "65536"],
        ["serve", "--port", "86OO"],
        ["serve", "--port", "٨٦٠٠"],  # digits, but not ASCII ones
        ["serve", "--host", "--port", "8600"],
        ["serve", "--host="],
        ["serve", "--hots", "x"],
        ["serve", "extra"],
        ["worker", "--help"],
        ["worker", "extra"],
        ["clients", "list"],
    ],
)
def test_every_other_form_goes_to_the_full_command_line(args: list[str]) -> None:
    assert quick_command(args) is None


def _entraide(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ({}, "error: no database at "),
        ({"ENTRAIDE_WORKER_POLL_SECONDS": "often"}, "error: ENTRAIDE_WORKER_POLL_SECONDS: "),
    ],
)
def test_a_node_that_cannot_start_says_why_the_same_either_way(
    tmp_path: Path, setting: dict[str, str], said: str
) -> None:
    """`serve` as launched quickly, and as the full command line runs it (`--port +8600`
    is a form only the full one parses): the same line, the same status."""
    node = LocalNode("ES/MJ", "Ministerio", tmp_path, f"sqlite:///{tmp_path / 'none.db'}")
    env = {**node.env(), **setting}
    quick = _entraide(env, "serve", "--port", "8600")
    full = _entraide(env, "serve", "--port", "+8600")
    assert (quick.returncode, full.returncode) == (1, 1)
    assert quick.stderr.startswith(said), quick.stderr
    assert quick.stderr == full.stderr
    assert "Traceback" not in quick.stderr


def _exec(node: LocalNode, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python -X importtime -m app ARGS` as an operator starts it: a new interpreter."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "app", *args],
            env=node.env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _until(
    what: str, process: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"{what}: not in 60 s"
        time.sleep(0.1)


def _serving(node: LocalNode) -> bool:
    try:
        return httpx.get(node.url + "/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _imports(log: Path) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.read_text().splitlines()
        if line.startswith("import time:")
    }


def _served_until(node: LocalNode, log: Path, sent: signal.Signals) -> int:
    """`entraide serve`, exec'd, until it is ready; then `sent`. Its exit status."""
    process = _exec(node, log, "serve", "--port", str(node.port))
    try:
        _until("ready", process, log, lambda: _serving(node))
    finally:
        process.send_signal(sent)
        try:
            ended = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()  # not left running past the test
            raise
    return ended


@pytest.fixture
def node(tmp_path: Path) -> LocalNode:
    made = LocalNode("ES/MJ", "Ministerio", tmp_path, migrated_sqlite(tmp_path / "es.db"))
    made.init()
    return made


def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    """Past 65535 the full command line refuses it (it was an OverflowError's traceback)."""
    node = LocalNode("ES/MJ", "Ministerio", tmp_path, f"sqlite:///{tmp_path / 'none.db'}")
    refused = _entraide(node.env(), "serve", "--port", "+70000")
    assert refused.returncode == 2, refused.stderr
    assert "65535" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_execd_node_imports_no_command_line_framework(node: LocalNode, tmp_path: Path) -> None:
    """A node started as an operator starts it (a new interpreter, `python -m app serve`)
    serves, stops on SIGTERM, and never imported typer or app.cli."""
    log = tmp_path / "serve.log"
    ended = _served_until(node, log, signal.SIGTERM)
    # uvicorn shuts down, then ends by the signal it was sent, as systemd expects of it.
    assert ended == -signal.SIGTERM, log.read_text()[-2000:]
    assert "Application shutdown complete." in log.read_text()
    imported = _imports(log)
    assert {"app.nodeproc", "app.main", "uvicorn"} <= imported
    # (click itself is uvicorn's, for its own command line; typer carries a copy of its own.)
    assert not {"typer", "app.cli", "app.cli_security"} & imported


def test_an_execd_worker_imports_no_command_line_framework(node: LocalNode, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    process = _exec(node, log, "worker")
    try:
        _until("started", process, log, lambda: "delivery worker" in log.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        ended = process.wait(timeout=60)
    assert ended == 0, log.read_text()[-2000:]
    imported = _imports(log)
    assert {"app.nodeproc", "app.delivery.worker"} <= imported
    assert not {"typer", "app.cli", "app.cli_security"} & imported


def test_ctrl_c_ends_a_node_quietly(node: LocalNode, tmp_path: Path) -> None:
    """From review: uvicorn raises SIGINT again once shut down, which asyncio hands back as
    KeyboardInterrupt, and the quick path printed its traceback; typer ends it with 130."""
    log = tmp_path / "serve.log"
    ended = _served_until(node, log, signal.SIGINT)
    assert ended == 130, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()
    assert "Application shutdown complete." in log.read_text()

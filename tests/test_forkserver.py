"""The fork server the suite starts its nodes and commands with: each forked process must
behave as the `entraide` process it stands for, as far as a test can tell."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app import localnodes
from app.forkserver import ForkedProcess, ForkServer, ForkServerError
from app.localnodes import LocalNode


@pytest.fixture(scope="module")
def forks() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ENTRAIDE_")}
    env.update(
        ENTRAIDE_DATABASE_URL=f"sqlite:///{tmp_path / 'node.db'}",
        ENTRAIDE_KEYS_DIR=str(tmp_path / "keys"),
        ENTRAIDE_ALLOW_INSECURE_HTTP="true",
        **extra,
    )
    return env


def test_a_command_gives_its_output_and_exit_status(forks: ForkServer, tmp_path: Path) -> None:
    done = forks.run(["--help"], _env(tmp_path), timeout=60)
    assert done.returncode == 0
    assert "serve" in done.stdout
    refused = forks.run(["no-such-command"], _env(tmp_path), timeout=60)
    assert refused.returncode == 2
    assert "No such command" in refused.stderr
    # A command's failure is its own: an invalid setting, reported as `entraide` reports it.
    bad = forks.run(["clients", "list"], _env(tmp_path, ENTRAIDE_LOG_FORMAT="yaml"), timeout=60)
    assert bad.returncode == 1
    assert "ENTRAIDE_LOG_FORMAT" in bad.stderr


def test_each_command_runs_with_its_own_environment_and_folder(
    forks: ForkServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(2):
        folder = tmp_path / f"n{index}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        init = ["init", "--authority-id", f"XX/N{index}", "--name", f"n{index}"]
        done = forks.run([*init, "--public-url", "http://127.0.0.1:1"], _env(folder), timeout=120)
        assert done.returncode == 0, done.stderr
        assert (folder / "keys").is_dir()
        assert (folder / "node.db").exists()
    # The second command did not see the first one's settings (a cached copy would have).
    first = forks.run(["keys", "show"], _env(tmp_path / "n0"), timeout=60).stdout
    second = forks.run(["keys", "show"], _env(tmp_path / "n1"), timeout=60).stdout
    assert first != second


def test_a_long_running_process_answers_signals_and_waits(
    forks: ForkServer, tmp_path: Path
) -> None:
    env = _env(tmp_path)
    init = ["init", "--authority-id", "XX/S", "--name", "s", "--public-url", "http://127.0.0.1:1"]
    assert forks.run(init, env, timeout=120).returncode == 0
    with (tmp_path / "out.log").open("ab") as log:
        node = forks.spawn(["worker"], env, log.fileno(), log.fileno())
        assert node.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            node.wait(timeout=0.2)
        deadline = time.monotonic() + 30
        while b"started" not in (tmp_path / "out.log").read_bytes():  # its handler is set
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        node.terminate()  # the worker stops on SIGTERM and exits 0
        assert node.wait(timeout=30) == 0
        assert node.poll() == 0
        node.kill()  # ended: as Popen, nothing happens
        killed = forks.spawn(["worker"], env, log.fileno(), log.fileno())
        killed.kill()
        assert killed.wait(timeout=30) == -signal.SIGKILL


def _ended_uncollected(forks: ForkServer, tmp_path: Path) -> ForkedProcess:
    with open(os.devnull, "wb") as sink:
        process = forks.spawn(["--help"], _env(tmp_path), sink.fileno(), sink.fileno())
    assert process._ended(60)  # its pidfd says it has ended; nobody has asked the server yet
    return process


def test_a_process_collected_by_several_threads_at_once(forks: ForkServer, tmp_path: Path) -> None:
    for _ in range(5):
        process = _ended_uncollected(forks, tmp_path)
        start = threading.Barrier(4)

        def collect(
            _: int, process: ForkedProcess = process, start: threading.Barrier = start
        ) -> int | None:
            start.wait()
            return process.poll()

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(collect, range(4))) == [0, 0, 0, 0]
    assert forks.run(["--help"], _env(tmp_path), timeout=60).returncode == 0


def test_an_answer_left_by_an_interrupted_caller_is_skipped(
    forks: ForkServer, tmp_path: Path
) -> None:
    # A caller interrupted between its request and the answer (a test timeout, Ctrl-C): the
    # answer stays queued, and the process it names is not left running for nobody.
    connection = forks._connected()
    request = {"run": ["worker"], "env": _env(tmp_path), "cwd": str(tmp_path), "id": -1}
    with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as sink:
        descriptors = [stdin.fileno(), sink.fileno(), sink.fileno()]
        socket.send_fds(connection, [json.dumps(request).encode()], descriptors)
    done = forks.run(["--help"], _env(tmp_path), timeout=60)
    assert done.returncode == 0
    assert "serve" in done.stdout


def test_a_dead_server_is_replaced(forks: ForkServer, tmp_path: Path) -> None:
    env = _env(tmp_path)
    init = ["init", "--authority-id", "XX/D", "--name", "d", "--public-url", "http://127.0.0.1:1"]
    assert forks.run(init, env, timeout=120).returncode == 0
    with open(os.devnull, "wb") as sink:
        orphan = forks.spawn(["worker"], env, sink.fileno(), sink.fileno())
    assert forks._process is not None
    forks._process.kill()
    forks._process.wait()
    assert forks.run(["--help"], env, timeout=60).returncode == 0  # a new server
    orphan.kill()  # still a handle on that process, though its status went with the server
    with pytest.raises(ForkServerError, match="lost"):
        orphan.wait(timeout=30)


def test_a_node_started_with_exec_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once as an operator starts it: a fresh interpreter for `init`, `clients create` and
    `serve` (an import that works only after another module's would pass unseen in forks)."""
    monkeypatch.setattr(localnodes, "_FORKS", [])
    node = LocalNode("XX/E", "exec", tmp_path / "n", f"sqlite:///{tmp_path / 'n.db'}")
    node.init(clients={"officer": ["officer"]})
    node.start()
    try:
        assert isinstance(node.process, subprocess.Popen)
        with node.client("officer") as http:
            assert http.get("/api/v1/requests").status_code == 200
    finally:
        node.stop()

"""The fork server the suite starts its nodes and commands with: each forked process must
behave as the `entraide` process it stands for, as far as a test can tell."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.forkserver import ForkServer


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
        node.terminate()  # the worker stops on SIGTERM and exits 0
        assert node.wait(timeout=30) == 0
        assert node.poll() == 0
        node.kill()  # ended: as Popen, nothing happens
        killed = forks.spawn(["worker"], env, log.fileno(), log.fileno())
        killed.kill()
        assert killed.wait(timeout=30) == -signal.SIGKILL

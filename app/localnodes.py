"""Real node processes on loopback, for the demo, the end-to-end tests and the benchmarks.

Each node is an `entraide serve` process with its own keys directory and database, set up
through the same commands an operator runs. Nothing here is a stand-in for a component.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.forkserver import ForkedProcess, ForkServer


class _PortRange:
    """Ports handed out in turn from a fixed range, when one is set (`use_port_range`).

    The kernel's choice (port 0) is random over the ephemeral range, which every outgoing
    connection also draws from: two processes starting nodes side by side (test workers) could
    each be given the same port between asking and binding. A range of one's own, below the
    ephemeral range and walked in order, gives no port twice in a run."""

    def __init__(self) -> None:
        self.ports: range | None = None
        self.next = 0

    def take(self) -> int | None:
        if self.ports is None:
            return None
        for _ in range(len(self.ports)):
            port = self.ports[self.next % len(self.ports)]
            self.next += 1
            if _bindable(port):
                return port
        raise RuntimeError(f"no free port left in {self.ports.start}-{self.ports.stop - 1}")


_RANGE = _PortRange()


def use_port_range(low: int, high: int) -> None:
    """Take later ports from low..high-1 (each process its own range), starting anywhere in it."""
    _RANGE.ports = range(low, high)
    _RANGE.next = (os.getpid() * 7919) % (high - low)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_FORKS: list[ForkServer] = []


def use_fork_server(enabled: bool = True) -> None:
    """Start later `entraide` processes of this process's nodes by forking them from a server
    that has imported the application once (app.forkserver), instead of a new interpreter
    each: for test suites, which start hundreds. Benchmarks and the demo never call it."""
    if enabled and not _FORKS:
        _FORKS.append(ForkServer())
    elif not enabled and _FORKS:
        _FORKS.pop().close()


def run_entraide(
    args: Sequence[str], env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`entraide *args` with exactly this environment, as subprocess.run(capture_output=True,
    text=True): forked from the fork server when it is in use, else a new interpreter."""
    if _FORKS:
        return _FORKS[0].run(args, env, timeout=timeout)
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_entraide(
    args: Sequence[str], env: Mapping[str, str], log: int
) -> subprocess.Popen[bytes] | ForkedProcess:
    """`entraide *args` started with exactly this environment, its output (stdout and stderr)
    on the descriptor `log`: forked from the fork server when it is in use, else a new
    interpreter. For long-running commands (`serve`, `worker`)."""
    if _FORKS:
        return _FORKS[0].spawn(args, env, log, log)
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args], env=dict(env), stdout=log, stderr=subprocess.STDOUT
    )


def free_port() -> int:
    taken = _RANGE.take()
    if taken is not None:
        return taken
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_SEPARATOR = "\x1eentraide-command"
# Runs `entraide` commands in turn in one interpreter (LocalNode.cli_in_turn): each as the
# console script runs it (app.launch.main, which exits with the command's status).
_IN_TURN = f"""
import json, sys
from app import launch
for args in json.loads(sys.argv[1]):
    print({_SEPARATOR!r}, flush=True)
    sys.argv = ["entraide", *args]
    try:
        launch.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
"""


def client_command(name: str, roles: Sequence[str]) -> list[str]:
    return ["clients", "create", name, *(arg for role in roles for arg in ("--role", role))]


@dataclass
class LocalNode:
    authority_id: str
    name: str
    workdir: Path
    database_url: str
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | ForkedProcess | None = None
    fingerprint: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    # "https" when the node is given a certificate (ENTRAIDE_TLS_CERT in extra_env); `verify`
    # then trusts its CA, for our own test clients.
    scheme: str = "http"
    verify: ssl.SSLContext | bool = True

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def keys_dir(self) -> Path:
        return self.workdir / "keys"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("ENTRAIDE_")}
        env.update(
            {
                "ENTRAIDE_DATABASE_URL": self.database_url,
                "ENTRAIDE_KEYS_DIR": str(self.keys_dir),
                "ENTRAIDE_ALLOW_INSECURE_HTTP": "true",
                "ENTRAIDE_WORKER_POLL_SECONDS": "0.2",
                # Test suites refuse many requests from 127.0.0.1 on purpose; throttling has
                # its own tests (tests/security/test_throttle.py), with low limits.
                "ENTRAIDE_AUTH_FAILURE_LIMIT": "100000",
                "ENTRAIDE_P2P_REFUSAL_LIMIT": "100000",
                **self.extra_env,
            }
        )
        return env

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self._run(args)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"entraide {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}"
            )
        return result

    def _run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return run_entraide(args, self.env())

    def cli_in_turn(self, *commands: Sequence[str]) -> list[str]:
        """Several commands run in turn by one process, as `entraide` runs each alone (the
        same entry point, the same environment), stopping at the first that fails; returns
        each one's output. One interpreter start instead of one each (about a second of CPU
        each, mostly imports), for setting nodes up."""
        if _FORKS:  # each fork costs little: run them one by one
            outputs = []
            for args in commands:
                outputs.append(self.cli(*args).stdout)
            return outputs
        result = subprocess.run(
            [sys.executable, "-c", _IN_TURN, json.dumps([list(args) for args in commands])],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120 * len(commands),
            check=False,
        )
        if result.returncode != 0:
            names = "; ".join(
                " ".join(word for word in args[:2] if not word.startswith("-")) for args in commands
            )
            raise RuntimeError(
                f"entraide {names} failed ({result.returncode}): {result.stderr[-2000:]}"
            )
        return result.stdout.split(_SEPARATOR + "\n")[1:]

    def init(self, clients: Mapping[str, Sequence[str]] | None = None) -> None:
        """`entraide init`, then `entraide clients create` for each of `clients` (name: roles),
        in one process; their tokens go into `tokens`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        identity = ["--authority-id", self.authority_id, "--name", self.name]
        commands = [["init", *identity, "--public-url", self.url]]
        commands += [client_command(name, roles) for name, roles in (clients or {}).items()]
        outputs = self.cli_in_turn(*commands)
        self.fingerprint = outputs[0].strip().splitlines()[-1]
        for name, output in zip(clients or {}, outputs[1:], strict=True):
            self.tokens[name] = output.strip().splitlines()[-1]

    def create_client(self, name: str, *roles: str) -> str:
        token = self.cli(*client_command(name, roles)).stdout.strip().splitlines()[-1]
        self.tokens[name] = token
        return token

    def start(self, timeout: float = 30.0) -> None:
        serve = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.process = spawn_entraide(serve, self.env(), log.fileno())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node {self.authority_id} exited; see {self.log_path}")
            try:
                ready = httpx.get(self.url + "/readyz", timeout=1.0, verify=self.verify)
                if ready.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node {self.authority_id} not ready after {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def client(self, token_name: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"authorization": f"Bearer {self.tokens[token_name]}"},
            timeout=30.0,
            verify=self.verify,
        )

    def metrics(self, client: str = "monitor") -> httpx.Response:
        """GET /metrics as a Prometheus scraper sends it: with the token of `client` (one
        made with `--role monitor`, or an admin's)."""
        headers = {"authorization": f"Bearer {self.tokens[client]}"}
        return httpx.get(self.url + "/metrics", headers=headers, timeout=10.0, verify=self.verify)

    def readyz(self, client: str | None = None) -> httpx.Response:
        """GET /readyz as a load balancer asks it (no token: the status, no backlog), or with
        the token of `client` (a monitor's or an admin's: the delivery backlog too)."""
        headers = {} if client is None else {"authorization": f"Bearer {self.tokens[client]}"}
        return httpx.get(self.url + "/readyz", headers=headers, timeout=10.0, verify=self.verify)

    def pin(self, other: LocalNode, admin: str = "admin") -> Any:
        with self.client(admin) as http:
            response = http.post(
                "/api/v1/admin/peers", json={"url": other.url, "fingerprint": other.fingerprint}
            )
            response.raise_for_status()
            return response.json()

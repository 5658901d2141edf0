"""`entraide` processes forked from an interpreter that has imported the application already.

An `entraide` process spends about a second of CPU importing FastAPI, SQLAlchemy, pydantic,
alembic and the application before it does anything; a test suite that starts a few hundred
nodes and commands on two cores spends minutes on that alone. A fork server imports them
once. Each command is then a fork of it that runs `app.cli.main` as the console script does,
with the arguments, environment, working directory and standard streams it is given: a real
process, with its own pid, signals and exit status, running the code as shipped.

For test suites only (tests/conftest.py turns it on, `app.localnodes.use_fork_server`): the
processes share the server's hash seed, /proc/PID/environ shows the server's environment (the
process's own is set after the fork), and they skip the start-up an operator's node goes
through, which the benchmarks and the footprint tests measure (they start nodes with exec).

The protocol runs over a Unix SOCK_SEQPACKET pair (a message is one packet, and descriptors
ride with it): {"run": argv, "env": ..., "cwd": ...} with the child's stdin, stdout and stderr
as descriptors, answered by {"pid": pid} with a pidfd of the child (a handle on that process,
never on a later one given the same pid); {"status": pid}, once the pidfd says the child has
ended, answered by {"status": returncode} as subprocess gives it (-N for signal N).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

_MAX_MESSAGE = 1 << 20
# What `entraide serve` imports (after skipping what a node never uses, as app.cli does), and
# no more: a forked node holds what an exec'd one would, for the tests that bound its memory.
# Other commands import the rest (alembic for `init` and `migrate`) when they run.
_PRELOAD = ("app.cli", "app.main", "app.node", "app.tls", "app.delivery.worker", "uvicorn")
_SERVER = "import sys; from app.forkserver import serve; serve(int(sys.argv[1]))"


class ForkedProcess:
    """A command forked by the server, with what tests use of subprocess.Popen."""

    def __init__(self, server: ForkServer, args: list[str], pid: int, pidfd: int) -> None:
        self._server = server
        self.args = args
        self.pid = pid
        self._pidfd: int | None = pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._ended(0):
            return self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self._collect()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:  # ended (not yet collected): as Popen, nothing to do
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _ended(self, timeout: float | None) -> bool:
        if self._pidfd is None:
            return True
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(readable)

    def _collect(self) -> int:
        self.returncode = returncode = self._server.status(self.pid)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return returncode

    def __del__(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)


class ForkServer:
    """The test process's end: starts the server on first use, asks it for processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def spawn(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        stdout: int,
        stderr: int,
        cwd: str | None = None,
    ) -> ForkedProcess:
        """`entraide *args` with this environment, its output on these descriptors."""
        request = {"run": list(args), "env": dict(env), "cwd": cwd or os.getcwd()}
        with open(os.devnull, "rb") as stdin, self._lock:
            connection = self._connected()
            socket.send_fds(
                connection, [json.dumps(request).encode()], [stdin.fileno(), stdout, stderr]
            )
            data, fds, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 1)
        answer = json.loads(data)
        if "error" in answer or not fds:
            raise RuntimeError(f"fork server could not start entraide: {answer.get('error')}")
        return ForkedProcess(self, ["entraide", *args], answer["pid"], fds[0])

    def run(
        self, args: Sequence[str], env: Mapping[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """As subprocess.run(capture_output=True, text=True) of `entraide *args`."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = self.spawn(args, env, out.fileno(), err.fileno())
            try:
                returncode = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
        return subprocess.CompletedProcess(process.args, returncode, stdout, stderr)

    def status(self, pid: int) -> int:
        with self._lock:
            connection = self._connected()
            connection.send(json.dumps({"status": pid}).encode())
            returncode: int = json.loads(connection.recv(_MAX_MESSAGE))["status"]
        return returncode

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()  # the server reads the end of its socket and exits
                self._socket = None
            if self._process is not None:
                self._process.wait(timeout=10)
                self._process = None

    def _connected(self) -> socket.socket:
        if self._socket is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SERVER, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            self._socket = ours
            atexit.register(self.close)
        return self._socket


# The server's end.


def serve(fd: int) -> None:
    """Import the application, then fork a command for each request until the socket ends."""
    connection = socket.socket(fileno=fd)
    from app.cli import _skip_unused_imports

    _skip_unused_imports()
    for module in _PRELOAD:
        __import__(module)
    if threading.active_count() != 1:  # forking a threaded process copies held locks
        raise RuntimeError("an import started a thread; the fork server cannot fork safely")
    while True:
        data, fds, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 3)
        if not data:
            return
        request: dict[str, Any] = json.loads(data)
        if "status" in request:
            _, status = os.waitpid(request["status"], 0)
            connection.send(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            for descriptor in fds:
                os.close(descriptor)
            connection.send(json.dumps({"error": str(exc)}).encode())
            continue
        if pid == 0:
            connection.close()
            _child(request, fds)  # never returns
        for descriptor in fds:
            os.close(descriptor)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(connection, [json.dumps({"pid": pid}).encode()], [pidfd])
        os.close(pidfd)


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """Become `entraide *args`, then end as an interpreter ends: the threads it started
    joined, its exit handlers run, its streams flushed."""
    code = 1
    try:
        for target, descriptor in enumerate(fds):
            os.dup2(descriptor, target)
            os.close(descriptor)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["entraide", *request["run"]]
        from app.cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_Finalize does first
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")  # as the interpreter does for sys.exit("message")
    return 1

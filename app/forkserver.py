"""`entraide` processes forked from an interpreter that has imported the application already.

An `entraide` process spends about a second of CPU importing FastAPI, SQLAlchemy, pydantic,
alembic and the application before it does anything; a test suite that starts a few hundred
nodes and commands on two cores spends minutes on that alone. A fork server imports them
once. Each command is then a fork of it that runs `app.launch.main` as the console script does,
with the arguments, environment, working directory and standard streams it is given, and ends
as the interpreter ends (its threads joined, exit handlers run, streams flushed, exceptions
reported by the interpreter) but for the teardown of its modules (`_end`): a real process,
with its own pid, signals and exit status, running the code as shipped.

For test suites only (tests/conftest.py turns it on, `app.localnodes.use_fork_server`): the
processes share the server's hash seed, /proc/PID/environ shows the server's environment (the
process's own is set after the fork), and they skip the start-up an operator's node goes
through, which the benchmarks and the footprint tests measure (they start nodes with exec).

The protocol runs over a Unix SOCK_SEQPACKET pair (a message is one packet, and descriptors
ride with it); every request carries an id its answer repeats, so an answer left unread by an
interrupted caller is recognised and dropped. {"run": argv, "env": ..., "cwd": ...} with the
child's stdin, stdout and stderr as descriptors is answered by {"pid": pid} with a pidfd of
the child (a handle on that process, never on a later one given the same pid); {"status":
pid}, once the pidfd says the child has ended, by {"status": returncode} as subprocess gives
it (-N for signal N).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
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
# What `entraide serve` imports (after skipping what a node never uses, as app/nodeproc.py
# does), and the command module every other command builds (app.cli, with typer: 1.8 MiB a
# forked node holds and an exec'd one does not; the tests that bound a node's memory bound
# its growth). Other commands import the rest (alembic for `init` and `migrate`) as they run.
_PRELOAD = (
    "app.cli",
    "app.launch",
    "app.main",
    "app.node",
    "app.tls",
    "app.delivery.worker",
    "uvicorn",
)
_SERVER = "import sys; from app.forkserver import serve; serve(int(sys.argv[1]))"


class ForkServerError(RuntimeError):
    pass


class ForkedProcess:
    """A command forked by the server, with what tests use of subprocess.Popen."""

    def __init__(
        self, server: ForkServer, generation: int, args: list[str], pid: int, pidfd: int
    ) -> None:
        self._server = server
        self._generation = generation
        self._lock = threading.Lock()  # one collection, as Popen's wait lock
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
        with self._lock:
            if self.returncode is None and self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:  # ended (not yet collected): as Popen, nothing
                    pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _ended(self, timeout: float | None) -> bool:
        pidfd = self._pidfd
        if pidfd is None:
            return True
        poller = select.poll()  # not select(): descriptors past 1023 are valid here
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def _collect(self) -> int:
        with self._lock:
            if self.returncode is None:
                self.returncode = self._server.status(self.pid, self._generation)
                self._close()
            return self.returncode

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        self._close()  # the server reaps the process on its own (see serve)


class ForkServer:
    """The test process's end: starts the server on first use, asks it for processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count()
        self.generation = 0  # a new server after one died: its processes' statuses are lost
        self.log_path = ""

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
            answer, fds = self._ask(request, [stdin.fileno(), stdout, stderr])
            generation = self.generation
        if "pid" not in answer or not fds:
            raise ForkServerError(f"could not start entraide: {answer.get('error')}")
        return ForkedProcess(self, generation, ["entraide", *args], answer["pid"], fds[0])

    def run(
        self, args: Sequence[str], env: Mapping[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """As subprocess.run(capture_output=True, text=True) of `entraide *args`."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = self.spawn(args, env, out.fileno(), err.fileno())
            try:
                returncode = process.wait(timeout)
            except BaseException:  # a timeout, an interrupt: as subprocess.run, no leftover
                process.kill()
                process.wait()
                raise
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
        return subprocess.CompletedProcess(process.args, returncode, stdout, stderr)

    def status(self, pid: int, generation: int) -> int:
        with self._lock:
            if generation != self.generation:
                raise ForkServerError(f"the fork server died: the exit status of {pid} is lost")
            answer, _ = self._ask({"status": pid}, [])
        if "status" not in answer:
            raise ForkServerError(f"no exit status for {pid}: {answer.get('error')}")
        returncode: int = answer["status"]
        return returncode

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ask(self, request: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """One request and its answer (the lock held). A caller interrupted between the two
        leaves its answer queued: the next one skips it by its id."""
        connection = self._connected()
        request["id"] = ident = next(self._ids)
        try:
            socket.send_fds(connection, [json.dumps(request).encode()], fds)
            while True:
                data, received, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 1)
                if not data:
                    raise ForkServerError(f"the fork server ended; see {self.log_path}")
                for fd in received:
                    os.set_inheritable(fd, False)
                answer: dict[str, Any] = json.loads(data)
                if answer.get("id") == ident:
                    return answer, received
                _drop_stale(received)
        except OSError as exc:
            raise ForkServerError(f"the fork server is gone ({exc}); see {self.log_path}") from exc

    def _connected(self) -> socket.socket:
        if self._process is not None and self._process.poll() is not None:
            self._stop()  # died: the next server starts afresh
            self.generation += 1
        if self._socket is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            log = tempfile.NamedTemporaryFile(  # handed to the server, closed below
                prefix="entraide-forkserver-", suffix=".log", delete=False
            )
            self.log_path = log.name
            with log:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", _SERVER, str(theirs.fileno())],
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            theirs.close()
            self._socket = ours
            atexit.register(self.close)
        return self._socket

    def _stop(self) -> None:
        if self._socket is not None:
            self._socket.close()  # the server reads the end of its socket and exits
            self._socket = None
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _drop_stale(fds: list[int]) -> None:
    """The answer of an interrupted spawn: nobody will ever wait for that process."""
    for fd in fds:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


# The server's end.


def serve(fd: int) -> None:
    """Import the application, then fork a command for each request until the socket ends.
    In a child, never returns: ends the process as `python -m app` ends (`_end`), or raises
    what else `entraide` raised, for the interpreter to report and end with."""
    connection = socket.socket(fileno=fd)
    from app.nodeproc import skip_unused_imports

    skip_unused_imports()
    for module in _PRELOAD:
        __import__(module)
    if threading.active_count() != 1:  # forking a threaded process copies held locks
        raise RuntimeError("an import started a thread; the fork server cannot fork safely")
    # Out of the collector's reach: a child's collections would otherwise walk (and so copy)
    # every object it shares with this process, as its teardown did (`_end`).
    gc.freeze()
    ended: dict[int, int] = {}  # reaped children's statuses, until asked for
    while True:
        data, fds, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 3)
        if not data:
            return
        for descriptor in fds:
            os.set_inheritable(descriptor, False)
        request: dict[str, Any] = json.loads(data)
        _reap(ended)
        if "status" in request:
            answer = _status(ended, request["status"])
            connection.send(json.dumps({**answer, "id": request["id"]}).encode())
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            for descriptor in fds:
                os.close(descriptor)
            connection.send(json.dumps({"error": str(exc), "id": request["id"]}).encode())
            continue
        if pid == 0:
            connection.close()
            code: object = 0  # main() returned: a command that ended well
            try:
                _child(request, fds)
            except SystemExit as exc:
                # Ended outside the handler, as the interpreter clears the exception before
                # it ends: its traceback would keep the command's frames, and whatever only
                # they hold, from being finalised (from review).
                code = exc.code
            _end(code)
        for descriptor in fds:
            os.close(descriptor)
        pidfd = os.pidfd_open(pid)
        answer = {"pid": pid, "id": request["id"]}
        socket.send_fds(connection, [json.dumps(answer).encode()], [pidfd])
        os.close(pidfd)


def _reap(ended: dict[int, int]) -> None:
    """Collect every child that has ended (a caller may never ask for one)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        ended[pid] = os.waitstatus_to_exitcode(status)


def _status(ended: dict[int, int], pid: int) -> dict[str, Any]:
    if pid not in ended:
        try:
            _, status = os.waitpid(pid, 0)  # asked once its pidfd said it has ended
        except ChildProcessError:
            return {"error": f"{pid} is not a child of the fork server, or was collected"}
        ended[pid] = os.waitstatus_to_exitcode(status)
    return {"status": ended.pop(pid)}


def _end(code: object) -> None:
    """End a child as the interpreter ends a process that raised SystemExit(code): its
    threads joined, its exit handlers run (logging's flush among them), its standard streams
    flushed (status 120 if that fails, as the interpreter's); but not its teardown of every
    module and object, which in a fork of this large process touched every page the two
    shared and took a copy of each: about 0.35 s of CPU per command on a 2-core machine, a
    command taking 0.1 s (the suite starts hundreds)."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # as the interpreter does: the message to stderr, status 1
        sys.stderr.write(f"{code}\n")
        status = 1
    try:
        # What the interpreter calls first as it ends (wait_for_thread_shutdown): threading's
        # own exit callbacks (an idle ThreadPoolExecutor's workers are told to end), then
        # every non-daemon thread joined. A failure is reported, and the ending goes on.
        try:
            getattr(threading, "_shutdown")()  # noqa: B009 (private: not in the type stubs)
        except Exception:
            traceback.print_exc()
        atexit._run_exitfuncs()  # reports what a handler raises, and runs the others
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception as exc:
                with contextlib.suppress(OSError):
                    os.write(2, f"Exception ignored while flushing: {exc!r}\n".encode())
                status = 120
    finally:
        os._exit(status & 0xFF)


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """Become `entraide *args`; what it raises goes to the interpreter, as it would."""
    for target, descriptor in enumerate(fds):
        os.dup2(descriptor, target)
        os.close(descriptor)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["entraide", *request["run"]]
    from app.launch import main

    main()

"""A private PostgreSQL server for tests that must stop or restart PostgreSQL.

The shared server on 127.0.0.1:5432 belongs to every other test; restarting it would break
them. This one lives in a temporary directory, listens on a free loopback port with trust
authentication, and is removed by `destroy()`. `initdb` and `pg_ctl` refuse to run as root,
so as root they run as the `postgres` OS user, which then owns the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from app.localnodes import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or no way to run them as a non-root user."""


def find_bindir() -> Path:
    override = os.environ.get("ENTRAIDE_TEST_PG_BINDIR")
    candidates = [override] if override else sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    for candidate in reversed(candidates):  # newest major version first
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresUnavailable("no initdb found (set ENTRAIDE_TEST_PG_BINDIR)")


class PrivatePostgres:
    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.port = free_port()
        self.as_user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable("running as root and there is no postgres user") from exc
            self.as_user = "postgres"
        # Not under pytest's tmp_path: its parent is private to root, and the server runs
        # as another user. tempfile gives a fresh directory of our own under /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="entraide-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        if self.as_user is not None:
            entry = pwd.getpwnam(self.as_user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> str:
        command = [str(self.bindir / tool), *args]
        if self.as_user is not None:
            command = ["runuser", "-u", self.as_user, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({result.returncode}): {result.stderr[-2000:]}\n{self.log_tail()}"
            )
        return result.stdout

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def init(self) -> PrivatePostgres:
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # a test cluster: speed over crash safety of the initial files
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 200\nfsync = on\nshared_buffers = 32MB\n"
            )
        return self

    def start(self, timeout: float = 30.0) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )
        self.wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            "stop",
            timeout=timeout + 10,
        )

    def restart(self, mode: str = "fast", timeout: float = 30.0) -> None:
        self.stop(mode, timeout)
        self.start(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()

"""The node's long-running processes, `entraide serve` and `entraide worker`, and what every
command needs to open a node: its settings and its node, or the lines that say why not.

Nothing here imports typer or the command module: app/launch.py starts `serve` and `worker`,
given in their plain forms, without them, so that a node process does not carry the
framework and the module of some eighty commands for its whole life (about 2 MiB resident,
docs/benchmarks.md). app/cli.py runs the same functions for every other form of those two
commands (`--help`, an option misspelt) and says their failures the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    from app.config import Settings
    from app.node import Node

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8600
# How long `serve` lets requests under way finish after SIGTERM (systemd's stop waits 90 s).
SHUTDOWN_GRACE_SECONDS = 30
# Imports a node process never uses, which its libraries make whenever they can: httpx
# imports its command-line client (rich, pygments, click) when those are installed, and
# FastAPI imports pydantic.v1 to check that no route uses a v1 model. Together about 4 MiB
# resident and 0.1 s at each start. A None entry in sys.modules makes such an import fail;
# both libraries expect that and carry on (httpx's own `main` then says it is not installed,
# FastAPI then knows no v1 model can be in use). Not for the `requests` commands, which
# draw progress bars with rich.
UNUSED_IN_NODE = ("httpx._main", "pydantic.v1")
GIL_SWITCH_SECONDS = 0.001


class CommandFailed(Exception):
    """A command ends saying why: each line on standard error as `error: <line>`, and exit
    status 1 (app/cli.py says them as its other refusals, in red at a terminal)."""

    def __init__(self, *lines: str) -> None:
        super().__init__(*lines)
        self.lines = lines


def prepare_process() -> None:
    """What every `entraide` process sets first: its files are its user's alone, and its log
    lines go where and as the settings say."""
    from app.config import get_settings
    from app.obs.logs import configure_logging

    # Everything a node or a command writes is for its own user only: the database and its
    # WAL (the audit trail, client names), evidence blobs, audit exports, downloads of
    # decrypted evidence. The usual umask (022) made them readable by every local user.
    os.umask(0o077)
    try:
        settings = get_settings()
        configure_logging(settings.log_format, settings.log_level)
    except ValueError:  # invalid settings: the command itself (or `doctor`) explains them
        configure_logging()


def skip_unused_imports() -> None:
    for module in UNUSED_IN_NODE:
        # None is how the import system spells "cannot be imported" (typeshed knows only
        # modules as values).
        sys.modules.setdefault(module, None)  # type: ignore[arg-type]


def load_settings() -> Settings:
    from pydantic import ValidationError

    from app.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        raise CommandFailed(*setting_problems(exc)) from exc


def setting_problems(exc: ValidationError) -> list[str]:
    """Each invalid setting by its environment variable, with pydantic's reason only: never
    the value, which may hold a password (a database URL's)."""
    return [
        "ENTRAIDE_" + "_".join(str(part) for part in error["loc"]).upper() + f": {error['msg']}"
        for error in exc.errors()
    ]


def open_node(
    settings: Settings,
    *,
    another_nodes_database: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Node:
    """The node of an existing database and keys folder, or CommandFailed saying why.
    `another_nodes_database`: said through `warn`, not refused (`audit verify --db`, the
    auditor's tool, runs whatever the node's state)."""
    from sqlalchemy.exc import OperationalError

    from app.crypto.keys import KeyFileError
    from app.node import load_node
    from app.obs.health import schema_pending

    sqlite_file_exists(settings)
    try:
        node = load_node(settings)
    except (KeyFileError, ValueError) as exc:
        raise CommandFailed(str(exc)) from exc
    try:
        pending = schema_pending(node.engine)
    except OperationalError as exc:
        node.close()
        raise unreachable(settings, exc) from exc
    if pending:
        from app.doctor import NEWER_SCHEMA
        from app.obs.health import unknown_revisions

        node.close()
        newer = unknown_revisions(frozenset(schema_revisions(settings)))
        if newer:
            raise CommandFailed(NEWER_SCHEMA.format(revisions=", ".join(sorted(newer))))
        raise CommandFailed("the database is not at the latest schema; run `entraide migrate`")
    _refuse_another_nodes_database(node, warn=warn if another_nodes_database else None)
    return node


def _refuse_another_nodes_database(node: Node, *, warn: Callable[[str], None] | None) -> None:
    from app.audit.checkpoints import ANOTHER_NODES_DATABASE, foreign_log
    from app.db import read_snapshot

    with read_snapshot(node.sessions) as session:
        foreign = foreign_log(session, node.authority_id, node.keys.log_public)
    if foreign is None:
        return
    said = ANOTHER_NODES_DATABASE.format(why=foreign, keys=node.settings.keys_dir)
    if warn is not None:
        warn(said)
        return
    node.close()
    raise CommandFailed(said)


def sqlite_file_exists(settings: Settings) -> None:
    """SQLite creates a missing database file on first connection: a mistyped (or relative)
    path would give a command an empty database of its own, a backup of nothing that says
    it succeeded (from review). Only `init` and `migrate` create one."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    try:
        url = make_url(settings.database_url)
    except Exception:  # reported by whatever reads it next
        return
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database)
    if not path.exists():
        raise CommandFailed(
            f"no database at {path.absolute()}: check ENTRAIDE_DATABASE_URL (a relative path "
            "is taken from the folder you run the command in); `entraide init` creates one"
        )


def schema_revisions(settings: Settings) -> list[str]:
    """The database's Alembic revisions, or none (an empty or unreachable database: the
    migration itself says which)."""
    from app.db import make_engine
    from app.obs.health import current_heads

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            return sorted(current_heads(connection))
    except Exception:  # reported by the migration, in its own words
        return []
    finally:
        engine.dispose()


def unreachable(settings: Settings, exc: OperationalError) -> CommandFailed:
    """The database cannot be reached: said in plain words (no traceback, no password: the
    URL is shown as `doctor` shows it)."""
    from app.doctor import redacted_url, server_refusal, sqlite_file

    url = redacted_url(settings.database_url)
    refused = server_refusal(exc.orig or exc)
    if refused is not None:
        return CommandFailed(f"{url}: {refused}")
    database = sqlite_file(settings.database_url)
    if database is not None and not database.parent.is_dir():
        # A file in a folder that is not there: no server to be running (from review).
        return CommandFailed(
            f"the folder {database.parent} of the database does not exist: create it (as the "
            "user the node runs as), or correct ENTRAIDE_DATABASE_URL"
        )
    return CommandFailed(
        f"cannot reach {url} "
        f"({type(exc.orig).__name__}): is it running, and is ENTRAIDE_DATABASE_URL right?"
    )


def _start_process() -> None:
    """What a long-running process of the node (serve, worker) sets for itself first:
    threads hand the GIL back and forth (the event loop, the thread pool, the evidence
    helpers that hash and flush beside the cipher), and one whose C call returns waits up
    to the switch interval for it: 1 ms, not CPython's 5 (docs/benchmarks.md, evidence)."""
    from app.openfiles import raise_open_files_limit

    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    raise_open_files_limit()


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the node: local API, P2P API and the in-process delivery worker."""
    skip_unused_imports()
    import uvicorn

    from app.config import trusted_proxy_hosts
    from app.crypto.keys import KeyFileError
    from app.lingering import LingeringH11Protocol
    from app.main import create_app
    from app.tls import server_options

    settings = load_settings()
    node = open_node(settings)  # fail fast, with a clear message, on keys or schema problems
    try:
        tls = server_options(settings)
    except KeyFileError as exc:
        node.close()
        raise CommandFailed(str(exc)) from exc
    if settings.allow_insecure_http:
        logging.getLogger("entraide").warning(
            "ENTRAIDE_ALLOW_INSECURE_HTTP is on: peers may be reached over plain HTTP. "
            "Use this only for development and tests."
        )
    # Bound before anything starts: a port in use is said in plain words, before the
    # delivery worker could claim a delivery (uvicorn binds after the app's start-up).
    # As uvicorn binds it (an IPv6 host as the system's default makes it: on Linux, taking
    # IPv4 too; socket.create_server would make it IPv6 only).
    listening = socket.socket(family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
    except OSError as exc:  # a port past 65535 never comes here (both parsers bound it)
        listening.close()
        node.close()
        raise CommandFailed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    listening.set_inheritable(True)
    _start_process()
    # log_config=None: uvicorn's records go through our (JSON) handler like everything else.
    config = uvicorn.Config(
        create_app(settings, node=node),
        host=host,
        port=port,
        log_level="info",
        log_config=None,
        access_log=False,
        # On SIGTERM, requests under way get this long, then are cancelled: a body read
        # within its deadlines may take minutes (a trickle), and systemd kills at 90 s
        # (from review). A request cancelled so got no answer; its client asks again.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        # X-Forwarded-* believed only from the proxies the operator names (Settings).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=trusted_proxy_hosts(settings.trusted_proxies) or None,
        # A connection answered before its body's end closes without losing the answer.
        **{"http": LingeringH11Protocol, **tls},
    )
    uvicorn.Server(config).run(sockets=[listening])


def worker() -> None:
    """Run a standalone delivery worker (to scale out next to `serve`)."""
    skip_unused_imports()
    from app.delivery.worker import Worker

    settings = load_settings()
    node = open_node(settings)
    _start_process()
    runner = Worker(node)

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        runner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        runner.run()
    finally:
        runner.http.close()
        node.close()

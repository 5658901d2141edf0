"""`entraide`, the console script (and `python -m app`).

`serve` and `worker` in their plain forms start here, without the command-line framework
(app/nodeproc.py says why); every other command, and every other form of those two (`--help`,
an option misspelt or given twice), goes to app/cli.py, which parses and says it as ever.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

from app import nodeproc

OPTIONS = ("--host", "--port")


def quick_command(args: Sequence[str]) -> Callable[[], None] | None:
    """The node process `args` ask for: `worker` alone, or `serve` with at most `--host H`
    and `--port N` (each once, as `--name value` or `--name=value`, N a port number). None
    for anything else."""
    if list(args) == ["worker"]:
        return nodeproc.worker
    if not args or args[0] != "serve":
        return None
    given: dict[str, str] = {}
    words = list(args[1:])
    while words:
        name, equals, value = words.pop(0).partition("=")
        if name not in OPTIONS or name in given:
            return None
        if not equals:
            if not words:
                return None
            value = words.pop(0)
        if not value or value.startswith("-"):
            return None
        given[name] = value
    port = given.get("--port", str(nodeproc.DEFAULT_PORT))
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        return None
    return functools.partial(nodeproc.serve, given.get("--host", nodeproc.DEFAULT_HOST), int(port))


def run_node_process(run: Callable[[], None]) -> int:
    """Run `serve` or `worker`; a failure to start is said as app/cli.py says it."""
    from app.errors import EntraideError

    nodeproc.prepare_process()
    try:
        run()
    except KeyboardInterrupt:
        # Ctrl-C at a terminal: uvicorn shuts down, then raises the signal again, which
        # asyncio hands back as KeyboardInterrupt. Ended quietly, 130, as typer ends it (from
        # review: a traceback).
        return 130
    except nodeproc.CommandFailed as exc:
        return _said(*exc.lines)
    except EntraideError as exc:  # the node's own refusal (an audit log rolled back, say)
        return _said(exc.detail)
    except PermissionError as exc:  # the node's files, read by another user
        from app.doctor import permission_denied

        return _said(permission_denied(exc))
    return 0


def _said(*lines: str) -> int:
    # In red at a terminal, as typer's `secho` says them; plain for a log.
    red, plain = ("\x1b[31m", "\x1b[0m") if sys.stderr.isatty() else ("", "")
    sys.stderr.write("".join(f"{red}error: {line}{plain}\n" for line in lines))
    return 1


def main() -> None:
    run = quick_command(sys.argv[1:])
    if run is None:
        from app.cli import main as full

        full()
        return
    sys.exit(run_node_process(run))

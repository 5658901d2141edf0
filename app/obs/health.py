"""Readiness: may a load balancer send this process traffic? Each check says why not."""

from __future__ import annotations

import threading

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from app.migrate import alembic_config
from app.node import Node

OK = "ok"


def expected_heads(database_url: str) -> frozenset[str]:
    """The migrations this code was shipped with (read from disk once, at start-up)."""
    return frozenset(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())


def readiness(
    node: Node, *, heads: frozenset[str], worker: threading.Thread | None
) -> dict[str, str]:
    """Every check, `ok` or `failing: <why>`: database, migrations, keys, delivery worker."""
    checks: dict[str, str] = {}
    try:
        with node.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            current = frozenset(MigrationContext.configure(connection).get_current_heads())
        checks["database"] = OK
        if current == heads:
            checks["migrations"] = OK
        else:
            at = ", ".join(sorted(current)) or "no schema"
            checks["migrations"] = (
                f"failing: database at {at}, code expects {', '.join(sorted(heads))}; "
                "run `entraide migrate`"
            )
    except Exception as exc:  # any driver failure means "not ready", never a 500
        checks["database"] = f"failing: unreachable ({type(exc).__name__})"
        checks["migrations"] = "failing: unknown, the database is unreachable"
    # Keys are loaded before the server accepts connections; a node without them never
    # starts. The check is listed so an operator sees it was made.
    checks["keys"] = OK if getattr(node, "keys", None) is not None else "failing: not loaded"
    if node.settings.run_worker:
        alive = worker is not None and worker.is_alive()
        checks["worker"] = OK if alive else "failing: the delivery worker thread is not running"
    return checks

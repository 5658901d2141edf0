"""Readiness: may a load balancer send this process traffic? Each check says why not.

The schema check reads the migration files' `revision` and `down_revision` lines and the
database's `alembic_version` table directly, without Alembic: importing Alembic (its script
directory, its runtime and every dialect's DDL module) costs a running node about 8 MiB and
a quarter of a second at each start, for two lookups. Migrating still goes through Alembic
(app.migrate); tests/ops/test_footprint.py checks that both agree on the heads.
"""

from __future__ import annotations

import ast
import re
import threading
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text

from app.crypto.encoding import format_time
from app.crypto.keyring import KeyRingState
from app.db import durability_failure
from app.evidence.blobstore import blob_root
from app.node import Node
from app.obs.storage import DATABASE, EVIDENCE, StorageFull

OK = "ok"

VERSIONS = Path(__file__).resolve().parents[2] / "migrations" / "versions"
VERSION_TABLE = "alembic_version"  # Alembic's default; migrations/env.py keeps it
_ASSIGNMENT = re.compile(r"^(revision|down_revision)\b[^=\n]*=\s*(.+?)\s*$", re.MULTILINE)


def _revisions(source: str) -> tuple[str, tuple[str, ...]]:
    """A migration file's own revision and the revisions it follows (several for a merge)."""
    found: dict[str, object] = {}
    for name, value in _ASSIGNMENT.findall(source):
        found.setdefault(name, ast.literal_eval(value))
    revision, down = found.get("revision"), found.get("down_revision")
    if not isinstance(revision, str):
        raise ValueError("no `revision = '...'` line")
    if down is None:
        return revision, ()
    if isinstance(down, str):
        return revision, (down,)
    if isinstance(down, tuple | list):
        return revision, tuple(str(item) for item in down)
    raise ValueError(f"an unexpected down_revision: {down!r}")


@lru_cache(maxsize=1)
def expected_heads() -> frozenset[str]:
    """The migrations this code was shipped with: those no other migration follows."""
    revisions, followed = _migrations()
    return frozenset(revisions - followed)


def unknown_revisions(current: frozenset[str]) -> frozenset[str]:
    """Revisions the database is at that this code does not know: a newer version of the
    node migrated it (this one cannot, and must not, migrate it back)."""
    return frozenset(current - _migrations()[0])


def _migrations() -> tuple[set[str], set[str]]:
    """Every revision shipped, and every revision another follows."""
    revisions: set[str] = set()
    followed: set[str] = set()
    for path in sorted(VERSIONS.glob("*.py")):
        try:
            revision, downs = _revisions(path.read_text(encoding="utf-8"))
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"cannot read the migration {path.name}: {exc}") from exc
        revisions.add(revision)
        followed.update(downs)
    return revisions, followed


def current_heads(connection: Connection) -> frozenset[str]:
    """The revisions the database is at; empty when it has no schema yet."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return frozenset()
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))  # noqa: S608
    return frozenset(str(value) for value in rows.scalars())


def schema_pending(engine: Engine) -> bool:
    """True when the database is not at the latest migration."""
    with engine.connect() as connection:
        return current_heads(connection) != expected_heads()


def _database_checks(node: Node, heads: frozenset[str]) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with node.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            current = current_heads(connection)
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
    return checks


# Failing checks that leave the process in service (200, `"status": "degraded"`): a node
# whose reload of rotated keys failed still serves consistently with the keys it had, as it
# would have before the rotation; taking it out would stop every exchange (on every replica
# sharing the keys folder and its configuration) for what only delays the rotation. Likewise
# evidence storage found full: requests, messages and receipts (in the database) still flow,
# and only evidence waits (uploads and peers' parts resume from their offsets); out of
# service, every replica sharing that volume would stop every exchange. Not an evidence
# folder gone (`evidence_folder`): one replica's mount failed, until it is restarted, and the
# others can take its evidence (from review).
DEGRADING = frozenset({"keys_reload", "evidence"})


def keys_reload_check(state: KeyRingState) -> str:
    failure = state.failure
    if failure is None:
        return OK
    keys = state.generation.keys
    rotation = "a rotation" if failure.rotation is None else f"rotation {failure.rotation}"
    return (
        f"failing: the keys folder changed ({rotation}) but this process could not load it "
        f"since {format_time(failure.since)} (last try {format_time(failure.at)}): "
        f"{failure.reason}; it still signs with and publishes signing key {keys.signing_kid} "
        f"(rotation {len(keys.rotations)}) (docs/operations.md §3)"
    )


def _evidence_folder_check(node: Node) -> str:
    """The evidence folder's two subfolders, made as the node starts: removed since (a
    volume unmounted, a folder deleted), every upload failed `503 storage_unavailable` and
    every transfer of evidence for good, while /readyz said ready (from review). They are
    not made again here: an unmounted volume's mount point would take the evidence."""
    root = blob_root(node.settings.blob_dir, node.settings.keys_dir)
    try:
        missing = [name for name in ("blobs", "uploads") if not (root / name).is_dir()]
    except OSError as exc:  # not searchable by the node's user: said, not a 500 (from review)
        return f"failing: the evidence folder {root} cannot be read ({exc.strerror})"
    if not missing:
        return OK
    return (
        f"failing: the evidence folder {root} lacks {' and '.join(missing)} (a volume not "
        "mounted, a folder removed?): evidence can be neither received nor sent; put it "
        "back, then restart the node"
    )


def readiness(
    node: Node,
    *,
    heads: frozenset[str],
    worker: threading.Thread | None,
    storage_full: StorageFull | None = None,
) -> dict[str, str]:
    """Every check, `ok` or `failing: <why>`: database, migrations, storage (the
    database's), evidence (its storage found full), evidence_folder, keys, the reload of
    rotated keys, delivery worker."""
    checks: dict[str, str] = {}
    lost = durability_failure(node.engine)
    if lost is not None:  # no transaction starts any more: say why, not "unreachable"
        checks["database"] = f"failing: {lost}"
        checks["migrations"] = "failing: unknown, the database takes no transaction"
    else:
        checks.update(_database_checks(node, heads))
    if storage_full is not None:
        checks["storage"] = storage_full.check(DATABASE)
        checks["evidence"] = storage_full.check(EVIDENCE)
        checks["evidence_folder"] = _evidence_folder_check(node)
    # Keys are loaded before the server accepts connections; a node without them never
    # starts. Read without loading them again: a reload may be waiting for a rotation.
    state = node.keyring.state()
    checks["keys"] = OK
    checks["keys_reload"] = keys_reload_check(state)
    if node.settings.run_worker:
        alive = worker is not None and worker.is_alive()
        checks["worker"] = OK if alive else "failing: the delivery worker thread is not running"
    return checks

"""Running Alembic from the node's own commands."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def older_than(url: str, revisions: Sequence[str], revision: str) -> bool:
    """True when every one of `revisions` comes before `revision` (an ancestor, not itself);
    False for one this code does not know (a newer version's)."""
    script = ScriptDirectory.from_config(alembic_config(url))
    earlier = {each.revision for each in script.iterate_revisions(revision, "base")}
    earlier.discard(revision)
    return bool(revisions) and all(each in earlier for each in revisions)


def pending(engine: Engine, url: str) -> bool:
    """True when the database is not at the latest migration."""
    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current != heads

"""What keeps a node small and its commands quick: the schema check without Alembic, settings
without pydantic-settings, commands that import only what they use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError

from app.config import Settings
from app.db import make_engine
from app.migrate import ROOT, alembic_config, upgrade
from app.obs.health import _revisions, current_heads, expected_heads, schema_pending
from tests.conftest import Databases


def test_expected_heads_are_alembics() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert expected_heads() == frozenset(script.get_heads())


def test_revisions_read_from_a_migration_file() -> None:
    plain = 'revision: str = "b"\ndown_revision: str | None = "a"\n'
    assert _revisions(plain) == ("b", ("a",))
    assert _revisions("revision = 'a'\ndown_revision = None\n") == ("a", ())
    merge = 'revision = "m"\ndown_revision = ("b", "c")\n'
    assert _revisions(merge) == ("m", ("b", "c"))
    with pytest.raises(ValueError, match="revision"):
        _revisions("down_revision = None\n")


def test_current_heads_agree_with_alembic(databases: Databases) -> None:
    url = databases.new("heads")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert current_heads(connection) == frozenset()
        assert schema_pending(engine)
        upgrade(url)
        with engine.connect() as connection:
            alembic = frozenset(MigrationContext.configure(connection).get_current_heads())
            assert current_heads(connection) == alembic == expected_heads()
        assert not schema_pending(engine)
    finally:
        engine.dispose()


def _env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ENTRAIDE_")}
    return {**env, **values}


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("ENTRAIDE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ENTRAIDE_WORKER_POLL_SECONDS", "0.25")
    monkeypatch.setenv("entraide_allow_insecure_http", "true")  # any case, as before
    monkeypatch.setenv("ENTRAIDE_KEYS_DIR", "/from/env")
    monkeypatch.setenv("ENTRAIDE_KEY_PASSPHRASE", "correct horse")
    monkeypatch.setenv("ENTRAIDE_NOT_A_SETTING", "ignored")
    monkeypatch.setenv(
        "ENTRAIDE_TIME_LIMIT_OVERRIDES", json.dumps({"legal_basis:EU_EIO": {"decide": 30}})
    )
    settings = Settings(keys_dir="/given")  # type: ignore[arg-type]  # validated to a Path
    assert settings.worker_poll_seconds == 0.25
    assert settings.allow_insecure_http is True
    assert str(settings.keys_dir) == "/given"  # what the caller gives wins
    assert settings.key_passphrase is not None
    assert settings.key_passphrase.get_secret_value() == "correct horse"
    assert set(settings.time_limit_overrides) == {"legal_basis:EU_EIO"}
    assert settings.time_limit_overrides["legal_basis:EU_EIO"].decide == 30
    assert Settings().time_limits == Settings.model_fields["time_limits"].default


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("ENTRAIDE_TIME_LIMIT_OVERRIDES", "{not json", "time_limit_overrides"),
        ("ENTRAIDE_TIME_LIMITS", "[1, 2]", "time_limits"),
        ("ENTRAIDE_LOG_LEVEL", "LOUD", "log_level"),
        ("ENTRAIDE_MAX_EVIDENCE_ATTACHMENTS", "0", "max_evidence_attachments"),
        # Past what receivers accept (30 days), and past what receipts may be off (from review).
        ("ENTRAIDE_ENVELOPE_TTL_SECONDS", str(31 * 24 * 3600), "envelope_ttl_seconds"),
        ("ENTRAIDE_CLOCK_SKEW_SECONDS", "86401", "clock_skew_seconds"),
    ],
)
def test_bad_settings_name_their_field(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert [error["loc"][0] for error in caught.value.errors()] == [field]


HEAVY = ("fastapi", "uvicorn", "alembic", "httpx", "rich", "pydantic_settings")


def _imported_by(env: dict[str, str], *commands: str) -> list[str]:
    """Heavy packages imported by `entraide COMMAND...`, run in one process, each succeeding."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from app.cli import app\n"
        f"for args in {[command.split() for command in commands]!r}:\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        f"print('imported:', *sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("imported:"), result.stdout[-2000:]
    return last.split()[1:]


def test_operator_commands_import_only_what_they_use(tmp_path: Path) -> None:
    env = _env(
        ENTRAIDE_DATABASE_URL=f"sqlite:///{tmp_path / 'node.db'}",
        ENTRAIDE_KEYS_DIR=str(tmp_path / "keys"),
    )
    init = [sys.executable, "-m", "app", "init", "--authority-id", "ES/MJ", "--name", "x"]
    subprocess.run([*init, "--public-url", "https://es.example"], env=env, check=True, timeout=120)
    commands = ["clients create someone", "clients list", "keys show", "audit verify --db"]
    assert _imported_by(env, *commands) == []


def test_the_requests_commands_load_when_asked() -> None:
    env = _env(ENTRAIDE_DATABASE_URL="sqlite://", ENTRAIDE_KEYS_DIR="/nonexistent")
    assert "httpx" in _imported_by(env, "requests --help")


def test_a_node_process_does_without_what_it_never_uses(tmp_path: Path) -> None:
    """What `entraide serve` imports: the whole application, but not Alembic, rich,
    pydantic.v1 or pydantic-settings; and the application still builds its schema."""
    probe = (
        "import sys\n"
        "from app import nodeproc\n"
        "nodeproc.skip_unused_imports()\n"
        "import httpx, uvicorn\n"
        "from app.config import Settings\n"
        "from app.main import create_app\n"
        "from app.tls import server_options\n"
        f"app = create_app(Settings(database_url='sqlite:///{tmp_path / 'n.db'}'))\n"
        "assert app.openapi()['paths']\n"
        "unused = ('alembic', 'rich', 'pygments', 'pydantic.v1', 'pydantic_settings')\n"
        "print('imported:', *sorted(n for n in unused if sys.modules.get(n) is not None))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "imported:"


def test_a_peers_default_worker_fits_in_a_receivers_default_body_budget() -> None:
    """From review: with a budget of four bodies, half per source, a peer's worker posting
    four large envelopes at once (its default concurrency) had its third refused half way."""
    from app.config import buffered_body_budget

    settings = Settings()
    total, per_source = buffered_body_budget(settings)
    assert per_source >= settings.worker_concurrency * settings.max_body_bytes
    assert total == 2 * per_source  # two sources fill it, never one

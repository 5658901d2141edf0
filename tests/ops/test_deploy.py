"""The container deployment: docker-compose.yml and the Dockerfile.

No Docker engine runs here, so the compose file is checked three ways: against the Compose
Specification's JSON schema (vendored in tests/data with its licence), every `entraide`
command it runs against the real CLI's parser, and, end to end, its services run in their
start-up order as real processes on loopback (volumes as folders, service names as ports,
the test PostgreSQL as its `postgres`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml

from app.cli import app as cli_app
from app.localnodes import free_port
from app.migrate import ROOT
from tests.conftest import make_databases

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
SHELL_STOPS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def compose_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [
        f"{'/'.join(map(str, error.path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    assert compose_errors(compose()) == []


def test_every_node_with_read_only_keys_records_its_signed_log_where_it_can_write() -> None:
    """Without a writable record of what the log key signed, a database writer could roll
    the audit log back unseen (docs/audit.md §4): the keys are mounted read-only here."""
    document = compose()
    checked = []
    for name, service in document["services"].items():
        mounts = [mount.split(":") for mount in service.get("volumes", [])]
        environment = service.get("environment", {})
        keys = environment.get("ENTRAIDE_KEYS_DIR")
        if keys is None or not any(m[1] == keys and m[2:] == ["ro"] for m in mounts):
            continue
        record = environment.get("ENTRAIDE_SIGNED_LOG_FILE")
        assert record is not None, name
        writable = [m[1] for m in mounts if m[2:] != ["ro"] and record.startswith(m[1] + "/")]
        assert writable, f"{name}: {record} is not in a writable volume"
        checked.append(name)
    assert {"es", "es-worker", "ar"} <= set(checked)


def test_a_nodes_processes_share_one_evidence_store_on_a_volume() -> None:
    """`es` takes uploads, `es-worker` sends them: the same store, on a volume (a folder of
    the container would be each process's own, and gone with the container)."""
    document = compose()
    stores: dict[str, str] = {}
    for name in ("es", "es-worker", "ar"):
        service = document["services"][name]
        blob_dir = (
            service["environment"].get("ENTRAIDE_BLOB_DIR")
            if isinstance(service["environment"], dict)
            else None
        )
        assert blob_dir, name
        volumes = [m.split(":") for m in service.get("volumes", [])]
        under = [
            v for v, target, *mode in volumes if blob_dir.startswith(target) and mode != ["ro"]
        ]
        assert under, f"{name}: {blob_dir} is not on a writable volume"
        stores[name] = under[0]
    assert stores["es"] == stores["es-worker"]


def test_the_schema_check_catches_mistakes() -> None:
    for mutate in (
        lambda d: d["services"]["es"].update(comand=["entraide", "serve"]),
        lambda d: d["services"]["es"]["depends_on"]["es-init"].update(condition="done"),
        lambda d: d["services"]["es"].update(ports="8601:8600"),
    ):
        document = copy.deepcopy(compose())
        mutate(document)
        assert compose_errors(document), "the schema accepted a broken compose file"


def _scripts(command: list[str] | str) -> Iterator[list[str]]:
    """Each command line a service runs: the list itself, or each line of an `sh -c` script."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:1] == ["sh"] and any(flag.startswith("-") and "c" in flag for flag in command):
        for line in command[-1].replace("$$", "$").splitlines():
            if line.strip():
                yield shlex.split(line)
    else:
        yield command


def entraide_invocations(document: dict[str, Any]) -> list[tuple[str, list[str]]]:
    found = []
    for name, service in document["services"].items():
        for command in (service.get("entrypoint"), service.get("command")):
            if not command:
                continue
            for words in _scripts(command):
                for start in (i for i, word in enumerate(words) if word == "entraide"):
                    args = []
                    for word in words[start + 1 :]:
                        if word in SHELL_STOPS or word.startswith((">", "2>")):
                            break
                        args.append(word)
                    found.append((name, args))
    return found


def is_usage_error(exc: BaseException) -> bool:
    # typer may bundle its own copy of click: recognise its UsageError by name.
    return any(cls.__name__ == "UsageError" for cls in type(exc).__mro__)


def check_cli_arguments(args: list[str]) -> None:
    """Parse `entraide ARGS` with the real CLI's parser, without running anything."""
    command: Any = typer.main.get_command(cli_app)
    words = list(args)
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        assert sub is not None, f"`entraide {' '.join(args)}`: no command {words[0]!r}"
        command, words = sub, words[1:]
    assert not hasattr(command, "commands"), f"`entraide {' '.join(args)}` is incomplete"
    command.make_context(f"entraide {' '.join(args)}", words)


def cli_error(args: list[str]) -> str | None:
    """Why `entraide ARGS` would be refused before running, or None if it parses."""
    try:
        check_cli_arguments(args)
    except AssertionError as exc:
        return str(exc)
    except Exception as exc:
        if not is_usage_error(exc):
            raise
        return str(exc)
    return None


def test_every_entraide_command_in_compose_exists_in_the_cli() -> None:
    invocations = entraide_invocations(compose())
    commands = {" ".join(args[:2]) for _, args in invocations}
    # The services must at least initialise, migrate, serve, run a worker, pin and show keys.
    for expected in ("init --authority-id", "migrate", "serve --host", "worker", "peers add"):
        assert any(command.startswith(expected) for command in commands), expected
    for service, args in invocations:
        assert cli_error(args) is None, f"{service}: `entraide {' '.join(args)}`"


@pytest.mark.parametrize(
    "bad",
    [
        ["peers", "pin", "https://peer.example"],
        ["serve", "--listen", "127.0.0.1"],
        ["serve", "--port", "eighty"],
        ["keys"],
        ["init", "--name", "x"],
    ],
)
def test_the_cli_check_catches_unknown_commands_and_options(bad: list[str]) -> None:
    assert cli_error(bad) is not None


def test_compose_migration_step_is_alembic_upgrade_head_next_to_alembic_ini() -> None:
    services = compose()["services"]
    assert services["es-migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert "COPY alembic.ini ./" in DOCKERFILE.read_text()
    assert (ROOT / "alembic.ini").is_file()


def test_dockerfile_copies_only_files_that_exist_and_runs_real_commands() -> None:
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _target = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for line in copies:
        for source in line.split()[:-1]:
            assert f"{source}/" not in ignored, f"{source} is copied but .dockerignore drops it"
    (cmd,) = re.findall(r"^CMD\s+(\[.+\])$", text, flags=re.MULTILINE)
    words = json.loads(cmd)
    assert words[0] == "entraide"
    check_cli_arguments(words[1:])
    for script in re.findall(r"deploy/[\w.]+", text + COMPOSE.read_text()):
        assert (ROOT / script).is_file(), script


# --- running the compose file's services on loopback ---------------------------------------


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set, and `$$` (a literal `$`)."""
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return value.replace("$$", "$")


def _order(services: dict[str, Any]) -> list[str]:
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for dependency in services[name].get("depends_on", {}):
            visit(dependency)
        done.append(name)

    for name in services:
        visit(name)
    return done


class Emulator:
    """Runs the compose services as processes: the parts of `docker compose up` we can."""

    def __init__(self, tmp_path: Path, pg_url: str) -> None:
        self.document = compose()
        self.tmp = tmp_path
        self.pg_url = pg_url
        self.ports = {"es": free_port(), "ar": free_port()}
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.outputs: dict[str, str] = {}

    def _translate(self, name: str, value: str) -> str:
        value = _interpolate(value)
        if "@postgres:" in value:
            return self.pg_url
        for service, port in self.ports.items():
            value = value.replace(f"http://{service}:8600", f"http://127.0.0.1:{port}")
        if name in self.ports:
            value = value.replace("127.0.0.1:8600", f"127.0.0.1:{self.ports[name]}")
        for mount in self.document["services"][name].get("volumes", []):
            volume, target = mount.split(":")[:2]
            folder = self.tmp / "volumes" / volume
            if not folder.exists():
                folder.mkdir(parents=True, mode=0o700)
            value = value.replace(target, str(folder))
        return value

    def env(self, name: str) -> dict[str, str]:
        environment = self.document["services"][name].get("environment", {})
        env = {key: value for key, value in os.environ.items() if not key.startswith("ENTRAIDE_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["ENTRAIDE_WORKER_POLL_SECONDS"] = "0.2"
        env.update({key: self._translate(name, str(value)) for key, value in environment.items()})
        return env

    def argv(self, name: str, words: list[str]) -> list[str]:
        argv = [self._translate(name, word) if "$" not in word else word for word in words]
        if argv[:2] == ["entraide", "serve"]:
            argv[argv.index("--host") + 1] = "127.0.0.1"
            argv[argv.index("--port") + 1] = str(self.ports[name])
        if argv[:1] == ["sh"]:
            argv[-1] = self._translate(name, argv[-1])
        return argv

    def healthy(self, name: str) -> bool:
        test = self.document["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = self.argv(name, test[1:])
        return subprocess.run(argv, cwd=ROOT, env=self.env(name), check=False).returncode == 0

    def wait_healthy(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.running[name]
            assert process.poll() is None, f"{name} exited: {self.log(name)}"
            if self.healthy(name):
                return
            time.sleep(0.3)
        pytest.fail(f"{name} never became healthy: {self.log(name)}")

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else self.outputs.get(name, "")

    def up(self) -> None:
        services = self.document["services"]
        for name in _order(services):
            if name == "postgres":
                continue  # the test's own PostgreSQL stands in for it
            for dependency, rule in services[name].get("depends_on", {}).items():
                if rule["condition"] == "service_healthy" and dependency != "postgres":
                    self.wait_healthy(dependency)
            argv = self.argv(name, services[name]["command"])
            if argv[:2] in (["entraide", "serve"], ["entraide", "worker"]):
                with (self.tmp / f"{name}.log").open("wb") as log:
                    self.running[name] = subprocess.Popen(
                        argv, cwd=ROOT, env=self.env(name), stdout=log, stderr=subprocess.STDOUT
                    )
                continue
            result = subprocess.run(
                argv,
                cwd=ROOT,
                env=self.env(name),
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            self.outputs[name] = result.stdout + result.stderr
            assert result.returncode == 0, f"{name} failed: {self.outputs[name][-3000:]}"

    def down(self) -> None:
        for process in self.running.values():
            process.terminate()
        for process in self.running.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.e2e
def test_compose_services_run_in_order_and_exchange_a_request(tmp_path: Path) -> None:
    databases = make_databases("postgresql", tmp_path)
    emulator = Emulator(tmp_path, databases.new("compose-es"))
    try:
        emulator.up()
        exchange = emulator.outputs["exchange"]
        assert "the exchange works" in exchange, exchange
        assert "delivered: AR/MPF signed the receipt" in exchange
        # The worker container, not ES/MJ's `serve` (ENTRAIDE_RUN_WORKER=false), delivered it.
        assert "delivery worker" in emulator.log("es-worker")
        assert "delivery worker" not in emulator.log("es")
        # What each log key signed is recorded in a writable volume, not the keys.
        for volume in ("es-state", "ar-data"):
            assert (tmp_path / "volumes" / volume / "log-signed.json").is_file(), volume
        # Fingerprints went through the shared volume, as an operator reads them out.
        shared = tmp_path / "volumes" / "shared"
        for side in ("es", "ar"):
            assert re.fullmatch(
                r"([0-9A-F]{4} ){15}[0-9A-F]{4}\n", (shared / f"{side}.fingerprint").read_text()
            )
    finally:
        emulator.down()
        databases.drop_all()

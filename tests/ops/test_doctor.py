"""`entraide doctor` names each problem of a broken node in plain words; a healthy one passes."""

from __future__ import annotations

import os
import shutil
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from app.audit.mac import append_with
from app.config import Settings
from app.crypto.identity import build_identity_document
from app.crypto.keys import RESTORE_STAGING_PREFIX, NodeIdentity, NodeKeys
from app.db import make_engine
from app.doctor import (
    FAIL,
    OK,
    WARN,
    _check_peer,
    check_keys,
    check_writable,
    clock_verdict,
    redacted_url,
    skew_from_date_header,
)
from app.localnodes import LocalNode
from app.migrate import alembic_config
from app.peers.client import IDENTITY_PATH
from tests.conftest import _admin_execute, make_databases, migrated_sqlite, require_postgres
from tests.ops.nodes import serving


def _previous_revision(url: str) -> str:
    scripts = ScriptDirectory.from_config(alembic_config(url))
    (head,) = scripts.get_heads()
    previous = scripts.get_revision(head).down_revision
    assert isinstance(previous, str)
    return previous


@pytest.mark.e2e
def test_doctor_names_each_problem_then_passes_once_they_are_fixed(tmp_path: Path) -> None:
    databases = make_databases("sqlite", tmp_path)
    # ES/MJ's schema is taken back a migration below: its own `init` migrates it.
    es = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", databases.new("es"))
    ar_db = databases.new("ar", migrated=True)
    ar = LocalNode("AR/MPF", "Ministerio Publico Fiscal", tmp_path / "ar", ar_db)
    try:
        es.init()
        ar.init()
        ar.start()
        es.cli("peers", "add", ar.url, "--fingerprint", ar.fingerprint)
        healthy = es.cli("doctor", check=False)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "No problem found." in healthy.stdout
        assert f"reachable at {ar.url}, keys current" in healthy.stdout
        # What was checked and found well is said too: an operator saw no line of the clock
        # or the free space the documentation says doctor checks (from a walkthrough).
        assert "clock vs AR/MPF" in healthy.stdout
        assert "s of ours" in healthy.stdout
        assert "the database volume (" in healthy.stdout

        # Break three things, as they break in real life.
        ar.stop()  # the peer is down
        (es.keys_dir / "signing.key").chmod(0o644)  # someone copied the keys carelessly
        previous = _previous_revision(es.database_url)
        command.downgrade(alembic_config(es.database_url), previous)  # code upgraded, DB not

        broken = es.cli("doctor", check=False)
        report = broken.stdout
        assert broken.returncode == 1, report
        problems = [line for line in report.splitlines() if line.startswith(FAIL)]
        assert len(problems) == 3, report
        assert f"chmod 600 {es.keys_dir / 'signing.key'}" in report
        assert "can be read or changed by other users (mode 0644)" in report
        assert f"unreachable at {ar.url}" in report
        assert f"migrations pending: the database is at {previous}" in report
        assert "run `entraide migrate`" in report
        assert "3 problem(s) found." in report

        # Fixed with the commands it gave: passes again.
        (es.keys_dir / "signing.key").chmod(0o600)
        migrated = es.cli("migrate").stdout
        assert f"database migrated: {previous} -> " in migrated  # says what it did
        assert "database schema is current (" in es.cli("migrate").stdout
        ar.start()
        again = es.cli("doctor", check=False)
        assert again.returncode == 0, again.stdout
    finally:
        ar.stop()


def test_doctor_explains_invalid_settings_and_missing_keys(tmp_path: Path) -> None:
    node = LocalNode(
        "ES/MJ",
        "x",
        tmp_path / "none",
        f"sqlite:///{tmp_path / 'none.db'}",
        extra_env={"ENTRAIDE_LOG_FORMAT": "yaml"},
    )
    invalid = node.cli("doctor", check=False)
    assert invalid.returncode == 1
    assert "ENTRAIDE_LOG_FORMAT" in invalid.stdout
    node.extra_env.clear()
    missing = node.cli("doctor", check=False)
    assert missing.returncode == 1
    assert "run `entraide init`" in missing.stdout
    assert "the database has no schema: run `entraide migrate`" in missing.stdout
    # A node whose peers would be told to use plain HTTP: refused, and not "valid" beside it.
    node.init()
    node.extra_env["ENTRAIDE_ALLOW_INSECURE_HTTP"] = "false"
    plain = node.cli("doctor", check=False)
    assert plain.returncode == 1
    assert "is plain HTTP: peers need HTTPS" in plain.stdout
    assert "settings are valid" not in plain.stdout
    # A key file gone: the fix is named, as for every other problem.
    node.extra_env.clear()
    (node.keys_dir / "log.key").unlink()
    lost = node.cli("doctor", check=False)
    assert "the log key" in lost.stdout
    assert "`entraide restore`" in lost.stdout


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://entraide:S3cretPW@db.example/entraide", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://entraide:S3cretPW@db/x", "unsupported database"),
        ("/var/lib/entraide/entraide.db", "must be a URL"),
        # As a DBA hands it out: taken for psycopg, then found unreachable.
        ("postgres://entraide:S3cretPW@127.0.0.1:1/entraide", "cannot reach postgresql+psycopg"),
    ],
)
def test_commands_explain_a_bad_database_url_without_its_password(
    tmp_path: Path, url: str, says: str
) -> None:
    """Each command said it with a driver's traceback (a missing psycopg2, SQLAlchemy's
    NoSuchModuleError, a refused connection); `init` had written the keys first, so running
    it again, once the URL was fixed, refused to overwrite them."""
    node = LocalNode("ES/MJ", "x", tmp_path / "es", url)
    for args in (
        ["migrate"],
        ["init", "--authority-id", "ES/MJ", "--name", "x", "--public-url", "https://es.example"],
    ):
        result = node.cli(*args, check=False)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert says in output, output
        assert "Traceback" not in output
        assert "S3cretPW" not in output
    assert not node.keys_dir.exists()


@pytest.mark.parametrize(
    ("skew", "verdict"),
    [(0, OK), (30, OK), (-74, OK), (76, WARN), (-200, WARN), (301, FAIL), (-3600, FAIL)],
)
def test_clock_verdict(skew: float, verdict: str) -> None:
    assert clock_verdict(skew, 300) == verdict


def test_skew_is_read_from_the_peers_date_header() -> None:
    sent = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
    received = sent + timedelta(seconds=2)
    ahead = format_datetime(sent + timedelta(seconds=601), usegmt=True)
    assert skew_from_date_header(ahead, sent, received) == 600.0
    behind = format_datetime(sent - timedelta(hours=1), usegmt=True)
    assert skew_from_date_header(behind, sent, received) == -3601.0
    with pytest.raises(ValueError, match="no Date header"):
        skew_from_date_header(None, sent, received)


@pytest.mark.parametrize(
    ("lease", "warned"), [(120, True), (134, True), (135, False), (300, False)]
)
def test_doctor_warns_of_a_lease_the_worker_must_renew_before_every_post(
    lease: int, warned: bool
) -> None:
    from app.config import Settings
    from app.doctor import check_configuration

    findings = check_configuration(Settings(lease_seconds=lease, peer_timeout_seconds=30))
    said = [f.message for f in findings if "ENTRAIDE_LEASE_SECONDS" in f.message]
    assert bool(said) is warned


@pytest.mark.parametrize("public", [True, False])
def test_doctor_warns_of_metrics_served_without_a_token(public: bool) -> None:
    from app.config import Settings
    from app.doctor import WARN, check_configuration

    findings = check_configuration(Settings(metrics_public=public))
    said = [f for f in findings if "ENTRAIDE_METRICS_PUBLIC" in f.message]
    assert [f.level for f in said] == ([WARN] if public else [])


def test_doctor_warns_of_entries_left_unsigned_long_after_checkpoints_were_due(
    tmp_path: Path,
) -> None:
    from sqlalchemy import update

    from app.audit.checkpoints import sign_checkpoint
    from app.audit.log import record
    from app.config import Settings
    from app.crypto.keys import NodeIdentity, NodeKeys, save_identity, save_keys
    from app.db import make_engine, make_session_factory, unit_of_work
    from app.doctor import check_checkpoints
    from app.models import AuditCheckpoint

    url = make_databases("sqlite", tmp_path).new("log", migrated=True)
    engine = make_engine(url)
    keys = NodeKeys.generate()  # the doctor reads the checkpoints' notes with the log key
    save_keys(tmp_path / "keys", keys)
    save_identity(tmp_path / "keys", NodeIdentity("ES/MJ", "Ministerio", "http://127.0.0.1:1"))
    settings = Settings(database_url=url, keys_dir=tmp_path / "keys")
    try:
        sessions = append_with(make_session_factory(engine), keys.log)
        with unit_of_work(sessions) as session:
            record(session, actor="node", action="test.event")
            sign_checkpoint(session, authority_id="ES/MJ", log_key=keys.log)
        assert list(check_checkpoints(settings, engine)) == []  # everything signed
        with unit_of_work(sessions) as session:
            record(session, actor="node", action="test.unsigned")
        assert list(check_checkpoints(settings, engine)) == []  # a checkpoint is not due yet
        with unit_of_work(sessions) as session:
            an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
            session.execute(update(AuditCheckpoint).values(created_at=an_hour_ago))
        (finding,) = check_checkpoints(settings, engine)
        assert finding.level == WARN
        assert "1 audit entries are not covered by a signed checkpoint" in finding.message
    finally:
        engine.dispose()


def test_commands_refuse_a_missing_sqlite_file_and_init_a_used_database(tmp_path: Path) -> None:
    """From an operator's review: a mistyped SQLite path gave `backup` an empty database of
    its own and a backup of nothing that said it succeeded; `init` over a node's database
    (its keys moved aside) left it unable to open its archive or verify its log."""
    node = LocalNode("ES/MJ", "x", tmp_path / "es", migrated_sqlite(tmp_path / "es.db"))
    node.init()
    typo = tmp_path / "es-typo.db"
    mistyped = LocalNode("ES/MJ", "x", tmp_path / "es", f"sqlite:///{typo}")
    for args in (["backup", "--out", str(tmp_path / "b.tar.gz")], ["audit", "verify", "--db"]):
        result = mistyped.cli(*args, check=False)
        assert result.returncode == 1, result.stdout
        assert f"no database at {typo}" in result.stderr
        assert not typo.exists()
    assert not (tmp_path / "b.tar.gz").exists()

    again = LocalNode("ES/MJ", "x", tmp_path / "other", node.database_url)
    result = again.cli(
        "init",
        "--authority-id",
        "ES/MJ",
        "--name",
        "x",
        "--public-url",
        "https://es.example",
        check=False,
    )
    assert result.returncode == 1
    assert "already holds a node's data" in result.stderr
    assert not again.keys_dir.exists()


def test_a_database_of_a_newer_version_is_named_as_such(tmp_path: Path) -> None:
    """From an operator's review: `doctor` said "migrations pending: run `entraide migrate`"
    and `migrate` then crashed with a traceback ("Can't locate revision")."""
    from sqlalchemy import text

    from app.db import make_engine

    node = LocalNode("ES/MJ", "x", tmp_path / "es", migrated_sqlite(tmp_path / "es.db"))
    node.init()
    engine = make_engine(node.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'"))
    finally:
        engine.dispose()
    for args in (("doctor",), ("migrate",), ("peers", "list")):
        result = node.cli(*args, check=False)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "migrated by a newer version of Entraide (revision f0f0f0f0f0f0" in output
        assert "Traceback" not in output


def test_doctor_fails_keys_stored_plain_on_a_node_with_a_passphrase(tmp_path: Path) -> None:
    """From review: plain key files load on a node whose operator set a passphrase (a keys
    backup from before `keys protect`, put back), and nothing said so."""
    url = migrated_sqlite(tmp_path / "es.db")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", url)
    node.init()
    node.extra_env["ENTRAIDE_KEY_PASSPHRASE"] = "a key passphrase, long enough"
    report = node.cli("doctor", check=False).stdout
    plain = [line for line in report.splitlines() if "stored in plain form" in line]
    assert len(plain) == 3, report
    assert all(line.startswith(FAIL) for line in plain)
    assert "run `entraide keys protect`" in plain[0]
    protect = node.cli("keys", "protect", check=False)
    assert protect.returncode == 0, protect.stdout + protect.stderr
    assert "stored in plain form" not in node.cli("doctor", check=False).stdout


def test_a_peer_pinned_at_plain_http_is_not_also_reported_ok(tmp_path: Path) -> None:
    """From an operator's review: the FAIL ("the worker will not deliver there") was followed
    by "ok ... reachable, keys current", which read as cancelling it. The peer here answers as
    a node does (its identity document); only its address is plain HTTP."""
    keys = NodeKeys.generate()
    identity = NodeIdentity("AR/MPF", "Ministerio Publico Fiscal", "http://ar.example")
    document = build_identity_document(identity, keys, issued_at=datetime.now(UTC))

    def peer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == IDENTITY_PATH
        return httpx.Response(
            200, json=document, headers={"date": format_datetime(datetime.now(UTC), usegmt=True)}
        )

    settings = Settings(database_url=f"sqlite:///{tmp_path}/x.db", keys_dir=tmp_path / "keys")
    with httpx.Client(transport=httpx.MockTransport(peer)) as http:
        findings = list(
            _check_peer(
                settings,
                http,
                "AR/MPF",
                "http://ar.example",
                keys.fingerprint,
                keys.encryption_kid,
                keys.log_kid,
            )
        )
    levels = [(f.level, f.message.split(":")[0]) for f in findings if f.area == "peer AR/MPF"]
    assert levels[0] == (FAIL, "pinned at plain-HTTP http")
    assert OK not in [level for level, _ in levels[:2]]
    assert levels[1][0] == WARN
    assert "but not delivered to" in findings[1].message


def test_a_database_missing_on_a_running_server_is_not_called_unreachable(
    tmp_path: Path,
) -> None:
    """From an operator's walk-through: a URL naming a database not created yet sent the
    operator chasing the network ('cannot reach ... is it running?')."""
    require_postgres()
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/entraide_missing_{os.urandom(4).hex()}"
    node = LocalNode("ES/MJ", "x", tmp_path / "es", url)
    result = node.cli("migrate", check=False)
    assert result.returncode == 1
    # Not "then `entraide init`": after a restore refused so, init would fill the database.
    assert "the server has no database of that name: check" in result.stderr, result.stderr
    assert "run the command again" in result.stderr
    assert "Traceback" not in result.stderr
    doctor = node.cli("doctor", check=False)
    assert "the server has no database of that name" in doctor.stdout, doctor.stdout


def test_serve_on_a_port_in_use_says_so_before_starting_anything(tmp_path: Path) -> None:
    """From an operator's walk-through: the only sign was a JSON log line from uvicorn, after
    the delivery worker had started (and could claim deliveries) and the application had
    said 'startup complete'."""
    node = LocalNode("ES/MJ", "x", tmp_path / "es", migrated_sqlite(tmp_path / "es.db"))
    node.init()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = node.cli("serve", "--port", str(port), check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "delivery worker" not in result.stdout + result.stderr


def test_a_password_given_in_the_urls_query_is_hidden_too() -> None:
    """libpq takes `?password=`: it was shown in every message naming the URL (from review)."""
    shown = redacted_url(
        "postgresql+psycopg://entraide:S3cret@db/x?password=S3cret2&sslmode=require"
    )
    assert "S3cret" not in shown
    assert "sslmode=require" in shown


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 here")
def test_serve_on_the_ipv6_any_address_takes_ipv4_too(tmp_path: Path) -> None:
    """`--host ::` listened on IPv4 as well when uvicorn bound it (Linux's default); binding
    the port before the start must not make it IPv6 only (from my own review)."""
    node = LocalNode("ES/MJ", "x", tmp_path / "es", migrated_sqlite(tmp_path / "es.db"))
    node.init()
    with serving(node, "--host", "::"):
        pass  # it answered on 127.0.0.1


def test_doctor_unlocks_passphrase_protected_keys_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each unlock derives a key from the passphrase (Argon2id, a fraction of a second of
    CPU per file): a `doctor` that unlocked the keys for three of its checks took 4 s."""
    import nacl.pwhash.argon2id

    from app.doctor import diagnose

    url = migrated_sqlite(tmp_path / "es.db")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", url)
    node.init()
    passphrase = "a key passphrase, long enough"
    node.extra_env["ENTRAIDE_KEY_PASSPHRASE"] = passphrase
    node.cli("keys", "protect")
    derived: list[int] = []
    kdf = nacl.pwhash.argon2id.kdf

    def counted(*args: object, **kwargs: object) -> bytes:
        derived.append(1)
        return kdf(*args, **kwargs)

    monkeypatch.setattr(nacl.pwhash.argon2id, "kdf", counted)
    settings = Settings(database_url=url, keys_dir=node.keys_dir, key_passphrase=passphrase)
    findings = diagnose(settings)
    assert any(f.area == "keys" and f.message.startswith("keys load") for f in findings)
    assert len(derived) == 3  # the signing, encryption and log keys, each once


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("entraide.example", "is not a URL peers can reach"),
        ("https://", "is not a URL peers can reach"),
        ("https://es.example:port", "is not a URL peers can reach"),
        ("https://es.example/?x=1", "is not a URL peers can reach"),
        ("http://es.example", "is plain HTTP: peers need HTTPS"),
    ],
)
def test_init_takes_only_a_public_url_peers_can_pin(tmp_path: Path, url: str, said: str) -> None:
    """From an operator's review: `init --public-url entraide.example` made a node no peer
    could pin, and `doctor` said "No problem found"; a plain-HTTP URL was taken silently."""
    node = LocalNode("ES/MJ", "x", tmp_path / "es", migrated_sqlite(tmp_path / "es.db"))
    node.extra_env["ENTRAIDE_ALLOW_INSECURE_HTTP"] = "false"
    args = ["init", "--authority-id", "ES/MJ", "--name", "x", "--public-url", url]
    result = node.cli(*args, check=False)
    assert result.returncode == 1
    assert said in result.stderr
    assert not node.keys_dir.exists()


def test_init_in_a_folder_that_does_not_exist_says_so(tmp_path: Path) -> None:
    """From an operator's review: "cannot reach sqlite:///…: is it running?" for a path
    whose folder was not made."""
    missing = tmp_path / "nodir" / "x.db"
    node = LocalNode("ES/MJ", "x", tmp_path / "es", f"sqlite:///{missing}")
    args = ["init", "--authority-id", "ES/MJ", "--name", "x", "--public-url", "https://es.example"]
    result = node.cli(*args, check=False)
    assert result.returncode == 1
    assert f"the folder {missing.parent} of the database does not exist" in result.stderr
    assert not node.keys_dir.exists()


def test_doctor_fails_a_database_that_takes_no_write(tmp_path: Path) -> None:
    """A read-only PostgreSQL database (a standby, default_transaction_read_only): every
    write refused while doctor said "No problem found" (from review)."""
    databases = make_databases("postgresql", tmp_path)
    try:
        url = databases.new("ro", migrated=True)
        name = make_url(url).database
        _admin_execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        settings = Settings(database_url=url, keys_dir=tmp_path / "keys")
        engine = make_engine(url)
        try:
            found = list(check_writable(settings, engine))
        finally:
            engine.dispose()
        assert [(finding.level, finding.area) for finding in found] == [(FAIL, "database")]
        assert "transaction_read_only is on" in found[0].message
    finally:
        databases.drop_all()


def test_doctor_fails_a_volume_without_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the database or the evidence: /readyz failed, doctor said nothing
    (from review). What `shutil.disk_usage` says of the volume is what the check reads."""
    url = migrated_sqlite(tmp_path / "node.db")
    settings = Settings(database_url=url, keys_dir=tmp_path / "keys")
    usage = shutil._ntuple_diskusage  # type: ignore[attr-defined]
    free = {"full": usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20), "tight": usage(100, 97, 3)}
    engine = make_engine(url)
    try:
        monkeypatch.setattr(shutil, "disk_usage", lambda _path: free["full"])
        found = [(f.level, f.area) for f in check_writable(settings, engine)]
        assert found == [(FAIL, "storage"), (FAIL, "storage")]  # database, evidence
        monkeypatch.setattr(shutil, "disk_usage", lambda _path: free["tight"])
        found = [(f.level, f.area) for f in check_writable(settings, engine)]
        assert found == [(FAIL, "storage"), (FAIL, "storage")]  # 3 bytes: under 256 MiB
        monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(2**40, 2**40 - 2**35, 2**35))
        found = [(f.level, f.area) for f in check_writable(settings, engine)]
        assert found == [(WARN, "storage"), (WARN, "storage")]  # 32 GiB of 1 TiB: 97% full
    finally:
        engine.dispose()


def test_doctor_warns_of_keys_a_killed_restore_left_beside_the_keys_folder(
    tmp_path: Path,
) -> None:
    """`restore` unseals a backup's keys into a folder beside the keys folder before moving
    them in; killed meanwhile, it leaves private keys where nobody looks (last notes). Only
    a folder as `tempfile` names it, this user's, no link: in a shared parent (/tmp) anyone
    could name one so that the command shown runs theirs (from review)."""
    settings = Settings(database_url="sqlite://", keys_dir=tmp_path / "keys")
    staged = tmp_path / f"{RESTORE_STAGING_PREFIX}a1b2c3_9"
    (staged / "keys").mkdir(parents=True)
    (staged / "keys" / "signing.key").write_text("{}")
    (tmp_path / f"{RESTORE_STAGING_PREFIX}file0000").write_text("not a restore's folder")
    (tmp_path / f"{RESTORE_STAGING_PREFIX}$(touch pwned)").mkdir()
    (tmp_path / f"{RESTORE_STAGING_PREFIX}linked00").symlink_to(staged)
    warned = [f for f in check_keys(settings) if f.level == WARN]
    assert [finding.message for finding in warned] == [
        f"{staged} holds keys unsealed by a restore that did not finish (killed?): a copy "
        f"of private keys outside the keys folder; once no restore runs, remove it: "
        f"rm -r {staged}"
    ]
    shutil.rmtree(staged)
    assert not [f for f in check_keys(settings) if f.level == WARN]

"""`entraide doctor`: what is wrong with this node, in plain words, and what to do about it.

Every check runs even when an earlier one failed (a broken key does not hide a pending
migration), and each finding says what was found and the command that fixes it. Nothing here
changes the node; peers are only asked for their public identity document.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shlex
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path

import httpx
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from app.audit.anchor import LogRolledBack, Signed, SignedLogAnchor
from app.audit.checkpoints import (
    ANOTHER_NODES_DATABASE,
    checkpoint_dates,
    checkpoint_notes,
    foreign_log,
    latest_signed,
    log_verifier,
    macs_required,
    read_progress,
    readable_note,
    stored_text,
    unsized_checkpoints,
)
from app.audit.log import LogDamaged, read_head
from app.audit.mac import check_macs, mac_key
from app.audit.witnessed import find_damage
from app.config import LEASE_MARGIN_SECONDS, Settings, longest_exchange_seconds
from app.crypto.encoding import utc_now
from app.crypto.identity import IdentityError, parse_identity_document
from app.crypto.keyfile import KeyFileError, stored_plain
from app.crypto.keys import (
    IDENTITY_FILE,
    KEY_FILES,
    RESTORE_STAGING_PREFIX,
    NodeIdentity,
    NodeKeys,
    load_identity,
    load_keys,
    retired_files,
)
from app.db import make_engine, make_session_factory, read_snapshot
from app.delivery import heartbeat
from app.errors import PeerError
from app.evidence.blobstore import blob_root
from app.models import AuditHead, BlobPart, OutboxItem, Peer, WitnessAlarm
from app.node import key_passphrase, load_node
from app.obs.health import current_heads, expected_heads, unknown_revisions
from app.obs.metrics import key_dates
from app.obs.published import Unreadable, difference, node_url, read_published
from app.peers.client import IDENTITY_PATH, make_http_client, read_json_bounded
from app.peers.damage import find_damaged_peers
from app.tls import client_context

OK, WARN, FAIL = "ok", "warn", "FAIL"
KEY_ROTATE_AFTER = timedelta(days=365)
KEY_EXPIRY_WARNING = timedelta(days=30)
STUCK_AFTER = timedelta(hours=1)
PEER_TIMEOUT_SECONDS = 10.0
NEWER_SCHEMA = (
    "the database was migrated by a newer version of Entraide (revision {revisions}, unknown "
    "to this one): run that version, or restore a backup made with this one"
)
# Unsigned audit entries are worth a word once checkpoints are this late (or three times
# ENTRAIDE_AUDIT_CHECKPOINT_SECONDS, if longer).
UNSIGNED_WARNING_SECONDS = 600.0


@dataclass(frozen=True)
class Finding:
    level: str
    area: str
    message: str


def clock_verdict(skew_seconds: float, tolerance_seconds: float) -> str:
    """Past the tolerance, envelopes are refused; past a quarter of it, time to fix NTP."""
    if abs(skew_seconds) > tolerance_seconds:
        return FAIL
    if abs(skew_seconds) > tolerance_seconds / 4:
        return WARN
    return OK


def skew_from_date_header(date_header: str | None, sent: datetime, received: datetime) -> float:
    """The peer's clock minus ours, from its HTTP Date (whole seconds: ±1 s of noise)."""
    if not date_header:
        raise ValueError("no Date header")
    theirs = parsedate_to_datetime(date_header)
    ours = sent + (received - sent) / 2
    return (theirs - ours).total_seconds()


def _mode_problem(path: Path, *, directory: bool = False) -> str | None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        fix = "700" if directory else "600"
        return (
            f"{path} can be read or changed by other users (mode {mode:04o}); "
            f"run: chmod {fix} {path}"
        )
    return None


def _owner_problems(keys_dir: Path, settings: Settings) -> Iterator[str]:
    """Files of the node that its user, the keys folder's owner, may not read: written by
    another user (`restore` or `init` run as root, from review: the keys and the SQLite file
    root's, mode 0600, a node that could not start and a doctor, run as root, that said
    nothing was wrong)."""
    owner = keys_dir.stat().st_uid
    paths = [path for path in keys_dir.rglob("*") if path.is_file() or path.is_dir()]
    database = sqlite_file(settings.database_url)
    if database is not None and database.exists():
        paths += [database, *(database.with_name(database.name + end) for end in ("-wal", "-shm"))]
    others = sorted(str(path) for path in paths if path.exists() and path.stat().st_uid != owner)
    if others:
        yield (
            f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''} not owned by the keys "
            f"folder's owner (uid {owner}), the user the node runs as: it may not read them; "
            f"run: chown -R {_user_name(owner)} {keys_dir}"
            + (f" {database}*" if database is not None else "")
        )


def sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite database URL; None for another database, or no URL."""
    try:
        url = make_url(database_url)
    except Exception:  # reported by check_configuration
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class UnlockedKeys:
    """The node's identity and keys, read and unlocked once for all the checks of a run:
    with a passphrase, each unlock costs a second of CPU or more (three made a `doctor`
    4.3 s). A failure is kept too: check_keys says why, and the others pass over it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: tuple[NodeIdentity, NodeKeys] | Exception | None = None

    def keep(self, identity: NodeIdentity, keys: NodeKeys) -> None:
        self._loaded = (identity, keys)

    def get(self) -> tuple[NodeIdentity, NodeKeys]:
        """Raises what loading them raised."""
        if self._loaded is None:
            keys_dir = self._settings.keys_dir
            try:
                passphrase = key_passphrase(self._settings)
                self._loaded = (load_identity(keys_dir), load_keys(keys_dir, passphrase=passphrase))
            except Exception as exc:  # kept, and raised again to each caller
                self._loaded = exc
        if isinstance(self._loaded, Exception):
            raise self._loaded
        return self._loaded


def check_configuration(settings: Settings) -> Iterator[Finding]:
    findings = list(_configuration_findings(settings))
    yield from findings
    # Not after a FAIL of its own: "valid" beside it would contradict it.
    if not any(finding.level == FAIL for finding in findings):
        yield Finding(OK, "configuration", "settings are valid")


def _configuration_findings(settings: Settings) -> Iterator[Finding]:
    scheme = settings.database_url.split(":", 1)[0]
    if not scheme.startswith(("sqlite", "postgresql")):
        yield Finding(
            FAIL,
            "configuration",
            f"ENTRAIDE_DATABASE_URL uses {scheme!r}: "
            "use sqlite:///FILE or postgresql+psycopg://...",
        )
    public_url = settings.public_url
    try:
        identity = load_identity(settings.keys_dir)
        public_url = public_url or identity.public_url
        if settings.authority_id and settings.authority_id != identity.authority_id:
            yield Finding(
                FAIL,
                "configuration",
                f"ENTRAIDE_AUTHORITY_ID is {settings.authority_id} but the keys belong to "
                f"{identity.authority_id}: fix the variable or point ENTRAIDE_KEYS_DIR elsewhere",
            )
    except Exception:  # noqa: S110  # reported by check_keys, in its own words
        pass
    if public_url and public_url.startswith("http://"):
        level = WARN if settings.allow_insecure_http else FAIL
        yield Finding(
            level,
            "configuration",
            f"the public URL {public_url} is plain HTTP: peers need HTTPS (put the node "
            "behind a TLS proxy or configure ENTRAIDE_TLS_CERT, then set ENTRAIDE_PUBLIC_URL)",
        )
    if settings.allow_insecure_http:
        yield Finding(
            WARN,
            "configuration",
            "ENTRAIDE_ALLOW_INSECURE_HTTP is on: only for development and tests",
        )
    if settings.metrics_public:
        yield Finding(
            WARN,
            "configuration",
            "ENTRAIDE_METRICS_PUBLIC is on: /metrics and /readyz's delivery backlog answer "
            "without a token, and they say when envelopes arrive and requests are sent; only "
            "behind a proxy that restricts both (docs/operations.md section 6)",
        )
    if settings.max_inbound_bytes_per_peer < settings.max_evidence_request_bytes:
        yield Finding(
            WARN,
            "configuration",
            f"ENTRAIDE_MAX_INBOUND_BYTES_PER_PEER ({settings.max_inbound_bytes_per_peer}) is "
            "below ENTRAIDE_MAX_EVIDENCE_REQUEST_BYTES "
            f"({settings.max_evidence_request_bytes}): a peer's large request waits until its "
            "other transfers are done",
        )
    longest = longest_exchange_seconds(settings)
    if settings.lease_seconds < longest + LEASE_MARGIN_SECONDS:  # the worker's rule
        yield Finding(
            WARN,
            "configuration",
            f"ENTRAIDE_LEASE_SECONDS ({settings.lease_seconds}) leaves no room for the longest "
            f"post to a peer ({longest:g} s with ENTRAIDE_PEER_TIMEOUT_SECONDS="
            f"{settings.peer_timeout_seconds:g}, and {LEASE_MARGIN_SECONDS:g} s in hand): every "
            "post renews its lease first, and with several workers a second one may post a "
            "delivery while the first still is; raise the lease or lower the timeout",
        )
    if not settings.run_worker:
        yield Finding(
            OK,
            "configuration",
            "no delivery worker inside `serve` (ENTRAIDE_RUN_WORKER=false): keep at least one "
            "`entraide worker` running",
        )


def _restores_left_staged(keys_dir: Path) -> Iterator[Finding]:
    """Private keys a killed restore left beside the keys folder: a copy nobody would look
    for, outside the folder that backups and operators guard (last notes). Only folders as
    `tempfile` names them, this user's own and no link: the parent may be a shared folder
    (`/tmp`, a restore drill's), where anyone could make one named to turn the command shown
    into another (from review)."""
    staged = re.compile(re.escape(RESTORE_STAGING_PREFIX) + r"[a-z0-9_]{8}")
    try:
        left = sorted(
            path
            for path in keys_dir.parent.glob(RESTORE_STAGING_PREFIX + "*")
            if staged.fullmatch(path.name)
            and not path.is_symlink()
            and path.is_dir()
            and path.lstat().st_uid == os.getuid()
        )
    except OSError:
        return  # the keys folder's own check says what cannot be read
    for path in left:
        where = shlex.quote(str(path.absolute()))
        yield Finding(
            WARN,
            "keys",
            f"{where} holds keys unsealed by a restore that did not finish (killed?): a copy "
            f"of private keys outside the keys folder; once no restore runs, remove it: "
            f"rm -r {where}",
        )


def check_keys(settings: Settings, unlocked: UnlockedKeys | None = None) -> Iterator[Finding]:
    keys_dir = settings.keys_dir
    yield from _restores_left_staged(keys_dir)
    if not keys_dir.is_dir():
        yield Finding(
            FAIL,
            "keys",
            f"{keys_dir} does not exist: run `entraide init` (a new node) or "
            "`entraide restore` (from a backup), or set ENTRAIDE_KEYS_DIR",
        )
        return
    problems = 0
    if (problem := _mode_problem(keys_dir, directory=True)) is not None:
        problems += 1
        yield Finding(FAIL, "keys", problem)
    for purpose, name in KEY_FILES.items():
        path = keys_dir / name
        if not path.exists():
            problems += 1
            yield Finding(
                FAIL,
                "keys",
                f"the {purpose} key {path} is missing: put back the keys folder from the keys "
                "backup (`entraide restore`), or point ENTRAIDE_KEYS_DIR at the node's keys",
            )
        elif (problem := _mode_problem(path)) is not None:
            problems += 1
            yield Finding(FAIL, "keys", problem)
    if not (keys_dir / IDENTITY_FILE).exists():
        problems += 1
        yield Finding(FAIL, "keys", f"{keys_dir / IDENTITY_FILE} (the node's identity) is missing")
    for problem in _owner_problems(keys_dir, settings):
        problems += 1
        yield Finding(FAIL, "keys", problem)
    if problems:
        return
    try:
        node = load_node(settings)
    except Exception as exc:  # any failure to load is the finding itself
        yield Finding(FAIL, "keys", f"the keys do not load: {exc}")
        return
    node.close()
    if key_passphrase(settings) is not None:
        # Loaded all the same (a keys backup from before `keys protect`, put back): the
        # node runs on keys anyone who copies the folder can use (from review).
        for path in [*(keys_dir / name for name in KEY_FILES.values()), *retired_files(keys_dir)]:
            if stored_plain(path):
                yield Finding(
                    FAIL,
                    "keys",
                    f"{path} is stored in plain form although a key passphrase is set: "
                    "run `entraide keys protect`",
                )
    now = utc_now()
    for purpose, (created, expires) in key_dates(keys_dir).items():
        if expires is not None and expires <= now:
            yield Finding(
                FAIL,
                "keys",
                f"the {purpose} key expired on {expires:%Y-%m-%d}: run `entraide keys rotate`",
            )
        elif expires is not None and expires - now <= KEY_EXPIRY_WARNING:
            yield Finding(
                WARN,
                "keys",
                f"the {purpose} key expires on {expires:%Y-%m-%d}: plan `entraide keys rotate`",
            )
        elif purpose != "log" and created is not None and now - created >= KEY_ROTATE_AFTER:
            # Not the log key: `keys rotate` does not replace it (every checkpoint the log
            # ever had is verified with it), so the advice could never be followed.
            yield Finding(
                WARN,
                "keys",
                f"the {purpose} key is {(now - created).days} days old: "
                "consider `entraide keys rotate`",
            )
    keys = node.keyring.state().generation.keys
    if unlocked is not None:
        unlocked.keep(load_identity(keys_dir), keys)
    yield Finding(
        OK, "keys", f"keys load, {node.authority_id}, fingerprint {keys.fingerprint[:16]}…"
    )
    yield from check_running_keys(settings, node.identity, keys)


def check_running_keys(
    settings: Settings, identity: NodeIdentity, keys: NodeKeys
) -> Iterator[Finding]:
    """Does the running node use the keys the files hold? After a rotation it could not load
    (operations.md §3), it goes on signing with and publishing the old ones, and the files
    alone say nothing of it (from review)."""
    url = node_url(settings, identity)
    try:
        published = read_published(settings, url)
    except Unreadable as exc:
        yield Finding(
            WARN,
            "keys",
            f"the node at {url} could not be read ({exc}): whether it uses the keys of "
            "the files is not checked; if it runs, see its /readyz (`keys_reload`)",
        )
        return
    differs = difference(published, keys)
    if differs is None:
        # Whoever answers there: this node, or a process with its keys (a restore drill run
        # with the live node's URL said the live node's keys were its own; a walkthrough).
        yield Finding(OK, "keys", f"the node answering at {url} publishes these keys")
        return
    yield Finding(
        FAIL,
        "keys",
        f"the node answering at {url} does not use the keys of the files: {differs}. It did "
        "not load the last rotation (its log and /readyz say why: often, the key files are "
        "protected and the node runs without ENTRAIDE_KEY_PASSPHRASE(_FILE)); peers that "
        "refresh pin its old keys. Fix the cause: a node reading ENTRAIDE_KEY_PASSPHRASE_FILE "
        "tries again within a minute; otherwise restart it",
    )


# libpq's connection parameters that hold a secret, when given in the URL's query.
_SECRET_PARAMETERS = {"password", "sslpassword"}


def redacted_url(url: str) -> str:
    """The URL without its password, in its user part or its query (`?password=`)."""
    try:
        parsed = make_url(url)
        hidden = {key: "***" for key in parsed.query if key.lower() in _SECRET_PARAMETERS}
        if hidden:
            parsed = parsed.update_query_dict(hidden)
        return parsed.render_as_string(hide_password=True)
    except Exception:  # a URL SQLAlchemy cannot parse is reported elsewhere
        return "(unparseable URL)"


# Blobs whose presence `doctor` checks, at most (a stat each).
MAX_BLOBS_CHECKED = 10_000


def server_refusal(exc: BaseException) -> str | None:
    """What a PostgreSQL server that answered said was wrong with the connection, in plain
    words, or None (no answer: a network fault). libpq gives a refused connection no error
    code, only the server's message (quoted by psycopg); never printed, it may name users."""
    said = str(exc)
    if re.search(r'FATAL:\s+database ".*" does not exist', said):
        return (
            "the server has no database of that name: check ENTRAIDE_DATABASE_URL, or create "
            "the database, then run the command again"
        )
    if re.search(r'FATAL:\s+(role ".*" does not exist|.*authentication failed)', said):
        return "the server refused the user or password in ENTRAIDE_DATABASE_URL"
    return None


def check_database(settings: Settings, engine: Engine) -> Iterator[Finding]:
    """Reachable and current; then the state a busy operator should know about."""
    try:
        with engine.connect() as connection:
            current = set(current_heads(connection))
    except Exception as exc:  # any driver failure: unreachable, wrong credentials, no file
        refused = server_refusal(getattr(exc, "orig", exc))
        yield Finding(
            FAIL,
            "database",
            f"{redacted_url(settings.database_url)}: {refused}"
            if refused
            else f"cannot reach {redacted_url(settings.database_url)} "
            f"({type(exc).__name__}): is it running, and is the URL right?",
        )
        return
    heads = set(expected_heads())
    if not current:
        yield Finding(FAIL, "database", "the database has no schema: run `entraide migrate`")
        return
    newer = unknown_revisions(frozenset(current))
    if newer:
        yield Finding(FAIL, "database", NEWER_SCHEMA.format(revisions=", ".join(sorted(newer))))
        return
    if current != heads:
        yield Finding(
            FAIL,
            "database",
            f"migrations pending: the database is at {', '.join(sorted(current))}, this "
            f"version needs {', '.join(sorted(heads))}: back up, then run `entraide migrate`",
        )
        return
    yield Finding(OK, "database", f"reachable ({engine.dialect.name}), schema current")
    yield from check_writable(settings, engine)
    now = utc_now()
    with engine.connect() as connection:
        failed = connection.scalar(
            select(func.count()).select_from(OutboxItem).where(OutboxItem.state == "failed")
        )
        oldest = connection.scalar(
            select(func.min(OutboxItem.created_at)).where(
                OutboxItem.state.in_(("queued", "in_flight", "retry"))
            )
        )
        workers = heartbeat.alive(connection)
        alarms = list(
            connection.execute(
                select(WitnessAlarm.peer_authority)
                .where(WitnessAlarm.resolved_at.is_(None))
                .distinct()
            )
        )
    if failed:
        yield Finding(
            WARN,
            "deliveries",
            f"{failed} deliveries failed for good: see `entraide deliveries list --state failed`",
        )
    if oldest is not None and not workers:
        # A warning: a node stopped for maintenance, or just restored, has messages waiting
        # and no worker yet; starting it is what the operator does next.
        yield Finding(
            WARN,
            "deliveries",
            "messages wait for delivery and no delivery worker is running (none has a "
            "current heartbeat): start `entraide serve` (it runs one unless "
            "ENTRAIDE_RUN_WORKER=false) or `entraide worker`",
        )
    if oldest is not None and now - oldest > STUCK_AFTER:
        hours = (now - oldest).total_seconds() / 3600
        yield Finding(
            WARN,
            "deliveries",
            f"a message has waited {hours:.1f} h for delivery: "
            "see `entraide deliveries list --stuck-minutes 60`",
        )
    yield from _missing_blobs(settings, engine)
    for (peer,) in alarms:
        yield Finding(
            FAIL,
            "audit",
            f"{peer} showed two different histories of its audit log "
            "(a witness alarm): tell its operator and your security officer; if its operator "
            "tells you it restored its node from a backup, `entraide peers accept-restore "
            f"{peer} --reason ...` closes it (docs/operations.md §5)",
        )


# Free space below which a volume the node writes to is reported: failing under the first
# (a few requests' worth of rows or one chunk of evidence), and a warning under the share.
FREE_BYTES_FAILING = 256 * 2**20
FREE_SHARE_WARNING = 0.05


def check_writable(settings: Settings, engine: Engine) -> Iterator[Finding]:
    """Whether the node can write what it must: its database (a read-only file or folder, a
    read-only PostgreSQL), and room on the volumes of its database and evidence. Each made
    every write fail while doctor said "No problem found" (from review). Run as the node's
    user: an administrator may write where the node cannot."""
    folders: list[tuple[str, Path]] = []
    database = sqlite_file(settings.database_url)
    if database is not None:
        # Where SQLite writes: beside the file a link points to (its journal and WAL).
        database = database.resolve()
        folders.append(("database", database.parent))
        for path in (database, database.parent):  # the folder: its journal and WAL
            if path.exists() and not os.access(path, os.W_OK):
                yield Finding(
                    FAIL,
                    "database",
                    f"{path} is not writable by this user ({_user_name(os.getuid())}): every "
                    "write is refused (503); give it back to the node's user (chown, chmod u+w)",
                )
    elif engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            read_only = connection.exec_driver_sql("SHOW transaction_read_only").scalar()
        if read_only == "on":
            yield Finding(
                FAIL,
                "database",
                "the database takes no write (transaction_read_only is on: a standby, or "
                "default_transaction_read_only): point ENTRAIDE_DATABASE_URL at the primary",
            )
    folders.append(("evidence", blob_root(settings.blob_dir, settings.keys_dir)))
    for what, folder in folders:
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            continue  # a folder missing is said by its own check
        if usage.free < FREE_BYTES_FAILING:
            yield Finding(
                FAIL,
                "storage",
                f"the {what} volume ({folder}) has {usage.free // 2**20} MiB free: writes "
                "will be refused (507); make room",
            )
        elif usage.free < usage.total * FREE_SHARE_WARNING:
            yield Finding(
                WARN,
                "storage",
                f"the {what} volume ({folder}) is {100 - 100 * usage.free // usage.total}% "
                f"full ({usage.free // 2**20} MiB free)",
            )
        else:  # said, so that an operator sees it was checked (from a walkthrough)
            yield Finding(
                OK, "storage", f"the {what} volume ({folder}) has {usage.free / 2**30:.1f} GiB free"
            )


def _missing_blobs(settings: Settings, engine: Engine) -> Iterator[Finding]:
    """Evidence that stored messages name and the blob folder no longer holds: after a
    restore without the blob folder (it is not in `entraide backup`), a download said only
    `stored_envelope_corrupt` (from an operator's review). Up to MAX_BLOBS_CHECKED of them,
    a `stat` each; nothing is created (a volume not mounted is to be seen, not covered)."""
    with engine.connect() as connection:
        digests = list(connection.scalars(select(BlobPart.digest).limit(MAX_BLOBS_CHECKED)))
    if not digests:
        return
    root = blob_root(settings.blob_dir, settings.keys_dir)
    if not (root / "blobs").is_dir():
        # Its subfolder, not the folder: an operator who made the folder again found
        # "missing" said of a folder that was there (from review).
        yield Finding(
            FAIL,
            "evidence",
            f"the evidence folder {root / 'blobs'} is missing (a volume not mounted?), and "
            "stored messages name evidence in it: put it back (ENTRAIDE_BLOB_DIR, "
            "docs/operations.md §5), then restart the node, which makes its subfolders as it "
            "starts",
        )
        return

    def held(digest: str) -> bool:
        try:
            return (root / "blobs" / digest[:2] / digest[2:4] / digest).is_file()
        except (OSError, ValueError):  # unreadable, or a damaged row's name: not held
            return False

    missing = sum(1 for digest in digests if not held(digest))
    if missing:
        yield Finding(
            FAIL,
            "evidence",
            f"{missing} of {len(digests)} evidence blobs that stored messages name are not in "
            f"{root}: put back the evidence folder from its own backup (ENTRAIDE_BLOB_DIR, "
            "docs/operations.md §5); until then their downloads fail",
        )


def check_recovery(engine: Engine) -> list[Finding]:
    """After a restore, the peers whose exchange since the backup is not taken back yet
    (`entraide peers recover`, docs/operations.md §5)."""
    from app.recovery.pending import not_recovered

    try:
        with read_snapshot(make_session_factory(engine)) as session:
            pending = not_recovered(session)
    except (OperationalError, ProgrammingError):  # unreachable, no schema: check_database
        return []
    return [
        Finding(
            WARN,
            "recovery",
            f"this node was restored from a backup; what it exchanged with {peer.peer} after "
            "the backup is "
            + (
                "not taken back yet"
                if peer.outcome is None
                else "not taken back in full (its last `peers recover` ended "
                f"{peer.outcome}, or asked from after the backup)"
            )
            + f": `entraide peers recover {peer.peer}` before you start the node "
            "(docs/operations.md §5)",
        )
        for peer in pending
    ]


def check_peers(settings: Settings, engine: Engine, http: httpx.Client) -> Iterator[Finding]:
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            # A damaged row (check_damaged_peers names it) must not hide the others' checks.
            try:
                damaged = [peer.row_id for peer in find_damaged_peers(session)]
            except DBAPIError:
                # A schema behind this version's (migrations pending: the database findings
                # say so) lacks a column the scan reads; the peers are checked all the same.
                damaged = []
            peers = list(
                session.execute(
                    select(
                        Peer.authority_id,
                        Peer.public_url,
                        Peer.fingerprint,
                        Peer.encryption_kid,
                        Peer.log_kid,
                    )
                    .where(Peer.id.not_in(damaged))
                    .order_by(Peer.authority_id)
                ).tuples()
            )
    except Exception:  # the database findings already say why
        return
    if damaged and not peers:
        return
    if not peers:
        yield Finding(
            WARN, "peers", "no peer is pinned yet: `entraide peers add URL --fingerprint ...`"
        )
        return
    for authority, url, fingerprint, encryption_kid, log_kid in peers:
        yield from _check_peer(settings, http, authority, url, fingerprint, encryption_kid, log_kid)


def _check_peer(
    settings: Settings,
    http: httpx.Client,
    authority: str,
    url: str,
    fingerprint: str,
    encryption_kid: str,
    log_kid: str,
) -> Iterator[Finding]:
    area = f"peer {authority}"
    refused = url.startswith("http://") and not settings.allow_insecure_http
    if refused:
        yield Finding(
            FAIL,
            area,
            f"pinned at plain-HTTP {url}: the worker will not deliver "
            "there; re-pin it at its HTTPS URL",
        )
    sent = utc_now()
    try:
        with http.stream("GET", url + IDENTITY_PATH) as response:
            status, date_header = response.status_code, response.headers.get("date")
            document = read_json_bounded(response) if status == 200 else None
    except httpx.HTTPError as exc:
        yield Finding(
            FAIL,
            area,
            f"unreachable at {url} ({type(exc).__name__}): deliveries "
            "to it wait; check the network, its firewall and that its node runs",
        )
        return
    except PeerError as exc:
        yield Finding(FAIL, area, f"{url} serves no valid identity document: {exc.detail}")
        return
    received = utc_now()
    if status != 200:
        yield Finding(FAIL, area, f"{url} answered HTTP {status} for its identity document")
        return
    try:
        identity = parse_identity_document(document)
    except IdentityError as exc:
        yield Finding(FAIL, area, f"{url} serves no valid identity document: {exc}")
        return
    if identity.authority_id != authority:
        yield Finding(
            FAIL,
            area,
            f"{url} now says it is {identity.authority_id}: "
            "check with its operator before anything else",
        )
    elif identity.fingerprint != fingerprint:
        yield Finding(
            FAIL,
            area,
            "presents a signing key other than the pinned one: if its operator rotated its "
            f"keys, `entraide peers refresh {authority}` follows the signed rotation; if that "
            "fails, treat it as an impersonation and check the fingerprint out of band",
        )
    elif identity.encryption.kid != encryption_kid:
        yield Finding(
            WARN,
            area,
            "has published new keys; the pinned ones are out of date: "
            f"`entraide peers refresh {authority}`",
        )
    elif identity.log.kid != log_kid:
        yield Finding(
            WARN,
            area,
            "publishes another log key than the pinned one, which a rotation never changes "
            "(its checkpoints no longer verify here): ask its operator why; pinning it again "
            "(`entraide peers add URL --fingerprint …`) takes the new one",
        )
    elif refused:  # an "ok" beside the FAIL above would read as cancelling it
        yield Finding(WARN, area, f"reachable at {url}, keys current, but not delivered to (above)")
    else:
        yield Finding(OK, area, f"reachable at {url}, keys current")
    try:
        skew = skew_from_date_header(date_header, sent, received)
    except (TypeError, ValueError):
        yield Finding(WARN, area, "sent no usable Date header: clock skew unknown")
        return
    verdict = clock_verdict(skew, settings.clock_skew_seconds)
    area = f"clock vs {authority}"
    if verdict != OK:
        whose = "ahead of" if skew > 0 else "behind"
        yield Finding(
            verdict,
            area,
            f"its clock is {abs(skew):.0f} s {whose} ours (envelopes are refused beyond "
            f"{settings.clock_skew_seconds} s): check NTP on both nodes",
        )
    else:
        # The Date header has whole seconds: the skew may be up to a second more.
        yield Finding(OK, area, f"within {math.ceil(abs(skew)) + 1} s of ours")


def check_signed_log(settings: Settings, engine: Engine) -> Iterator[Finding]:
    """The record of what the log key signed (docs/audit.md §4): it must be writable, and
    the database's log must extend it, or the node signs nothing more."""
    anchor = SignedLogAnchor.of(settings)
    try:
        signed = anchor.read()
    except LogRolledBack as exc:
        yield Finding(FAIL, "audit", exc.detail)
        return
    if not anchor.writable():
        yield Finding(
            WARN,
            "audit",
            f"{anchor.path} cannot be written: the node keeps no record of what its log key "
            "signed and cannot tell a rolled-back audit log from the database alone; set "
            "ENTRAIDE_SIGNED_LOG_FILE to a writable file outside the database",
        )
        return
    try:
        problem = log_against_record(anchor, signed, engine)
    except Exception as exc:  # the check itself failed: never an OK beside it
        yield Finding(
            FAIL,
            "audit",
            f"the audit log could not be checked against {anchor.path} ({type(exc).__name__})",
        )
        return
    if problem is not None:
        what = problem if signed is None else rolled_back(problem)
        yield Finding(FAIL, "audit", f"{what}; {SIGNS_NOTHING}")
        return
    held = "nothing signed yet" if signed is None else f"checkpoint of {signed.size} entries"
    yield Finding(OK, "audit", f"signed log record {anchor.path} ({held})")


def check_database_owner(
    settings: Settings, engine: Engine, unlocked: UnlockedKeys | None = None
) -> Iterator[Finding]:
    """The database and the keys folder are one node's (the checks after this one would
    read another node's log as this one's, rolled back or rewritten)."""
    try:
        identity, keys = (unlocked or UnlockedKeys(settings)).get()
    except Exception:  # check_keys says why
        return
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            foreign = foreign_log(session, identity.authority_id, keys.log_public)
    except Exception:  # no database or no schema yet: check_database says which
        return
    if foreign is not None:
        yield Finding(
            FAIL, "database", ANOTHER_NODES_DATABASE.format(why=foreign, keys=settings.keys_dir)
        )


def check_checkpoints(
    settings: Settings, engine: Engine, unlocked: UnlockedKeys | None = None
) -> Iterator[Finding]:
    """Entries left unsigned long after checkpoints were due: until signed, whoever can write
    to the database can rewrite them without a trace (docs/audit.md §4)."""
    try:  # the log key's public half checks the latest checkpoint's note
        identity, keys = (unlocked or UnlockedKeys(settings)).get()
    except Exception:  # check_keys says why
        return
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            progress = read_progress(session, log_verifier(identity.authority_id, keys.log_public))
    except Exception:  # no database or no schema yet: check_database says which
        return
    if progress is None or progress.size <= progress.last_checkpoint_size:
        return
    due_for = max(3 * settings.audit_checkpoint_seconds, UNSIGNED_WARNING_SECONDS)
    last = progress.latest_checkpoint_at
    if last is None or utc_now() - last < timedelta(seconds=due_for):
        return  # None: a node never started yet (its first worker round signs one)
    yield Finding(
        WARN,
        "audit",
        f"{progress.size - progress.last_checkpoint_size} audit entries are not covered by a "
        f"signed checkpoint, and none was signed since {last.isoformat(timespec='seconds')}: "
        "if the node is running, its delivery worker is not (it signs them), or signing "
        "fails (see its log); until signed, they could be rewritten without a trace",
    )


def check_checkpoint_dates(engine: Engine) -> Iterator[Finding]:
    """Checkpoint rows whose date the database driver cannot read: damaged storage. Their
    notes still count (no signature covers the date), and `audit verify --db` fails naming
    them until they are put back (from review: it crashed, and doctor said nothing)."""
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            dates = checkpoint_dates(session)
    except DBAPIError:  # no database or no schema yet: check_database says which
        return
    damaged = sorted(row for row, date in dates.items() if date is None)
    if not damaged:
        return
    yield Finding(
        FAIL,
        "audit",
        f"the date (created_at) of audit checkpoint {_rows(damaged)} cannot be read (stored "
        "value damaged): put it back from a backup (no signature covers it: the checkpoint "
        "still counts); `entraide audit verify --db` names each",
    )


def _rows(ids: list[int]) -> str:
    """`row 4` or `rows 4, 9, …` (the first ten)."""
    shown = ", ".join(map(str, ids[:10])) + (", …" if len(ids) > 10 else "")
    return f"{'row' if len(ids) == 1 else 'rows'} {shown}"


def check_checkpoint_rows(engine: Engine) -> Iterator[Finding]:
    """Checkpoint rows whose note the database driver cannot read, or whose size is no
    number (SQLite keeps any value): damaged storage. The node passes them over as no
    checkpoint of its own (the latest genuine one is signed over and handed out); what they
    held is lost to the database until put back (from review: they crashed `audit verify
    --db`, a note failed every receipt, and doctor said nothing)."""
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            notes = [row for row, note in checkpoint_notes(session) if note is None]
            damaged = {"note": notes, "size": unsized_checkpoints(session)}
    except DBAPIError:  # no database or no schema yet: check_database says which
        return
    for column, rows in damaged.items():
        if rows:
            yield Finding(
                FAIL,
                "audit",
                f"the {column} of audit checkpoint {_rows(rows)} cannot be read (stored value "
                "damaged): passed over, it counts as no checkpoint of this log; put it back "
                "from a backup; `entraide audit verify --db` names each",
            )


def check_witnessed_rows(engine: Engine) -> Iterator[Finding]:
    """Peers' checkpoints this node witnessed whose row holds a value that cannot be read,
    or a size or root that is not its note's (app/audit/witnessed.py): a check of the peer's
    checkpoints that reads one is held (from review: witnessing stopped, silently)."""
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            peers = session.execute(select(stored_text(session, Peer.authority_id))).scalars()
            damage = find_damage(session, [peer for peer in map(readable_note, peers) if peer])
    except DBAPIError:  # no database or no schema yet: check_database says which
        return
    for column, rows in damage.rows.items():
        yield Finding(
            FAIL,
            "audit",
            f"the {column} of witnessed checkpoint {_rows(rows)} cannot be read or is not what "
            "the row's note says (stored value damaged): put it back from a backup, or set the "
            "row aside (docs/operations.md §8)",
        )
    for peer in damage.held:
        yield Finding(
            FAIL,
            f"peer {peer}",
            "its witnessing is held: none of its checkpoints is checked or cosigned until that "
            "row is put back or set aside (deliveries go on)",
        )


def check_entry_macs(
    settings: Settings, engine: Engine, unlocked: UnlockedKeys | None = None
) -> Iterator[Finding]:
    """The entries no checkpoint covers yet carry the MACs the log key gave them
    (docs/audit.md §4): what the next checkpoint checks before it signs, and refuses to sign
    over, said here rather than only in the worker's log (from an earlier note: doctor said
    nothing of a rewritten entry until the next checkpoint failed)."""
    try:
        identity, keys = (unlocked or UnlockedKeys(settings)).get()
    except Exception:  # check_keys says why
        return
    anchor = SignedLogAnchor.of(settings)
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            try:
                head = read_head(session)
            except Exception:  # no schema, or a damaged head: other checks say which
                return
            latest = latest_signed(session, log_verifier(identity.authority_id, keys.log_public))
            start = 0 if latest is None else latest.size
            checked = check_macs(
                session,
                mac_key(keys.log),
                start=start,
                end=head.size,
                legacy=not macs_required(latest, anchor),
                head_root=head.root_hash if head.size > start else None,
            )
    except DBAPIError:  # no database: check_database says so
        return
    except Exception as exc:  # the check itself failed: never "No problem found" beside it
        # A MAC rewritten as text made it raise TypeError, and doctor said nothing while
        # the worker's rounds failed (from review).
        yield Finding(
            FAIL,
            "audit",
            f"the MACs of the audit entries no checkpoint covers could not be checked "
            f"({type(exc).__name__}): run `entraide audit verify --db`",
        )
        return
    if checked.problem is not None:
        yield Finding(
            FAIL,
            "audit",
            f"audit log rolled back or rewritten: {checked.problem[1]}; the node signs no "
            "checkpoint over it (docs/operations.md §8)",
        )
        return
    if checked.without_mac:
        yield Finding(
            WARN,
            "audit",
            f"{checked.without_mac} audit entries after the latest checkpoint carry no MAC "
            "(appended by a process of an earlier version): the next checkpoint signs them "
            "as they are",
        )


def rolled_back(problem: str) -> str:
    """The alarm as doctor and `entraide migrate` say it (the worker logs it so too)."""
    return f"audit log rolled back or rewritten: {problem}"


SIGNS_NOTHING = "the node signs no checkpoint until it is resolved (docs/operations.md §8)"


def log_against_record(
    anchor: SignedLogAnchor, signed: Signed | None, engine: Engine
) -> str | None:
    """Why the log does not extend the record (or there is none though checkpoints were
    signed); None too when there is no database or no schema yet (check_database says which)."""
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            try:
                head = read_head(session)
            except LogDamaged as exc:
                return exc.detail
            except Exception as exc:
                if not inspect(engine).has_table(AuditHead.__tablename__):
                    return None  # no schema yet
                # A value of the head row the driver cannot read: passed as "no schema",
                # `migrate` and doctor said all was well (from review). Its class only: the
                # driver's message may quote the stored value.
                return (
                    f"the audit log's head row cannot be read ({type(exc).__name__}): the "
                    "database was altered or damaged"
                )
            # Against the record read before the log: one read now could be of a checkpoint
            # signed meanwhile, newer than this snapshot. None: none yet, or missing.
            return anchor.problem(session, head.size, head.root_hash, signed=signed)
    except OperationalError:  # unreachable
        return None


def check_damaged_deliveries(engine: Engine) -> list[Finding]:
    """Deliveries still in play whose stored text SQLite cannot read (not UTF-8): the worker
    sets each aside as failed when it meets it (app/delivery/damage.py), but this finds them
    before, and after a repair. Read as bytes and decoded here (SQL has no test of UTF-8):
    only the backlog's rows (queued, in flight, retry, failed) and their messages, which the
    worker and the operator's commands read, never the history. PostgreSQL stores only valid
    UTF-8 text: nothing to look for there."""
    from sqlalchemy import LargeBinary, String, Table, cast

    from app.delivery.outbox import BACKLOG, OUTBOX
    from app.models import Message

    if engine.dialect.name != "sqlite":
        return []
    messages: Table = Message.__table__  # type: ignore[assignment]  # a declarative table
    found: dict[str, set[int]] = {}
    try:
        with engine.connect() as connection:
            for table, key in ((OUTBOX, OUTBOX.c.id), (messages, OUTBOX.c.id)):
                texts = [column for column in table.c if isinstance(column.type, String)]
                statement = select(key, *(cast(column, LargeBinary) for column in texts))
                if table is messages:
                    statement = statement.join_from(
                        OUTBOX, messages, messages.c.id == OUTBOX.c.message_id
                    )
                for row in connection.execute(statement.where(OUTBOX.c.state.in_(BACKLOG))):
                    for column, value in zip(texts, row[1:], strict=True):
                        try:
                            bytes(value or b"").decode("utf-8")
                        except UnicodeDecodeError:
                            found.setdefault(f"{table.name}.{column.name}", set()).add(row[0])
    except OperationalError:  # unreachable, or no schema: check_database says which
        return []
    return [
        Finding(
            FAIL,
            "deliveries",
            f"column {column} of {len(rows)} deliveries (outbox ids "
            f"{', '.join(str(row) for row in sorted(rows)[:10])}) holds a value that cannot be "
            "read (stored value damaged): put the value back from a backup, then retry or "
            "cancel the delivery (`entraide deliveries`, docs/operations.md)",
        )
        for column, rows in sorted(found.items())
    ]


def check_damaged_peers(engine: Engine) -> list[Finding]:
    """Peer rows holding a value the database cannot give back (app/peers/damage.py): the
    worker holds their deliveries back, and every exchange with the peer fails, until the
    value is put back. Both backends: PostgreSQL keeps a time of 'infinity' its driver
    cannot give back."""
    try:
        with read_snapshot(make_session_factory(engine)) as session:
            damaged = find_damaged_peers(session)
    except (OperationalError, ProgrammingError):  # unreachable, no schema: check_database
        return []
    return [
        Finding(
            FAIL,
            f"peer {peer.authority}" if peer.authority else f"peers row id={peer.row_id}",
            f"a value stored in column {', '.join(peer.columns)} of its row cannot be read "
            "(stored value damaged): its deliveries wait, and exchanges with it fail; put the "
            "value back from a backup (docs/operations.md §5)",
        )
        for peer in damaged
    ]


def permission_denied(exc: PermissionError) -> str:
    """What a file the command may not read means: almost always the command run as another
    user than the node's (docs/operations.md §1)."""
    where = f" {exc.filename}" if exc.filename else ""
    return (
        f"cannot read or write{where}: permission denied: run the command as the user the "
        "node runs as, the owner of its keys folder (docs/operations.md §1)"
    )


def _as_allowed(area: str, check: Callable[[], Iterable[Finding]]) -> list[Finding]:
    """A check's findings, or, where it met a file it may not read, that finding: the other
    checks still run (from review: a traceback, doctor's first words to an operator who ran
    it as root without privileges, or as another user)."""
    try:
        return list(check())
    except PermissionError as exc:
        return [Finding(FAIL, area, permission_denied(exc))]


def diagnose(settings: Settings) -> list[Finding]:
    unlocked = UnlockedKeys(settings)
    findings = [
        *_as_allowed("configuration", lambda: check_configuration(settings)),
        *_as_allowed("keys", lambda: check_keys(settings, unlocked)),
    ]
    engine = make_engine(settings.database_url)
    try:
        owner = _as_allowed("database", partial(check_database_owner, settings, engine, unlocked))
        findings += owner
        if not owner:  # another node's log, checked with these keys, reads as rewritten
            findings += _as_allowed("audit", lambda: check_signed_log(settings, engine))
            findings += _as_allowed("audit", lambda: check_checkpoints(settings, engine, unlocked))
        findings += check_checkpoint_dates(engine)
        findings += check_checkpoint_rows(engine)
        findings += check_witnessed_rows(engine)
        if not owner:
            findings += _as_allowed("audit", lambda: check_entry_macs(settings, engine, unlocked))
        findings += _as_allowed("database", lambda: check_database(settings, engine))
        findings += check_damaged_deliveries(engine)
        findings += check_damaged_peers(engine)
        findings += check_recovery(engine)
        timeout = min(settings.peer_timeout_seconds, PEER_TIMEOUT_SECONDS)
        try:
            # As the worker reaches them: its CA bundle and client certificate (from
            # review: with the system's CAs, a private-CA deployment read "unreachable").
            tls = client_context(settings)
        except (KeyFileError, OSError, ValueError) as exc:
            findings.append(Finding(FAIL, "tls", f"the TLS client settings do not load: {exc}"))
            tls = None
        with make_http_client(timeout, tls=tls) as http:
            findings += check_peers(settings, engine, http)
    finally:
        engine.dispose()
    return findings

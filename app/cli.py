"""The `entraide` command: set up, run and administer a node."""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from app import cli_security, nodeproc
from app.auth.service import Role
from app.recovery import cli as recovery_cli

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session
    from typer import _click as click  # typer's own copy of Click, whose classes it extends

    from app.audit.anchor import Signed, SignedLogAnchor
    from app.audit.cosignature import Cosigned
    from app.config import Settings
    from app.models import OutboxItem, Peer
    from app.node import Node

# Each command imports what it needs when it runs: `entraide clients create` has no use for
# the web application, the HTTP client or Alembic, and the test suites and the benchmarks start
# many such processes. Only what typer needs to build the commands (their parameter types) is
# imported here.


class _Commands(TyperGroup):
    """The root group. `requests` (app/evidence/cli.py, with an HTTP client and progress bars,
    and app/requests/cli.py) is imported only when it runs or the help lists it: Click's
    documented lazy subcommand."""

    LAZY = "requests"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), self.LAZY]

    def invoke(self, ctx: click.Context) -> object:
        from app.errors import EntraideError

        try:
            return super().invoke(ctx)
        except EntraideError as exc:  # the node's own refusal (an audit log rolled back, say)
            typer.secho(f"error: {exc.detail}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from exc
        except PermissionError as exc:
            # The node's files read by another user (the command run without `sudo -u`, or
            # as root without privileges): said so, not a traceback (from review).
            from app.doctor import permission_denied

            typer.secho(f"error: {permission_denied(exc)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from exc

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name != self.LAZY:
            return super().get_command(ctx, cmd_name)
        # The group is app/evidence/cli.py's; this import adds `list` and `show` to it.
        from app.requests.cli import requests_app

        group = typer.main.get_group(requests_app)
        group.name = cmd_name
        return group


# A crash's traceback never shows local variables: they hold settings (a database URL with
# its password), tokens, passphrases. (Typer's default has changed between versions.)
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help=__doc__,
    cls=_Commands,
    pretty_exceptions_show_locals=False,
)
keys_app = typer.Typer(no_args_is_help=True, help="The node's own keys.")
peers_app = typer.Typer(no_args_is_help=True, help="Pinned peer nodes.")
clients_app = typer.Typer(no_args_is_help=True, help="API clients of the local API.")
app.add_typer(keys_app, name="keys")
app.add_typer(peers_app, name="peers")
app.add_typer(clients_app, name="clients")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
app.add_typer(audit_app, name="audit")
proof_app = typer.Typer(
    no_args_is_help=True, help="Custody proofs: what was sent and received (auditors, courts)."
)
app.add_typer(proof_app, name="proof")
cli_security.register(keys_app, peers_app)
recovery_cli.register(peers_app)
deliveries_app = typer.Typer(no_args_is_help=True, help="Outbound deliveries (operators).")
app.add_typer(deliveries_app, name="deliveries")


def _operator() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator:unknown"


def _said(exc: Exception) -> str:
    """An error as the command says it: a file it may not read as what to do about it."""
    if isinstance(exc, PermissionError):
        from app.doctor import permission_denied

        return permission_denied(exc)
    return str(exc)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def _said_failed(failed: nodeproc.CommandFailed) -> typer.Exit:
    """A node's command that could not start (app/nodeproc.py), said in red at a terminal."""
    for line in failed.lines:
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def _settings() -> Settings:
    try:
        return nodeproc.load_settings()
    except nodeproc.CommandFailed as exc:
        raise _said_failed(exc) from exc


def _node(settings: Settings, *, another_nodes_database: bool = False) -> Node:
    """The node of an existing database and keys folder, or the command ends saying why.
    `another_nodes_database`: said as a warning, not refused (`audit verify --db`, the
    auditor's tool, runs whatever the node's state)."""

    def warn(said: str) -> None:
        typer.secho(f"warning: {said}", fg=typer.colors.YELLOW, err=True)

    try:
        return nodeproc.open_node(
            settings, another_nodes_database=another_nodes_database, warn=warn
        )
    except nodeproc.CommandFailed as exc:
        raise _said_failed(exc) from exc


def _sqlite_file_exists(settings: Settings) -> None:
    try:
        nodeproc.sqlite_file_exists(settings)
    except nodeproc.CommandFailed as exc:
        raise _said_failed(exc) from exc


@app.command()
def init(
    authority_id: Annotated[str, typer.Option(help="This authority's id, e.g. ES/MJ")],
    name: Annotated[str, typer.Option(help="The authority's name, as peers will see it")],
    public_url: Annotated[str, typer.Option(help="The URL at which peers reach this node")],
) -> None:
    """Create the node's keys, migrate the database, and print the node's fingerprint."""
    from app.audit.checkpoints import sign_checkpoint
    from app.audit.log import record
    from app.config import Settings
    from app.crypto.identity import MAX_NAME_CHARS, MAX_URL_CHARS
    from app.crypto.keys import (
        KeyFileError,
        NodeIdentity,
        NodeKeys,
        format_fingerprint,
        keys_exist,
        save_identity,
        save_keys,
    )
    from app.db import unit_of_work
    from app.node import key_passphrase, load_node
    from app.oneline import is_one_line

    settings = _settings()
    keys_dir = settings.keys_dir
    try:
        Settings(authority_id=authority_id)
    except ValueError as exc:
        raise _fail(f"{authority_id!r} is not an authority id like ES/MJ") from exc
    # What peers accept in an identity document (app/crypto/identity.py), or none could pin us.
    if not 0 < len(name) <= MAX_NAME_CHARS or not is_one_line(name):
        raise _fail(f"the name is one line of 1 to {MAX_NAME_CHARS} characters")
    if len(public_url) > MAX_URL_CHARS or not is_one_line(public_url):
        raise _fail(f"the public URL is one line of at most {MAX_URL_CHARS} characters")
    _check_public_url(public_url, settings)
    if keys_exist(keys_dir):
        raise _fail(f"{keys_dir} already holds keys; refusing to overwrite them")
    # The database first: unreachable, nothing is created, and `init` can simply run again.
    _upgrade(settings)
    _refuse_a_used_database(settings)
    keys = NodeKeys.generate()
    try:
        save_keys(keys_dir, keys, passphrase=key_passphrase(settings))
    except KeyFileError as exc:
        raise _fail(str(exc)) from exc
    save_identity(keys_dir, NodeIdentity(authority_id, name, public_url.rstrip("/")))
    node = load_node(settings)
    node.log_anchor.start()
    try:
        with unit_of_work(node.sessions) as session:
            for purpose, kid in (
                ("signing", keys.signing_kid),
                ("encryption", keys.encryption_kid),
                ("log", keys.log_kid),
            ):
                record(
                    session,
                    actor=_operator(),
                    action="key.created",
                    details={"purpose": purpose, "kid": kid},
                )
            sign_checkpoint(
                session, authority_id=authority_id, log_key=keys.log, anchor=node.log_anchor
            )
    finally:
        node.close()
    # Absolute: a relative default (./keys) is where the command ran, which a service
    # started elsewhere would not find (set ENTRAIDE_KEYS_DIR for it).
    typer.echo(f"Node {authority_id} initialised; keys in {keys_dir.resolve()}.")
    typer.echo("Read this fingerprint to your peers' operators, out of band:")
    typer.echo(format_fingerprint(keys.fingerprint))


@app.command()
def migrate() -> None:
    """Bring the database schema to the latest migration (and, from a release before the
    record of what the log key signed, adopt the audit log once it verifies)."""
    settings = _settings()
    before = nodeproc.schema_revisions(settings)
    _upgrade(settings)
    after = nodeproc.schema_revisions(settings)
    if before == after:
        done = f"database schema is current ({', '.join(after) or 'none'})"
    else:
        done = f"database migrated: {', '.join(before) or 'empty'} -> {', '.join(after)}"
    # Said last, once the record is there: a node that signs nothing is not "done" (a rerun
    # after a failed adoption said "current" and exited 0 while doctor failed, from review).
    adopted = _the_record_after_migrating(settings, before if before != after else [], done)
    if adopted is not None:
        typer.echo(adopted)
    if before == after:
        typer.echo(done)
    else:
        # Processes of the version before now report not ready (/readyz: migrations) until
        # the new version replaces them (docs/operations.md §7).
        typer.echo(f"{done}; start this version's processes now")


def _the_record_after_migrating(settings: Settings, moved_from: list[str], done: str) -> str | None:
    """The record of what the log key signed (app/audit/anchor.py), once the schema is
    current: there, and the log extends it (None); or adopted, for a database last run by a
    release that kept none (what to say); or the command fails saying what to do, as the
    node would sign nothing.

    Every node upgraded as §7 says raised the rolled-back alarm until its operator found
    `audit checkpoint --adopt` (from review): such a log is adopted here, as `entraide
    restore` records a restored one, once it verifies against its own signed checkpoints.
    Only where those checkpoints show no release that kept the record (app/audit/adopt.py):
    the schema it moved from is the database writer's to set, and a record missing beside a
    log such a release ran was deleted, and stays the alarm it is."""
    from app.audit.adopt import RECORD_INTRODUCED_AT, RecordWasKept, adopt_from_before_the_record
    from app.audit.anchor import SignedLogAnchor
    from app.crypto.keys import keys_exist
    from app.errors import EntraideError
    from app.migrate import older_than

    anchor = SignedLogAnchor.of(settings)
    if not keys_exist(settings.keys_dir) or not anchor.writable():
        return None  # no node yet (`init` writes the record), or none can be kept (doctor warns)
    try:
        signed = anchor.read()
    except EntraideError as exc:  # unreadable: nothing is adopted over it
        raise _fail(
            f"{done}, but {exc.detail}; until then the node signs no checkpoint "
            "(docs/operations.md §8)"
        ) from exc
    if signed is not None:
        _the_log_extends(settings, anchor, signed, done)
        return None
    missing = f"{done}, but there is no record at {anchor.path} of what this node's log key signed"
    next_step = (
        "put it back from the keys backup; without one, find out why it is missing (the log "
        "may have been rolled back: docs/operations.md §8), then `entraide audit checkpoint "
        "--adopt` adopts the log if it verifies"
    )
    if not moved_from or not older_than(settings.database_url, moved_from, RECORD_INTRODUCED_AT):
        raise _fail(f"{missing}: {next_step}")
    try:
        node = _node(settings)
    except typer.Exit:
        typer.secho(
            f"error: {missing}, and the audit log was not adopted: once the keys load, run "
            "`entraide audit checkpoint --adopt`",
            fg=typer.colors.RED,
            err=True,
        )
        raise
    try:
        checkpoint = adopt_from_before_the_record(node, actor=_operator(), schema_before=moved_from)
    except RecordWasKept as exc:
        raise _fail(
            f"{missing}, and the audit log is not adopted by itself: {exc.detail}: {next_step}"
        ) from exc
    except EntraideError as exc:
        raise _fail(
            f"{missing}, and the audit log was not adopted: {exc.detail}; do not start the "
            "node before you know why: restore the last good backup (docs/operations.md §8)"
        ) from exc
    finally:
        node.close()
    return (
        "audit log adopted (the database predates the record of what the log key signed): "
        f"it verified against this node's own signed checkpoints; {anchor.path} now records "
        f"the checkpoint of {checkpoint.size} entries signed over it (audit.log_adopted)"
    )


def _the_log_extends(
    settings: Settings, anchor: SignedLogAnchor, signed: Signed, done: str
) -> None:
    """Fail, in doctor's words, where the log does not extend the record: an older copy of
    the database put back, or one edited. `migrate` said "done" and exited 0 over that while
    doctor failed, and an upgrade script that reads only its exit status went on to start the
    node (from review). The schema stays migrated: nothing is lost, nothing is adopted."""
    from app.db import make_engine
    from app.doctor import SIGNS_NOTHING, log_against_record, rolled_back

    engine = make_engine(settings.database_url)
    try:
        problem = log_against_record(anchor, signed, engine)
    finally:
        engine.dispose()
    if problem is not None:
        raise _fail(f"{done}, but {rolled_back(problem)}; {SIGNS_NOTHING}")


def _upgrade(settings: Settings) -> None:
    """Migrate, or say in plain words why the database cannot be reached (no traceback, no
    password: the URL is shown as `doctor` shows it)."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import OperationalError

    from app.doctor import NEWER_SCHEMA
    from app.migrate import upgrade
    from app.obs.health import unknown_revisions

    try:
        upgrade(settings.database_url)
    except OperationalError as exc:
        raise _unreachable(settings, exc) from exc
    except CommandError as exc:  # "Can't locate revision": a database of a newer version
        newer = unknown_revisions(frozenset(nodeproc.schema_revisions(settings)))
        if not newer:
            raise _fail(f"cannot migrate: {exc}") from exc
        raise _fail(NEWER_SCHEMA.format(revisions=", ".join(sorted(newer)))) from exc


def _check_public_url(public_url: str, settings: Settings) -> None:
    """The URL peers pin and reach: `entraide.example` or a plain-HTTP one were taken, and
    peers then could not pin the node, or would have to allow plain HTTP (from review)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(public_url)
        parts.port  # noqa: B018  # raises on a port that is not a number
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise _fail(
            f"the public URL {public_url!r} is not a URL peers can reach: give it whole, "
            "e.g. https://entraide.mjusticia.example"
        )
    if parts.scheme == "http" and not settings.allow_insecure_http:
        raise _fail(
            f"the public URL {public_url} is plain HTTP: peers need HTTPS (put the node behind "
            "a TLS proxy, docs/operations.md §1); ENTRAIDE_ALLOW_INSECURE_HTTP=true allows it "
            "for development and tests only"
        )


def _refuse_a_used_database(settings: Settings) -> None:
    """New keys over another node's database would leave it unable to open what it received
    or to verify its own audit log (its keys are what made them): refused (from review)."""
    from sqlalchemy import func, select

    from app.db import make_engine
    from app.doctor import redacted_url
    from app.models import AuditEntry

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            entries = connection.scalar(select(func.count()).select_from(AuditEntry)) or 0
    finally:
        engine.dispose()
    if entries:
        raise _fail(
            f"{redacted_url(settings.database_url)} already holds a node's data ({entries} "
            "audit entries): its keys folder is elsewhere, or this is another node's database. "
            "`init` makes a new node: give it a new database (docs/operations.md §2)"
        )


def _unreachable(settings: Settings, exc: OperationalError) -> typer.Exit:
    return _said_failed(nodeproc.unreachable(settings, exc))


@keys_app.command("show")
def keys_show() -> None:
    """Print the node's fingerprint, key ids, and the keys auditors check its log and its
    cosignatures with."""
    from app.audit.checkpoints import log_verifier_key
    from app.audit.cosignature import format_cosigner_key, witness_name
    from app.crypto.encoding import format_time
    from app.crypto.keys import KeyFileError, format_fingerprint, load_identity, load_keys
    from app.node import key_passphrase

    settings = _settings()
    try:
        keys = load_keys(settings.keys_dir, passphrase=key_passphrase(settings))
    except KeyFileError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"signing key id:    {keys.signing_kid}")
    typer.echo(f"encryption key id: {keys.encryption_kid}")
    typer.echo(f"log key id:        {keys.log_kid}")
    typer.echo(f"fingerprint:       {format_fingerprint(keys.fingerprint)}")
    # What a custody proof made before a rotation names (`entraide proof verify --*-kid`).
    for rotation in reversed(keys.rotations):
        typer.echo(
            f"earlier signing:   {rotation.old.signing_kid} "
            f"(until rotation {rotation.seq}, {format_time(rotation.rotated_at)})"
        )
    try:
        authority_id = load_identity(settings.keys_dir).authority_id
    except KeyFileError:
        return  # keys without a node (a restore under way): no key names to give
    # What an auditor passes to `audit verify`: this log's key, and this node's as a witness.
    typer.echo(f"log key:           {log_verifier_key(authority_id, keys.log)}")
    witness_key = format_cosigner_key(witness_name(authority_id), keys.log.verify_key)
    typer.echo(f"witness key:       {witness_key}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = nodeproc.DEFAULT_HOST,
    port: Annotated[
        int, typer.Option(help="Port to listen on", min=0, max=65535)
    ] = nodeproc.DEFAULT_PORT,
) -> None:
    """Run the node: local API, P2P API and the in-process delivery worker."""
    # `entraide serve` in its plain forms runs nodeproc.serve without this module
    # (app/launch.py); here for the rest (a port given as `+8600`, say), the same way.
    try:
        nodeproc.serve(host, port)
    except nodeproc.CommandFailed as exc:
        raise _said_failed(exc) from exc


@app.command()
def worker() -> None:
    """Run a standalone delivery worker (to scale out next to `serve`)."""
    try:
        nodeproc.worker()
    except nodeproc.CommandFailed as exc:
        raise _said_failed(exc) from exc


def _pin_with(pin: Callable[[Session, Node, Settings, httpx.Client], Peer]) -> Peer:
    """Run `pin` (it fetches a peer's identity document) in a unit of work; a refusal ends
    the command with its message."""
    from app.db import unit_of_work
    from app.errors import EntraideError
    from app.peers.client import peer_http_client

    settings = _settings()
    node = _node(settings)
    try:
        with peer_http_client(settings) as http, unit_of_work(node.sessions) as session:
            return pin(session, node, settings, http)
    except EntraideError as exc:
        raise _fail(exc.detail) from exc
    finally:
        node.close()


@peers_app.command("add")
def peers_add(
    url: Annotated[str, typer.Argument(help="The peer's base URL")],
    fingerprint: Annotated[str, typer.Option(help="The fingerprint its operator read to you")],
) -> None:
    """Fetch a peer's identity document, check it against the fingerprint, and pin it."""
    from app.peers.service import add_peer

    peer = _pin_with(
        lambda session, node, settings, http: add_peer(
            session,
            url=url,
            fingerprint=fingerprint,
            own_authority=node.authority_id,
            own_keys=node.keys,
            allow_insecure_http=settings.allow_insecure_http,
            clock_skew=timedelta(seconds=settings.clock_skew_seconds),
            http=http,
            actor=_operator(),
        )
    )
    typer.echo(f"pinned {peer.authority_id} ({peer.name}) at {peer.public_url}")


@peers_app.command("replace-key")
def peers_replace_key(
    url: Annotated[str, typer.Argument(help="The peer's base URL")],
    fingerprint: Annotated[
        str, typer.Option(help="The NEW fingerprint its operator read to you out of band")
    ],
) -> None:
    """A peer's signing key was compromised and it made new keys: pin them, and revoke the
    old ones (they verify nothing new again; what was received under them stays readable)."""
    from app.peers.service import replace_peer_key

    peer = _pin_with(
        lambda session, node, settings, http: replace_peer_key(
            session,
            url=url,
            fingerprint=fingerprint,
            own_keys=node.keys,
            allow_insecure_http=settings.allow_insecure_http,
            clock_skew=timedelta(seconds=settings.clock_skew_seconds),
            http=http,
            actor=_operator(),
        )
    )
    typer.echo(f"replaced the keys of {peer.authority_id}; the old ones are revoked")


@peers_app.command("list")
def peers_list() -> None:
    """List pinned peers (and whether exchanges with them are suspended, and whether they
    run a release that signs its streamed parts)."""
    from app.crypto.keys import format_fingerprint
    from app.db import unit_of_work
    from app.peers.service import list_peers

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            for peer in list_peers(session):
                suspended = (
                    f"\tSUSPENDED since {peer.suspended_at.isoformat(timespec='seconds')}: "
                    f"{peer.suspended_reason}"
                    if peer.suspended_at is not None
                    else ""
                )
                # During a rolling upgrade: which peers still send their parts unsigned.
                unsigned = "\tparts unsigned" if peer.part_signatures_since is None else ""
                typer.echo(
                    f"{peer.authority_id}\t{peer.name}\t{peer.public_url}\t"
                    f"{format_fingerprint(peer.fingerprint)}{suspended}{unsigned}"
                )
    finally:
        node.close()


@peers_app.command("accept-restore")
def peers_accept_restore(
    authority_id: Annotated[str, typer.Argument(help="The peer's authority id, e.g. AR/MPF")],
    reason: Annotated[
        str, typer.Option(help="Who told you of the restore, when, and from which backup")
    ],
    without_anchor: Annotated[
        bool,
        typer.Option(
            help="Take its next checkpoint as a new start, unchecked (a backup older than all "
            "you witnessed, or a log started again from empty): confirm this with its operator"
        ),
    ] = False,
) -> None:
    """The peer's operator told you, out of band, that its node was restored from a backup:
    close the split-view alarms its restored log raised here, and witness its log afresh
    from its next checkpoint. What was witnessed before is kept, set aside; all is audited."""
    from app.audit.witness import accept_restored_log
    from app.db import unit_of_work

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            rebased = accept_restored_log(
                session,
                authority=authority_id,
                reason=reason,
                actor=_operator(),
                require_anchor=not without_anchor,
            )
    finally:
        node.close()
    largest = f" (up to size {rebased.largest[0]})" if rebased.largest is not None else ""
    then = (
        "its new checkpoints must extend one witnessed before (else an alarm again)"
        if rebased.anchor_required
        else "its next checkpoint is witnessed as a new start"
    )
    typer.echo(
        f"{rebased.set_aside} checkpoints of {authority_id} witnessed before are set aside"
        f"{largest}, {rebased.alarms_resolved} alarms closed; {then}"
    )


@peers_app.command("suspend")
def peers_suspend(
    authority_id: Annotated[str, typer.Argument(help="The peer's authority id, e.g. AR/MPF")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit trail)")],
) -> None:
    """Suspend every exchange with a pinned peer: nothing is accepted from it or sent to it
    until `entraide peers resume`. Its pin and keys stay; its queued deliveries wait."""
    from app.db import unit_of_work
    from app.peers.service import suspend_peer

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            suspend_peer(session, authority_id=authority_id, reason=reason, actor=_operator())
    finally:
        node.close()
    typer.echo(
        f"exchanges with {authority_id} are suspended: its envelopes are refused "
        "(its node keeps trying) and deliveries to it wait; "
        f"`entraide peers resume {authority_id}` ends this"
    )


@peers_app.command("resume")
def peers_resume(
    authority_id: Annotated[str, typer.Argument(help="The peer's authority id, e.g. AR/MPF")],
) -> None:
    """Resume exchanges with a peer suspended by `entraide peers suspend`."""
    from app.db import unit_of_work
    from app.peers.service import resume_peer

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            resume_peer(session, authority_id=authority_id, actor=_operator())
    finally:
        node.close()
    typer.echo(f"exchanges with {authority_id} resume: deliveries waiting for it go now")


@clients_app.command("create")
def clients_create(
    name: Annotated[str, typer.Argument(help="A name for the calling system or person")],
    role: Annotated[
        list[Role] | None, typer.Option(help="Role; repeat to grant several explicitly")
    ] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="The token expires after this long: 90d, 12h, 30m")
    ] = None,
    expires_at: Annotated[
        datetime | None, typer.Option(help="Or at this time (ISO 8601, UTC if no offset)")
    ] = None,
) -> None:
    """Create an API client. The token is printed once, alone on the last line."""
    from app.audit.log import record
    from app.auth.service import create_client
    from app.db import unit_of_work
    from app.errors import EntraideError

    roles = set(role or [Role.OFFICER])
    try:
        expiry = cli_security.parse_expiry(expires_in, expires_at)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            client, token = create_client(session, name=name, roles=roles, expires_at=expiry)
            record(
                session,
                actor=_operator(),
                action="client.created",
                details={
                    "client": name,
                    "roles": client.roles,
                    "expires_at": expiry.isoformat() if expiry else None,
                },
            )
    except EntraideError as exc:
        raise _fail(exc.detail) from exc
    finally:
        node.close()
    typer.echo(f"created API client {name} with roles {client.roles}; the token follows,")
    typer.echo("shown only this once (store it in the calling system's secret store):")
    typer.echo(token)


@clients_app.command("list")
def clients_list() -> None:
    """List API clients (never their tokens)."""
    from sqlalchemy.exc import OperationalError

    from app.auth.service import list_clients
    from app.crypto.encoding import utc_now
    from app.db import undecodable_column, unit_of_work
    from app.errors import StoredDataCorrupt
    from app.oneline import one_line

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            now = utc_now()
            clients = list_clients(session)
    except OperationalError as exc:
        column = undecodable_column(exc)
        if column is None:
            raise
        # One line naming the column, never a traceback quoting the damaged value (from
        # review).
        raise _fail(StoredDataCorrupt.of_column(column).detail) from exc
    finally:
        node.close()
    for client in clients:
        state = "revoked" if client.revoked_at else "active"
        if not client.revoked_at and client.expires_at and client.expires_at <= now:
            state = "expired"
        expiry = client.expires_at.isoformat(timespec="seconds") if client.expires_at else "never"
        # one_line: a name made before names were checked may hold anything.
        name = one_line(client.name)
        typer.echo(f"{name}\t{client.roles}\t{state}\texpires {expiry}")


@clients_app.command("revoke")
def clients_revoke(name: Annotated[str, typer.Argument()]) -> None:
    """Revoke an API client's token: running nodes refuse it within a second."""
    from app.audit.log import record
    from app.auth.service import revoke_client
    from app.db import unit_of_work
    from app.errors import EntraideError

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            revoke_client(session, name=name)
            record(session, actor=_operator(), action="client.revoked", details={"client": name})
    except EntraideError as exc:
        raise _fail(exc.detail) from exc
    finally:
        node.close()
    typer.echo(f"revoked {name}")


# Bounded as the API bounds it: past the column's range, PostgreSQL raised a traceback where
# SQLite said "no delivery" (from review). outbox.MAX_ID, not imported: commands load lazily.
DeliveryIdArgument = Annotated[int, typer.Argument(min=1, max=2**31 - 1)]


@deliveries_app.command("list")
def deliveries_list(
    state: Annotated[str | None, typer.Option(help="queued, in_flight, retry, failed, ...")] = None,
    stuck_minutes: Annotated[
        int | None,
        typer.Option(help="Only undelivered rows queued longer than this", min=0, max=525_600),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows", min=1, max=10_000)] = 50,
) -> None:
    """List deliveries, newest first: id, state, attempts, peer, request, last error."""

    from app.db import unit_of_work
    from app.delivery.admin import list_deliveries
    from app.delivery.outbox import STATES

    if state is not None and state not in STATES:
        raise _fail(f"no state {state!r}: one of {', '.join(STATES)}")  # not silently nothing
    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            stuck = timedelta(minutes=stuck_minutes) if stuck_minutes is not None else None
            rows, _ = list_deliveries(
                session, state=state, stuck_for=stuck, peer=None, limit=limit, before=None
            )
            for row in rows:
                item = row.item
                typer.echo(
                    f"{item.id}\t{item.state}\t{item.attempts}\t{item.peer_authority}\t"
                    f"{row.message.request_id}\t{item.last_error or ''}"
                )
    finally:
        node.close()


def _delivery_action(delivery_id: int, action: str) -> None:
    from app.db import unit_of_work
    from app.delivery.admin import cancel_delivery, retry_delivery
    from app.errors import EntraideError

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            operation = retry_delivery if action == "retry" else cancel_delivery
            item = operation(session, delivery_id=delivery_id, actor=_operator())
            typer.echo(f"delivery {item.id} is now {item.state}")
            if action == "cancel":
                typer.echo(_cancelled_says(session, item))
    except EntraideError as exc:
        raise _fail(exc.detail) from exc
    finally:
        node.close()


def _cancelled_says(session: Session, item: OutboxItem) -> str:
    """What a cancel did beyond the delivery: the request's status, and whether the peer
    may hold the message all the same (docs/domain.md, "The life of a request"), as the
    cancel's own audit entries say."""
    from sqlalchemy import select

    from app.delivery.outbox import peer_may_hold
    from app.models import AuditEntry, Message

    msg_id = session.scalar(select(Message.msg_id).where(Message.id == item.message_id))
    said = session.scalar(
        select(AuditEntry.outcome)
        .where(
            AuditEntry.msg_id == msg_id,
            AuditEntry.action.in_(("request.move_undone", "request.move_kept")),
        )
        .order_by(AuditEntry.idx.desc())
        .limit(1)
    )
    if item.move_undone_at is not None:
        return (
            f"the request's status is put back: {item.moved_to} -> {item.moved_from} (the peer "
            "never had the message); send it again as a new message if it is still meant"
        )
    if said == "peer_has_it":
        return "the peer has the message (it replied to it): the request's status stays"
    if said == "later_messages":
        return (
            "the request's status stays as the message left it: a message sent after it was "
            "judged from there"
        )
    if peer_may_hold(session, item.id):
        return (
            "an earlier attempt may have reached the peer: it may hold the message, and the "
            "request's status stays as the message left it"
        )
    return "the peer never had the message"


@deliveries_app.command("retry")
def deliveries_retry(delivery_id: DeliveryIdArgument) -> None:
    """Make a waiting or failed delivery due now."""
    _delivery_action(delivery_id, "retry")


@deliveries_app.command("cancel")
def deliveries_cancel(delivery_id: DeliveryIdArgument) -> None:
    """Stop trying to deliver. A message that never reached the peer puts its request's
    status back to where it was before it; says so, or that the peer may hold it."""
    _delivery_action(delivery_id, "cancel")


@audit_app.command("checkpoint")
def audit_checkpoint(
    adopt: Annotated[
        bool,
        typer.Option(
            "--adopt",
            help="With no record of what the log key signed (a node from before the record, "
            "or the record lost): verify the log, then record and sign its head",
        ),
    ] = False,
    accept_without_mac: Annotated[
        bool,
        typer.Option(
            "--accept-without-mac",
            help="Entries after the latest checkpoint that carry no MAC (appended by a process "
            "of an earlier version left running through an upgrade): show them, and with "
            "--yes give them their MACs, on record, and sign",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="accept the entries shown")] = False,
) -> None:
    """Sign a checkpoint of the audit log now and print it."""
    from app.audit.adopt import adopt_log
    from app.audit.checkpoints import sign_checkpoint
    from app.db import unit_of_work
    from app.errors import EntraideError

    if adopt and accept_without_mac:
        raise _fail("give --adopt or --accept-without-mac, not both")
    node = _node(_settings())
    try:
        if adopt:
            note = adopt_log(node, actor=_operator()).note
        elif accept_without_mac:
            note = _accept_without_mac(node, yes=yes)
        else:
            with unit_of_work(node.sessions) as session:
                note = sign_checkpoint(
                    session,
                    authority_id=node.authority_id,
                    log_key=node.keys.log,
                    anchor=node.log_anchor,
                ).note
    except EntraideError as exc:
        raise _fail(exc.detail) from exc
    finally:
        node.close()
    typer.echo(note, nl=False)


def _accept_without_mac(node: Node, *, yes: bool) -> str:
    """The way out of an upgrade during which a process of the earlier version appended after
    this version's first checkpoint (docs/operations.md §7): its entries carry no MAC, and no
    checkpoint is signed over them. The log must verify in every other way (links, signed
    checkpoints, the head against the entries, the record of what was signed); an entry whose
    MAC does not match is never accepted. The operator, who holds the keys and so could MAC
    anything, sees each entry and accepts them with --yes: on record, then signed."""
    from sqlalchemy import LargeBinary, cast, select, update

    from app.audit.checkpoints import latest_signed, log_verifier, sign_checkpoint
    from app.audit.log import lock_head, record
    from app.audit.mac import mac_key, mac_matches, macs_of
    from app.audit.service import verify_database
    from app.db import read_snapshot, unit_of_work
    from app.models import AuditEntry
    from app.oneline import one_line

    with read_snapshot(node.sessions) as session:
        # Everything but the MACs (no key given): those are looked at below, one by one.
        report = verify_database(
            session,
            authority_id=node.authority_id,
            log_public=node.keys.log_public,
            anchor=node.log_anchor,
        )
    if report.first is not None:
        raise _fail(
            f"the audit log does not verify, so nothing is accepted: entry {report.first.idx}: "
            f"{report.first.message}"
        )
    key = mac_key(node.keys.log)
    with unit_of_work(node.sessions) as session:
        head = lock_head(session)
        if (head.size, head.root_hash) != (report.entries, report.root):
            raise _fail("the audit log changed while it was verified: run the command again")
        latest = latest_signed(session, log_verifier(node.authority_id, node.keys.log_public))
        rows = session.execute(
            select(
                AuditEntry.idx,
                cast(AuditEntry.entry, LargeBinary),
                cast(AuditEntry.mac, LargeBinary),  # as bytes, even rewritten as text
            )
            .where(AuditEntry.idx >= (0 if latest is None else latest.size))
            .order_by(AuditEntry.idx)
        ).all()
        for idx, entry, mac in rows:
            if mac is not None and not mac_matches(key, bytes(entry), bytes(mac)):
                raise _fail(
                    f"entry {idx} carries a MAC that does not match: it was rewritten without "
                    "the log key, and is not accepted (restore the last backup)"
                )
        missing = [(int(idx), bytes(entry)) for idx, entry, mac in rows if mac is None]
        if not missing:
            raise _fail("every entry after the latest checkpoint carries its MAC: none to accept")
        for idx, entry in missing:
            shown = json.loads(entry)
            typer.echo(
                one_line(
                    f"entry {idx}  {shown.get('time')}  {shown.get('actor')}  "
                    f"{shown.get('action')}  {shown.get('outcome')}"
                ),
                err=True,
            )
        if not yes:
            raise _fail(
                f"{len(missing)} entries above carry no MAC: if they are what your node's "
                "processes did, run again with --yes to accept them"
            )
        for idx, entry in missing:
            session.execute(
                update(AuditEntry).where(AuditEntry.idx == idx).values(mac=macs_of(key, entry))
            )
        record(
            session,
            actor=_operator(),
            action="audit.entries_accepted",
            details={"first": missing[0][0], "last": missing[-1][0], "count": len(missing)},
        )
        return sign_checkpoint(
            session, authority_id=node.authority_id, log_key=node.keys.log, anchor=node.log_anchor
        ).note


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option(help="Folder to write the export into")],
) -> None:
    """Write the entries, the signed checkpoints and the public log key for an auditor."""
    from app.audit.log import record
    from app.audit.service import export_log
    from app.db import unit_of_work

    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            exported = export_log(session, node, out)
            record(
                session,
                actor=_operator(),
                action="audit.exported",
                details={"entries": exported.entries, "checkpoints": exported.checkpoints},
            )
    finally:
        node.close()
    for row in exported.unreadable:
        typer.echo(
            f"checkpoint row {row}: its note cannot be read (damaged storage), left out; "
            "run `entraide audit verify --db`",
            err=True,
        )
    typer.echo(
        f"exported {exported.entries} entries and {exported.checkpoints} checkpoints to {out}"
    )


@proof_app.command("verify")
def proof_verify(
    proof: Annotated[
        Path, typer.Argument(help="A custody proof (GET .../messages/{msg_id}/proof)")
    ],
    file: Annotated[
        Path | None, typer.Option(help="A file to check against an attachment of the proof")
    ] = None,
    attachment: Annotated[int, typer.Option(help="Which attachment --file should be (from 1)")] = 1,
    sender_kid: Annotated[
        str | None,
        typer.Option(
            help="The sender's signing key id, or its fingerprint, as its authority "
            "publishes them (`entraide keys show`)"
        ),
    ] = None,
    receiver_kid: Annotated[
        str | None,
        typer.Option(
            help="The receiver's signing key id, or its fingerprint, as its authority "
            "publishes them (`entraide keys show`)"
        ),
    ] = None,
) -> None:
    """Check a custody proof offline (no node, no database, no key of yours): the sender's
    signature, the sealed manifest, the receiver's signed receipt; with --file, that the file
    is that attachment; with --sender-kid and --receiver-kid, that the keys are those the
    authorities publish. Exit 1 naming the first check that fails."""
    from app.crypto.encoding import format_time
    from app.crypto.keys import fingerprint, format_fingerprint
    from app.crypto.proof import MAX_PROOF_BYTES, ProofError, verify_proof

    try:
        with proof.open("rb") as handle:
            raw = handle.read(MAX_PROOF_BYTES + 1)
        if len(raw) > MAX_PROOF_BYTES:
            raise _fail(f"{proof} is larger than a custody proof can be")
        checked = verify_proof(json.loads(raw))
    except (OSError, ValueError, RecursionError) as exc:  # ProofError is a ValueError
        kind = "not a custody proof" if not isinstance(exc, ProofError) else "REFUSED"
        raise _fail(f"{proof}: {kind}: {str(exc)[:300]}") from exc
    for role, given, kid, key in (
        ("sender", sender_kid, checked.sender_kid, checked.sender_key),
        ("receiver", receiver_kid, checked.receiver_kid, checked.receiver_key),
    ):
        if given is not None and not _is_key(given, kid, key):
            raise _fail(
                f"{proof}: REFUSED: the {role}'s key id is {kid} (fingerprint "
                f"{format_fingerprint(fingerprint(key))}), not {given.strip()}"
            )
    # The file before a word is printed: "verified" on the output, then a refusal on the
    # error stream, read as verified by a script that reads the output (from review).
    file_sha256 = _file_sha256(file) if file is not None else None
    if file_sha256 is not None and not checked.attachment_matches(attachment, file_sha256):
        raise _fail(f"{file} (SHA-256 {file_sha256}) is NOT attachment {attachment} of this proof")
    typer.echo(f"custody proof of message {checked.msg_id}: verified")
    typer.echo(f"  envelope hash   {checked.envelope_hash}")
    typer.echo(
        f"  sent by         {checked.sender} on {format_time(checked.created_at)}, "
        f"signing key id {checked.sender_kid}"
    )
    typer.echo(
        f"  received by     {checked.receiver} on {format_time(checked.received_at)}, "
        f"signing key id {checked.receiver_kid}"
    )
    for item in checked.attachments:
        # The sender's names, quoted and escaped: control or bidi characters in one could
        # otherwise print a false size or hash on the line (from review).
        typer.echo(
            f"  attachment {item.index}    {json.dumps(item.name)} ({json.dumps(item.media_type)})"
            f", {item.size} bytes, SHA-256 {item.sha256}"
        )
    if sender_kid is None or receiver_kid is None:
        typer.echo(
            "Key ids NOT checked: compare both with those the two authorities publish "
            "(`entraide keys show`), or give --sender-kid and --receiver-kid; the proof "
            "cannot say whose keys they are."
        )
    else:
        typer.echo("Both keys are those given.")
    if file_sha256 is not None:
        typer.echo(f"{file} is attachment {attachment}: SHA-256 {file_sha256}")


def _is_key(given: str, kid: str, key: bytes) -> bool:
    """Whether `given` names the key: its key id, or its fingerprint as operators read it
    out (grouped, any case), which they exchange when they pin each other (from review: a
    fingerprint read out by phone got a REFUSED on a valid proof)."""
    from app.crypto.keys import fingerprint, fingerprints_match, normalise_fingerprint

    if len(normalise_fingerprint(given)) == len(fingerprint(key)):
        return fingerprints_match(given, fingerprint(key))
    return hmac.compare_digest(given.strip().lower().encode(), kid.encode())


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    try:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _check_trusted_log_key(node: Node, given: str) -> None:
    """`audit verify --db --log-key K`: the node's checkpoints are signed with the key in
    its keys folder, which an insider can replace; K is the key the auditor trusts (from an
    earlier audit, the node's identity document when it was pinned). It was ignored with
    --db (from review: any key, even garbage, verified)."""
    from app.audit.checkpoints import log_verifier
    from app.audit.note import MalformedKey, parse_verifier_key

    try:
        trusted = parse_verifier_key(given.strip())
    except MalformedKey as exc:
        raise _fail(f"--log-key is not a log verifier key (name+keyid+key): {exc}") from exc
    own = log_verifier(node.authority_id, node.keys.log_public)
    if trusted.name != own.name:
        raise _fail(f"--log-key is the key of log {trusted.name}; this node's log is {own.name}")
    if not hmac.compare_digest(trusted.public_key, own.public_key):
        typer.secho(
            f"FAILED: this node's log key (key id {own.key_id.hex()}) is not the one you "
            f"trust (key id {trusted.key_id.hex()}): its checkpoints are not signed by that "
            "key. A log key never changes (`keys rotate` keeps it): the key file was "
            "replaced, or this is not the node you audited",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)


@audit_app.command("verify")
def audit_verify(
    folder: Annotated[Path | None, typer.Argument(help="An export folder")] = None,
    db: Annotated[bool, typer.Option("--db", help="Verify the live database instead")] = False,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(
            help="A checkpoint note saved earlier (repeat for several): the log must extend "
            "every one"
        ),
    ] = None,
    log_key: Annotated[
        str | None, typer.Option(help="The log's verifier key, to use instead of the export's")
    ] = None,
    cosigned: Annotated[
        list[Path] | None,
        typer.Option(
            help="A checkpoint of this log cosigned by a witness (its answer to GET "
            "/p2p/v1/audit/cosignature): the cosignature must verify and the log extend it"
        ),
    ] = None,
    witness_key: Annotated[
        list[str] | None,
        typer.Option(help="A witness's key (`entraide keys show` on the witness's node)"),
    ] = None,
) -> None:
    """Check an exported (or the live) audit log; exit 1 naming the first bad entry."""
    from app.audit.mac import mac_key
    from app.audit.note import NoteError
    from app.audit.service import verify_database, verify_export
    from app.db import read_snapshot

    # Every one given is checked: an option given twice kept only the last, so a rewritten
    # log re-signed by its node passed beside the current checkpoint (from review).
    earlier = _saved_checkpoints(checkpoint or [])
    if db == (folder is not None):
        raise _fail("give either an export folder or --db")
    if db:
        node = _node(_settings(), another_nodes_database=True)
        try:
            if log_key is not None:
                _check_trusted_log_key(node, log_key)
            witnessed = _cosigned_checkpoints(
                cosigned or [], witness_key or [], log_public=node.keys.log_public
            )
            extends = [*earlier, *((item.label, item.note) for item in witnessed)]
            # A snapshot that holds off no writer: the node goes on serving while it runs.
            with read_snapshot(node.sessions) as session:
                report = verify_database(
                    session,
                    authority_id=node.authority_id,
                    log_public=node.keys.log_public,
                    extends=extends,
                    anchor=node.log_anchor,
                    mac_key=mac_key(node.keys.log),
                )
        finally:
            node.close()
    else:
        assert folder is not None  # noqa: S101  # checked just above
        witnessed = _cosigned_checkpoints(
            cosigned or [], witness_key or [], log_public=_export_log_key(folder, log_key)
        )
        extends = [*earlier, *((item.label, item.note) for item in witnessed)]
        try:
            report = verify_export(folder, extends=extends, log_key=log_key)
        except (OSError, ValueError, KeyError, NoteError) as exc:
            raise _fail(f"cannot read the export: {exc}") from exc
    if report.first is not None:
        first = report.first
        typer.secho(f"FAILED: {first.message}", fg=typer.colors.RED, err=True)
        for problem in sorted(report.problems)[1:20]:
            typer.echo(f"  also: {problem.message}", err=True)
        raise typer.Exit(code=1)
    typer.echo(
        f"OK: {report.entries} entries, {report.checkpoints} signed checkpoints, "
        f"root {report.root.hex()}"
    )
    if report.entries > report.signed:  # a live log: its newest entries await a checkpoint
        unsigned = report.entries - report.signed
        vouched = (
            "each carries its MAC"
            if not report.without_mac
            else f"{report.without_mac} of them appended before MACs, with none"
        )
        typer.echo(
            f"  {unsigned} entries after the newest checkpoint (size {report.signed}) are not "
            f"signed yet ({vouched})"
        )
    for item in witnessed:
        for found in item.cosignatures:
            typer.echo(
                f"  {item.source}: cosigned by {found.name} at "
                f"{found.time.isoformat(timespec='seconds')}; the log extends it"
            )


def _saved_checkpoints(paths: list[Path]) -> list[tuple[str, str]]:
    """Each `--checkpoint` note with the label the verifier names it by: "the earlier
    checkpoint", or with its file's name when there are several."""
    saved = []
    for path in paths:
        try:
            note = path.read_text()
        except (OSError, UnicodeError) as exc:
            raise _fail(f"cannot read the checkpoint {path}: {exc}") from exc
        label = "the earlier checkpoint" if len(paths) == 1 else f"the checkpoint in {path.name}"
        saved.append((label, note))
    return saved


@audit_app.command("check-entry")
def audit_check_entry(
    proof: Annotated[
        Path, typer.Argument(help="The answer of GET /api/v1/audit/proofs/inclusion, saved")
    ],
    checkpoint: Annotated[
        Path,
        typer.Option(help="A checkpoint of the log (GET /api/v1/audit/checkpoint), saved"),
    ],
    log_key: Annotated[
        str, typer.Option(help="The log's verifier key, as you hold it (not the node's word)")
    ],
) -> None:
    """Check one audit entry offline: that the log the checkpoint signs holds it at its
    index. Prints the entry; exit 1 naming what does not hold."""
    from app.audit.entry_proof import EntryProofError, check_entry
    from app.audit.note import NoteError, parse_verifier_key

    try:
        verifier = parse_verifier_key(log_key.strip())
    except NoteError as exc:
        raise _fail(f"--log-key is not a log verifier key (name+keyid+key): {exc}") from exc
    try:
        document = json.loads(proof.read_bytes())
        note = _note_in(checkpoint.read_text())
    except (OSError, UnicodeError, ValueError, RecursionError) as exc:
        raise _fail(f"cannot read the proof or the checkpoint: {str(exc)[:300]}") from exc
    try:
        proven = check_entry(document, note, verifier)
    except EntryProofError as exc:
        raise _fail(f"REFUSED: {exc}") from exc
    typer.echo(
        f"entry {proven.index} is in the log of {proven.size} entries that {verifier.name} signed:"
    )
    # Escaped, on one line: the entry's texts are the node's and its callers'.
    typer.echo(json.dumps(proven.entry, sort_keys=True))


@dataclass(frozen=True)
class _Witnessed:
    source: str  # the file's name
    label: str  # how the verifier names it
    note: str
    cosignatures: list[Cosigned]


def _export_log_key(folder: Path, log_key: str | None) -> bytes | None:
    """The public key of the log an export is checked against: `--log-key`, else the
    export's own (None if neither reads: `verify_export` then says why)."""
    from app.audit.note import NoteError, parse_verifier_key
    from app.audit.service import EXPORT_KEY

    try:
        return parse_verifier_key(log_key or (folder / EXPORT_KEY).read_text().strip()).public_key
    except (OSError, UnicodeError, NoteError):
        return None


def _cosigned_checkpoints(
    files: list[Path], keys: list[str], *, log_public: bytes | None
) -> list[_Witnessed]:
    """Each `--cosigned` note with its label and its verified cosignatures; exit 1 (as a
    failed verification) when one carries no valid cosignature by the witness keys given.
    A witness key that is the log's own (`log_public`) is refused before any is checked."""
    from app.audit.cosignature import check_cosignatures, parse_cosigner_key, refuse_the_log_key
    from app.audit.note import NoteError

    if bool(files) != bool(keys):
        raise _fail(
            "--cosigned and --witness-key go together: the notes, and whose "
            "cosignatures to check on them"
        )
    try:
        cosigners = [parse_cosigner_key(key) for key in keys]
    except NoteError as exc:
        raise _fail(f"cannot read the witness key: {exc}") from exc
    if log_public is not None:
        try:
            refuse_the_log_key(cosigners, log_public)
        except NoteError as exc:
            raise _fail(str(exc)) from exc
    found: list[_Witnessed] = []
    for path in files:
        try:
            note = _note_in(path.read_text())
        except (OSError, UnicodeError, ValueError) as exc:
            raise _fail(f"cannot read the cosigned checkpoint {path}: {exc}") from exc
        try:
            cosignatures = check_cosignatures(note, cosigners)
        except NoteError as exc:
            typer.secho(f"FAILED: {path}: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from exc
        names = " and ".join(sorted({item.name for item in cosignatures}))
        label = f"the checkpoint in {path.name} cosigned by {names}"
        found.append(_Witnessed(path.name, label, note, cosignatures))
    return found


def _note_in(text: str) -> str:
    """A note as saved from the witness's answer: the JSON `{"note": ...}` or the note."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        document = json.loads(text)
    except RecursionError as exc:  # a traceback, not an answer (from review)
        raise ValueError("JSON nested too deeply to be a witness's answer") from exc
    note = document.get("note") if isinstance(document, dict) else None
    if not isinstance(note, str):
        raise ValueError('a JSON answer without a "note"')
    return note


def _exit_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signal.SIGTERM)


@app.command()
def backup(
    out: Annotated[Path, typer.Option(help="The backup file to write (refuses to overwrite)")],
    include_private_keys: Annotated[
        bool,
        typer.Option(
            help="Also the private keys, sealed under a passphrase (see --passphrase-file)"
        ),
    ] = False,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(help="File holding the passphrase (else ENTRAIDE_BACKUP_PASSPHRASE)"),
    ] = None,
) -> None:
    """Write the database, the node's identity and public keys (and, if asked, its private
    keys) to one file. Safe while the node runs."""
    from sqlalchemy.exc import OperationalError

    from app.backup.sealed import PassphraseError, read_passphrase
    from app.backup.service import BackupError, create_backup
    from app.crypto.keys import KeyFileError
    from app.db import undecodable_column
    from app.errors import StoredDataCorrupt

    settings = _settings()
    _sqlite_file_exists(settings)  # else a backup of an empty database it just created
    # Stopped by a timer's or systemd's SIGTERM: unwound like an error, so that its staging
    # folder (a whole copy of the database) and partial file are removed, not left hidden in
    # the backups folder (from review).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        passphrase = read_passphrase(passphrase_file) if include_private_keys else None
        summary = create_backup(
            settings,
            out=out,
            include_private_keys=include_private_keys,
            passphrase=passphrase,
            actor=_operator(),
        )
    except (BackupError, PassphraseError, KeyFileError, OSError, ValueError) as exc:
        raise _fail(_said(exc)) from exc
    except OperationalError as exc:
        column = undecodable_column(exc)
        if column is not None:  # damage the node itself met (its checkpoint), not the copy
            damage = StoredDataCorrupt.of_column(column).detail
            raise _fail(
                f"the backup's audit entry could not be written: {damage}; run `entraide "
                "doctor` and `entraide audit verify --db`"
            ) from exc
        raise _unreachable(settings, exc) from exc
    rows = sum(summary.tables.values())
    keys = "with the private keys (sealed)" if summary.private_keys else "without private keys"
    typer.echo(
        f"backup written to {summary.path}: {len(summary.tables)} tables, {rows} rows, {keys}"
    )
    # Told, not refused: a copy of a damaged database is what its operator needs most.
    for found in summary.damaged:
        row = ", ".join(f"{key}={value}" for key, value in found["row"].items())
        typer.secho(
            f"damaged: {found['table']} row {row or '?'}, column {found['column']}: text that "
            "is not UTF-8, which the node cannot read; copied as its raw bytes (listed in the "
            "manifest's database.damaged): the database was altered or damaged, run "
            "`entraide doctor`",
            err=True,
        )
    if not summary.checkpoint:
        typer.secho(
            "the backup holds no signed checkpoint: the database is behind this version's "
            "schema (run `entraide migrate`, then `entraide audit verify --db`), or its audit "
            "log could not take an entry (run `entraide audit verify --db`)",
            err=True,
        )


@app.command()
def restore(
    file: Annotated[Path, typer.Argument(help="A file written by `entraide backup`")],
    passphrase_file: Annotated[
        Path | None,
        typer.Option(help="File holding the passphrase (else ENTRAIDE_BACKUP_PASSPHRASE)"),
    ] = None,
    keys_from: Annotated[
        Path | None,
        typer.Option(
            help="A backup of this node made with --include-private-keys, for its keys, when "
            "FILE has none and the keys folder is empty (a nightly backup on a new machine)"
        ),
    ] = None,
    move_log_back: Annotated[
        bool,
        typer.Option(
            "--move-log-back",
            help="The keys folder's record says the log key signed more than the backup "
            "holds: move it back to the backup (this node is being put back; never with a "
            "live node's keys folder)",
        ),
    ] = False,
) -> None:
    """Restore a backup into a fresh node (empty database; empty keys folder or the node's
    own keys), then verify the whole audit log."""
    from sqlalchemy.exc import OperationalError

    from app.backup.sealed import PassphraseError, read_passphrase
    from app.backup.service import BackupError, restore_backup
    from app.crypto.keys import KeyFileError

    settings = _settings()
    # Stopped (systemd, `timeout`), it unwinds as on Ctrl-C: the folder where it unseals the
    # keys goes with it, not left holding them (from review).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        summary = restore_backup(
            settings,
            archive_path=file,
            passphrase=read_passphrase(passphrase_file, choosing=False),
            actor=_operator(),
            keys_from=keys_from,
            move_log_back=move_log_back,
        )
    except (BackupError, PassphraseError, KeyFileError, OSError, ValueError) as exc:
        raise _fail(_said(exc)) from exc
    except OperationalError as exc:
        raise _unreachable(settings, exc) from exc
    rows = sum(summary.tables.values())
    typer.echo(f"restored {summary.authority_id}: {len(summary.tables)} tables, {rows} rows")
    # What the backup said was damaged is damaged still: said again here, where it lands
    # (from review: into PostgreSQL, bytes that are not UTF-8 became a plausible text, the
    # `\x...` of those bytes, and nothing said so; doctor cannot tell it from a value).
    postgresql = not settings.database_url.startswith("sqlite")
    for found in summary.damaged:
        where = ", ".join(f"{key}={value}" for key, value in dict(found.get("row") or {}).items())
        typer.secho(
            f"damaged: {found.get('table')} row {where or '?'}, column {found.get('column')}: "
            "copied by the backup as the raw bytes of text that was not UTF-8, and restored "
            + (
                "as the text `\\x...` of those bytes (PostgreSQL holds no text that is not "
                "UTF-8): not the value it was; put it right from an older backup"
                if postgresql
                else "as those bytes: the node cannot read the row until it is put right "
                "(`entraide doctor` names it)"
            ),
            err=True,
        )
    report = summary.report
    if report.first is not None:
        typer.secho(f"audit log FAILED verification: {report.first.message}", err=True)
        recorded = (
            "the restore is recorded in the log as having failed (node.restored, log_failed)"
            if summary.recorded
            else "the log is too damaged to record the restore in it"
        )
        typer.echo(
            f"{recorded}; keep the backup as evidence, and do not start the node before you "
            "know why",
            err=True,
        )
        raise typer.Exit(code=1)
    typer.echo(
        f"audit log verified: {report.entries} entries, {report.checkpoints} signed checkpoints; "
        "the restore is recorded in it"
    )
    typer.echo(
        "before you start the node, tell your peers' operators that you restored it, and from "
        "when: a peer that witnessed your log after this backup (each receipt your node gave "
        "carried it) will report a split view (docs/operations.md §5)"
    )
    typer.echo(
        f"then take back from each peer what you exchanged after this backup "
        f"({summary.backup_created_at}): `entraide peers recover --all` (or PEER by PEER), "
        "before you start the node (docs/operations.md §5)"
    )
    drafts, pending = _unsettled_at_backup(settings)
    if drafts or pending:
        # What the backup cannot know the end of: a draft submitted since is held by its peer
        # under the same id, which refuses it again as `replayed` (from a backup review).
        typer.echo(
            f"when the backup was taken, {drafts} evidence drafts were open and {pending} "
            "deliveries had not been receipted: ask the peers' operators what they hold of "
            "them before submitting or retrying any (`entraide deliveries list`)"
        )


def _unsettled_at_backup(settings: Settings) -> tuple[int, int]:
    from sqlalchemy import func, select

    from app.db import make_engine
    from app.models import EvidenceDraft, OutboxItem

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            drafts = connection.scalar(select(func.count()).where(EvidenceDraft.state == "open"))
            pending = connection.scalar(
                select(func.count()).where(OutboxItem.state.in_(("queued", "in_flight", "retry")))
            )
    finally:
        engine.dispose()
    return int(drafts or 0), int(pending or 0)


@app.command()
def doctor() -> None:
    """Check the configuration, keys, database, peers and clocks; say what is wrong."""
    from pydantic import ValidationError

    from app.config import Settings
    from app.doctor import FAIL, diagnose

    try:
        settings = Settings()
    except ValidationError as exc:
        for line in nodeproc.setting_problems(exc):
            typer.echo(f"FAIL  configuration   {line}")
        raise typer.Exit(code=1) from exc
    findings = diagnose(settings)
    for finding in findings:
        typer.echo(f"{finding.level:<5} {finding.area:<16} {finding.message}")
    failures = sum(finding.level == FAIL for finding in findings)
    if failures:
        typer.echo(f"{failures} problem(s) found.")
        raise typer.Exit(code=1)
    typer.echo("No problem found.")


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Keep the nodes' files here instead of a temp dir")
    ] = None,
) -> None:
    """Start two real nodes and walk a request through its exchange, printing a timeline."""
    from app.demo import run_demo

    sys.exit(run_demo(workdir))


def main() -> None:
    nodeproc.prepare_process()
    app()

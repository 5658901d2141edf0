"""`entraide` commands for key management and peer trust (registered by app.cli).

entraide keys rotate [--overlap-days N]     new signing and encryption keys, vouched
                                            for by the old signing key
entraide keys protect                       encrypt the key files under the passphrase
entraide peers refresh AUTHORITY            follow a peer's signed key rotation now
entraide peers pin-cert AUTHORITY ...       pin the peer's TLS client certificate
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.crypto.encoding import utc_now

if TYPE_CHECKING:
    from app.config import Settings
    from app.crypto.keys import NodeIdentity, NodeKeys

# Each command imports what it needs when it runs (see app.cli).

DURATION = re.compile(r"([0-9]{1,6})([smhd]?)")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_expiry(expires_in: str | None, expires_at: datetime | None) -> datetime | None:
    """`--expires-in 90d` (s, m, h, d; bare seconds) or `--expires-at` an ISO time."""
    if expires_in is not None and expires_at is not None:
        raise ValueError("give --expires-in or --expires-at, not both")
    if expires_in is not None:
        match = DURATION.fullmatch(expires_in.strip())
        if match is None or int(match.group(1)) == 0:
            raise ValueError(f"{expires_in!r} is not a duration like 90d, 12h, 30m or 3600")
        return utc_now() + timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])
    if expires_at is not None:
        moment = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=utc_now().tzinfo)
        if moment <= utc_now():
            raise ValueError("--expires-at is in the past")
        return moment
    return None


def keys_rotate(
    overlap_days: Annotated[
        int,
        typer.Option(
            min=0,
            max=365,
            help="Days during which envelopes sealed to the old encryption key are still "
            "accepted from peers that have not yet seen the rotation",
        ),
    ] = 30,
) -> None:
    """Replace the signing and encryption keys; the old signing key signs the new ones.

    A running node (serve, workers) takes the new keys up at its next use of them, without
    a restart; the command then reads the node's identity document and says whether it
    did. Peers pick them up at their next contact; the old encryption key is kept,
    protected like the others, so archived requests stay readable.
    """
    from app.audit.mac import append_with
    from app.audit.rotations import record_rotations
    from app.cli import _fail, _node, _operator, _settings
    from app.crypto.keyfile import KeyFileError
    from app.crypto.keys import format_fingerprint, keys_folder_lock, load_identity, rotate_keys
    from app.crypto.rotation import RotationError
    from app.db import make_engine, make_session_factory, unit_of_work
    from app.node import key_passphrase

    settings = _settings()
    node = _node(settings)  # keys readable, schema current
    node.close()
    try:
        identity = load_identity(settings.keys_dir)
        passphrase = key_passphrase(settings)
    except (KeyFileError, OSError) as exc:
        raise _fail(str(exc)) from exc
    # The folder's lock from the rotation to its entry: a running node that loads the new
    # keys meanwhile finds the entry and writes none of its own (app/audit/rotations.py).
    with keys_folder_lock(settings.keys_dir):
        try:
            old, new = rotate_keys(
                settings.keys_dir,
                authority_id=identity.authority_id,
                passphrase=passphrase,
                overlap=timedelta(days=overlap_days),
            )
        except (KeyFileError, RotationError, OSError) as exc:
            # RotationError: the chain's length limit, say; nothing was written.
            raise _fail(str(exc)) from exc
        # The database alone, not the node (its keys again: an Argon2id derivation per key
        # file, while the running node's reload waits for the lock).
        engine = make_engine(settings.database_url)
        try:
            # Its entry carries its MAC (app/audit/mac.py): the log key, which no rotation
            # changes, is the one loaded already.
            sessions = append_with(make_session_factory(engine), new.log)
            with unit_of_work(sessions) as session:
                record_rotations(session, new, after_seq=len(old.rotations), actor=_operator())
        finally:
            engine.dispose()
    typer.echo(f"rotated: signing key {old.signing_kid} -> {new.signing_kid}")
    typer.echo(f"         encryption key {old.encryption_kid} -> {new.encryption_kid}")
    _tell_whether_the_node_follows(settings, identity, new, protected=passphrase is not None)
    typer.echo("new fingerprint (for peers that pin from scratch):")
    typer.echo(format_fingerprint(new.fingerprint))


# How long `keys rotate` waits for the running node to publish the new keys: a reload of
# protected keys takes an Argon2id derivation per key file, about a second in all, and ten
# times that on a loaded host (seen in CI). A node that says its reload failed is told at once.
FOLLOW_SECONDS = 30.0


def _tell_whether_the_node_follows(
    settings: Settings, identity: NodeIdentity, new: NodeKeys, *, protected: bool
) -> None:
    """Say what the running node does now, not what it should (from review: the command said
    the node published the new keys while it went on with the old ones)."""
    import time

    import httpx

    from app.obs.published import Unreadable, difference, node_url, read_published, reload_check

    url = node_url(settings, identity)
    ours = f"the keys folder changed (rotation {len(new.rotations)})"
    deadline = time.monotonic() + FOLLOW_SECONDS
    while True:
        try:
            published = read_published(settings, url)
        except Unreadable as exc:
            # A node that answers nothing now may be busy a moment (its reload of the keys,
            # a loaded host: seen in CI); one not listening at all is said at once.
            refused = isinstance(exc.__cause__, httpx.ConnectError)
            if not refused and time.monotonic() < deadline:
                time.sleep(0.25)
                continue
            typer.echo(
                f"no running node answered at {url} ({exc}): a node started later uses the new "
                f"keys; one running elsewhere should publish signing key {new.signing_kid} "
                "(check with `entraide doctor` there)."
            )
            return
        if difference(published, new) is None:
            typer.echo(
                f"the running node at {url} publishes the new keys (no restart needed); "
                "peers follow the signed rotation at their next contact."
            )
            return
        # A failure the node reports of this very rotation will not mend by waiting (it
        # retries a minute later). One left by an earlier rotation may be mended by the
        # reload under way (from review: the command gave up on a stale failure).
        why = reload_check(settings, url)
        if (why is not None and ours in why) or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    lines = [
        f"warning: the running node at {url} still publishes signing key "
        f"{published.signing.kid}: it did not load the new keys, and peers that refresh pin "
        "its old ones until it does."
    ]
    if why is not None:
        lines.append(f"its /readyz says: {why}")
    if protected:
        lines.append(
            "the key files are protected by a passphrase: a node running without "
            "ENTRAIDE_KEY_PASSPHRASE or ENTRAIDE_KEY_PASSPHRASE_FILE cannot load them; "
            "restart it with one (docs/operations.md §3)."
        )
    for line in lines:
        typer.echo(line, err=True)


def keys_protect() -> None:
    """Encrypt every key file under ENTRAIDE_KEY_PASSPHRASE(_FILE) (Argon2id, secretbox)."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.audit.log import record
    from app.cli import _fail, _node, _operator, _settings
    from app.crypto.keyfile import KeyFileError
    from app.crypto.keys import protect_keys
    from app.db import unit_of_work
    from app.node import key_passphrase

    settings = _settings()
    try:
        passphrase = key_passphrase(settings)
        if passphrase is None:
            raise KeyFileError("set ENTRAIDE_KEY_PASSPHRASE or ENTRAIDE_KEY_PASSPHRASE_FILE first")
    except (KeyFileError, OSError) as exc:
        raise _fail(str(exc)) from exc
    # A change to the key files goes on record (it was not, from review): the entry is
    # written first, in a transaction that commits only once the files are protected, so
    # a change that cannot be recorded is not made, and a failed one leaves no entry.
    node = _node(settings)
    try:
        with unit_of_work(node.sessions) as session:
            record(session, actor=_operator(), action="key.protected", details={})
            session.flush()
            count = protect_keys(settings.keys_dir, passphrase=passphrase, current=passphrase)
    except (KeyFileError, OSError) as exc:
        raise _fail(str(exc)) from exc
    except SQLAlchemyError as exc:
        raise _fail(
            f"the change could not be recorded in the audit log ({type(exc).__name__}); "
            "the key files were not changed"
        ) from exc
    finally:
        node.close()
    typer.echo(f"{count} key files are protected by the passphrase")


def peers_refresh(authority: Annotated[str, typer.Argument(help="The peer, e.g. AR/MPF")]) -> None:
    """Fetch a peer's identity document now and follow a signed key rotation from its pin."""
    from app.cli import _fail, _node, _operator, _settings
    from app.crypto.keys import format_fingerprint
    from app.peers.keys import refresh_peer_keys

    node = _node(_settings())
    try:
        peer = refresh_peer_keys(node, authority, actor=_operator(), force=True)
        if peer is None:
            raise _fail(
                f"could not refresh {authority}: unknown, unreachable, or its new keys are "
                "not signed by a chain from the pinned key (see the audit log)"
            )
        typer.echo(f"{peer.authority_id}\t{format_fingerprint(peer.fingerprint)}")
    finally:
        node.close()


def peers_pin_cert(
    authority: Annotated[str, typer.Argument(help="The peer, e.g. AR/MPF")],
    cert: Annotated[Path | None, typer.Option(help="The peer's client certificate (PEM)")] = None,
    sha256: Annotated[str | None, typer.Option(help="Or its SHA-256, read out of band")] = None,
) -> None:
    """Pin the TLS client certificate a peer presents on our P2P API (mutual TLS)."""
    from sqlalchemy import select

    from app.audit.log import record
    from app.cli import _fail, _node, _operator, _settings
    from app.db import unit_of_work
    from app.models import Peer
    from app.tls import normalise_cert_pin, pin_of_certificate_file

    if (cert is None) == (sha256 is None):
        raise _fail("give --cert or --sha256")
    try:
        pin = pin_of_certificate_file(cert) if cert else normalise_cert_pin(sha256 or "")
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    node = _node(_settings())
    try:
        with unit_of_work(node.sessions) as session:
            peer = session.scalar(select(Peer).where(Peer.authority_id == authority))
            if peer is None:
                raise _fail(f"{authority} is not a pinned peer")
            peer.tls_client_cert_sha256 = pin
            peer.updated_at = utc_now()
            record(
                session,
                actor=_operator(),
                action="peer.changed",
                peer=authority,
                details={"tls_client_cert_sha256": pin},
            )
    finally:
        node.close()
    typer.echo(f"pinned the client certificate {pin} for {authority}")


def register(keys_app: typer.Typer, peers_app: typer.Typer) -> None:
    keys_app.command("rotate")(keys_rotate)
    keys_app.command("protect")(keys_protect)
    peers_app.command("refresh")(peers_refresh)
    peers_app.command("pin-cert")(peers_pin_cert)

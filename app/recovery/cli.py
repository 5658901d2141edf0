"""`entraide peers recover`: after a restore, take back what a peer holds of the exchange."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from app.config import Settings
    from app.node import Node

# A backup is taken while the node runs: what it holds and what it lacks meet around its
# time, by this node's own clock. An hour before is asked for too (what is here already
# is only counted).
MARGIN = timedelta(hours=1)


def peers_recover(
    authority_id: Annotated[
        str | None, typer.Argument(help="The peer's authority id, e.g. AR/MPF")
    ] = None,
    every: Annotated[
        bool,
        typer.Option("--all", help="Every pinned peer not suspended, one after the other"),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            help="Ask for what was exchanged from this time (YYYY-MM-DDTHH:MM:SSZ); default: "
            "an hour before the backup this node was last restored from"
        ),
    ] = None,
) -> None:
    """After `entraide restore`: take back from a peer what the two exchanged after the backup
    (its messages to us with our receipts, ours to it with its receipts), in the order this
    node first took them. Run it for each peer (or `--all`) before you start the node."""
    from app.cli import _fail, _node, _settings
    from app.crypto.encoding import DecodeError, format_time, utc_now
    from app.recovery.recover import parse_since

    if (authority_id is None) == (not every):
        raise _fail("name a peer, or give --all")
    settings = _settings()
    node = _node(settings)
    try:
        try:
            start = parse_since(since) if since is not None else _last_restore(node) - MARGIN
        except DecodeError as exc:
            raise _fail(f"--since: {exc}") from exc
        except LookupError as exc:
            raise _fail(str(exc)) from exc
        if start > utc_now():
            raise _fail(f"--since {format_time(start)} is in the future: nothing to ask for")
        peers = [authority_id] if authority_id is not None else _recoverable_peers(node)
        if not peers:
            raise _fail("no pinned peer to ask (suspended ones are not asked)")
        failed = [peer for peer in peers if not _recover_one(node, settings, peer, start)]
    finally:
        node.close()
    if failed:
        if len(peers) > 1:
            typer.echo(f"not in full: {', '.join(failed)}", err=True)
        raise typer.Exit(code=1)


def _recoverable_peers(node: Node) -> list[str]:
    from sqlalchemy import select

    from app.db import reading
    from app.models import Peer

    with reading(node.sessions) as session:
        return list(
            session.scalars(
                select(Peer.authority_id)
                .where(Peer.suspended_at.is_(None))
                .order_by(Peer.authority_id)
            )
        )


def _recover_one(node: Node, settings: Settings, authority_id: str, start: datetime) -> bool:
    """One peer's recovery, said as it goes; False if it did not take back everything (a
    peer that cannot be asked is said, and the next one asked)."""
    from app.cli import _operator
    from app.crypto.encoding import format_time
    from app.errors import EntraideError
    from app.peers.client import peer_http_client
    from app.recovery.recover import recover

    def started() -> None:
        typer.echo(f"asking {authority_id} for what was exchanged since {format_time(start)}")

    try:
        with peer_http_client(settings) as http:
            summary = recover(
                node, http, peer=authority_id, since=start, actor=_operator(), started=started
            )
    except EntraideError as exc:
        typer.secho(f"error: {exc.detail}", fg=typer.colors.RED, err=True)
        return False
    settled = (
        f", {summary.settled} of ours here but unreceipted now delivered with its receipt"
        if summary.settled
        else ""
    )
    typer.echo(
        f"{summary.listed} message{'' if summary.listed == 1 else 's'} listed: "
        f"{summary.received} of {authority_id}'s and "
        f"{summary.sent} of ours taken back{settled}, {summary.already} here already"
    )
    for entry in summary.failed:
        typer.secho(
            f"not taken back: {entry.role} message {entry.msg_id} of request "
            f"{entry.request_id or '?'}: {entry.error}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if summary.failed:
        count = len(summary.failed)
        typer.echo(
            f"{count} message{'s' if count > 1 else ''} not taken back: see above, and ask "
            f"{authority_id}'s operator about them (docs/operations.md §5)",
            err=True,
        )
        return False
    return True


def _last_restore(node: Node) -> datetime:
    """When the backup this node was last restored from was taken (its `node.restored`)."""
    from app.db import reading
    from app.recovery.pending import last_restore

    with reading(node.sessions) as session:
        restore = last_restore(session)
    if restore is None:
        raise LookupError("this node was never restored from a backup: give --since")
    if restore.backup_created_at is None:
        raise LookupError("the log's record of the last restore names no backup time: give --since")
    return restore.backup_created_at


def register(peers_app: typer.Typer) -> None:
    peers_app.command("recover")(peers_recover)

"""The restored node's side of a recovery: ask a peer for what the two exchanged since a
time (app/recovery/serve.py), and take each message back (app/recovery/take.py) in the order
it was first taken: by the times our own signatures carry, sorted here, a page at a time.

Completeness is the one thing taken on trust: a peer that leaves a message out is not caught
(the later messages of its request then fail their predecessor check). A message that cannot
be taken back is reported, with why, and holds back the later messages of its request, as a
delivery does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from sqlalchemy import select

from app.audit.log import record
from app.crypto.encoding import format_time, parse_time
from app.db import unit_of_work
from app.errors import PeerError
from app.models import Peer
from app.node import Node
from app.recovery.listing import Entry, in_order, pages
from app.recovery.take import ALREADY, SETTLED, Unrecoverable, apply, here


@dataclass
class Summary:
    listed: int = 0
    received: int = 0  # the peer's messages taken back
    sent: int = 0  # our own messages taken back
    already: int = 0
    settled: int = 0  # ours here already, undelivered: now delivered with the peer's receipt
    failed: list[Entry] = field(default_factory=list)


def recover(
    node: Node,
    http: httpx.Client,
    *,
    peer: str,
    since: datetime,
    actor: str,
    progress: Callable[[Entry, str], None] | None = None,
    started: Callable[[], None] | None = None,
) -> Summary:
    """Take back what `peer` lists since `since`; each message in a transaction of its own,
    a page at a time (a second's entries that a page boundary cut wait for the next page).
    `started`: called once the peer is known, before it is asked."""
    with unit_of_work(node.sessions) as session:
        peer_url = session.scalar(select(Peer.public_url).where(Peer.authority_id == peer))
    if peer_url is None:
        raise PeerError(f"{peer} is not a pinned peer", code="unknown_peer")
    if started is not None:
        started()
    summary = Summary()
    try:
        _take_listing(node, http, peer, peer_url, since, summary, progress)
    except PeerError as exc:
        # What was taken back stays (each in its own transaction): on record, as interrupted.
        _record(node, actor, peer, since, summary, outcome="interrupted", error=exc.detail)
        raise
    _record(node, actor, peer, since, summary, outcome="ok" if not summary.failed else "partial")
    return summary


def _take_listing(
    node: Node,
    http: httpx.Client,
    peer: str,
    peer_url: str,
    since: datetime,
    summary: Summary,
    progress: Callable[[Entry, str], None] | None,
) -> None:
    held: set[str] = set()
    waiting: list[Entry] = []
    taken_until = ""  # the latest second listed: a page listing an earlier one is out of order
    for page in pages(node, http, peer_url=peer_url, peer=peer, since=since):
        summary.listed += len(page)
        for entry in page:
            if entry.at < taken_until:
                entry.error = f"listed after the messages of {taken_until}, but taken before"
                summary.failed.append(entry)
                if entry.request_id is not None:
                    held.add(entry.request_id)
            else:
                waiting.append(entry)
        last = max((entry.at for entry in page), default=None)
        if last is not None:
            taken_until = max(taken_until, last)
        ready = [entry for entry in waiting if entry.at != last]
        waiting = [entry for entry in waiting if entry.at == last]
        _take_all(node, http, ready, peer, summary, held, progress, peer_url)
    _take_all(node, http, waiting, peer, summary, held, progress, peer_url)


def _record(
    node: Node,
    actor: str,
    peer: str,
    since: datetime,
    summary: Summary,
    *,
    outcome: str,
    error: str | None = None,
) -> None:
    details: dict[str, object] = {
        "since": format_time(since),
        "listed": summary.listed,
        "received": summary.received,
        "sent": summary.sent,
        "already": summary.already,
        "settled": summary.settled,
        "not_recovered": [entry.msg_id for entry in summary.failed][:100],
    }
    if error is not None:
        details["error"] = error
    with unit_of_work(node.sessions) as session:
        record(
            session,
            actor=actor,
            action="peer.recovered",
            outcome=outcome,
            peer=peer,
            details=details,
        )


def _take_all(
    node: Node,
    http: httpx.Client,
    entries: list[Entry],
    peer: str,
    summary: Summary,
    held: set[str],
    progress: Callable[[Entry, str], None] | None,
    peer_url: str = "",
) -> None:
    for entry in in_order(entries):
        blocked = entry.request_id is not None and entry.request_id in held
        if (blocked or entry.wire is None) and here(node, entry):
            # The backup holds it (the listing starts before the backup was taken): nothing
            # to take back, whatever was not taken before it.
            summary.already += 1
            if progress is not None:
                progress(entry, ALREADY)
            continue
        if blocked:
            entry.error = "held back: an earlier message of its request was not taken back"
            summary.failed.append(entry)
            continue
        try:
            outcome = apply(node, http, entry, peer=peer, peer_url=peer_url)
        except Unrecoverable as exc:
            entry.error = str(exc)
            summary.failed.append(entry)
            if entry.request_id is not None:
                held.add(entry.request_id)
            continue
        if outcome == ALREADY:
            summary.already += 1
        elif outcome == SETTLED:
            summary.settled += 1
        elif entry.role == "received":
            summary.received += 1
        else:
            summary.sent += 1
        if progress is not None:
            progress(entry, outcome)


def parse_since(text: str) -> datetime:
    """`--since`: an RFC 3339 UTC time, as the backup's manifest and `restore` print it."""
    return parse_time(text)

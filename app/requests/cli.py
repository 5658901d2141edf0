"""`entraide requests list|show`: a case officer's requests, read at a terminal.

They call the running node's local API (GET /api/v1/requests and /api/v1/requests/{id},
docs/api.md §4.2 and §4.3) with an officer's token, as `send` and `download` do
(app/evidence/cli.py, whose group they join): the node decides what this officer may see,
audits each read, and refuses what it refuses. Its refusals, and a node that cannot be
reached, are one line on stderr and a non-zero exit. What a peer chose (names, errors) is
printed with control and bidirectional characters replaced, and the token is never printed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from enum import StrEnum
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.evidence.cli import (
    TokenOption,
    UrlOption,
    _client,
    _reaching,
    _refusal,
    fail,
    requests_app,
    where,
)
from app.oneline import one_line

# The group, with `list` and `show` on it: what app/cli.py loads as `entraide requests`.
__all__ = ["requests_app"]

REQUEST_ID = re.compile(r"[0-9a-f]{32}")
# What an Authorization header can carry: the node's tokens are `ent_` and URL-safe base64.
# A line break or a space (a token file copied with its CRLF) made httpx refuse the header
# in an error message that quoted it, token and all.
PAGE = 50
PAGE_ALL = 200  # --all: the largest page the node serves, the fewest round trips
WIDE = 200  # the table's width when printed to a pipe: more than any row needs
MAX_PAGES = 10_000  # --all stops, said, rather than follow a cursor that never ends


def _get(http: httpx.Client, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    response = http.get(path, params=params)
    if response.status_code != 200:
        raise fail(_refusal(response))
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise fail(f"the answer of {where(http)} is not a node's: is it an Entraide node's URL?")
    return answer


def _print_json(value: Any) -> None:
    # ASCII only: a peer's text (a name, an error) reaches a terminal as \u escapes.
    typer.echo(json.dumps(value, indent=2))


def _moment(value: str) -> str:
    """A day alone is its start in UTC (`--due-before 2026-12-07`: what falls due before
    that day); anything else goes to the node as given, which refuses a time with no UTC
    offset (ambiguous) with a 422."""
    try:
        day = date.fromisoformat(value)
    except ValueError:
        return value
    return datetime.combine(day, time(), tzinfo=UTC).isoformat()


def _when(value: object, *, seconds: bool = False) -> str:
    if not isinstance(value, str):
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return one_line(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _text(value: object) -> str:
    return "-" if value is None else one_line(str(value))


def _size(size: object) -> str:
    if not isinstance(size, int):
        return "?"
    scaled, unit = float(size), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, larger
    return f"{size} bytes" if unit == "bytes" else f"{scaled:.1f} {unit} ({size} bytes)"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


# --- list -----------------------------------------------------------------------------------


@requests_app.command("list")
def list_requests(
    direction: Annotated[
        Direction | None,
        typer.Option(help="inbound (received from peers) or outbound (sent by this node)"),
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="one status, e.g. delivered, acknowledged, executed")
    ] = None,
    peer: Annotated[str | None, typer.Option(help="the other authority, e.g. AR/MPF")] = None,
    overdue: Annotated[
        bool | None,
        typer.Option(
            "--overdue/--not-overdue",
            help="only requests past their current deadline (or, --not-overdue, only the others)",
        ),
    ] = None,
    due_before: Annotated[
        str | None,
        typer.Option(
            help="only requests due before this moment, with its UTC offset "
            "(2026-12-07T12:00:00+01:00), or before this day in UTC (2026-12-07)"
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, max=200, help=f"requests per page (default {PAGE}; 200 with --all)"),
    ] = None,
    cursor: Annotated[
        str | None, typer.Option(help="the next page, as the previous one said")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="every page, not only the first")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="the items as the API gives them, for scripts")
    ] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List requests, newest first: routing metadata only, nothing is decrypted or audited."""
    params = {
        key: value
        for key, value in {
            "direction": None if direction is None else direction.value,
            "status": status,
            "peer": peer,
            "overdue": None if overdue is None else str(overdue).lower(),
            "due_before": None if due_before is None else _moment(due_before),
            "limit": str(limit or (PAGE_ALL if every else PAGE)),
        }.items()
        if value is not None
    }
    items: list[dict[str, Any]] = []
    with _reaching(_client(url, token)) as http:
        for _ in range(MAX_PAGES):
            query = params if cursor is None else {**params, "cursor": cursor}
            page = _get(http, "/api/v1/requests", query)
            items.extend(item for item in page.get("items") or [] if isinstance(item, dict))
            cursor = page.get("next_cursor")
            if not every or not cursor:
                break
        else:
            raise fail(f"more than {MAX_PAGES} pages: narrow the list with its filters")
    if as_json:
        _print_json(items)
    elif items:
        console = Console(highlight=False)
        if not console.is_terminal:  # piped (to grep, a file): one whole line per request
            console = Console(highlight=False, width=WIDE)
        console.print(_table(items))
    else:
        typer.echo("no request matches", err=True)
    if cursor and not every:
        # On stderr, as a note: stdout stays the table or the JSON. The cursor is the node's
        # text, printed as it reads whatever it holds (a proxy or a node gone wrong).
        typer.echo(
            f"more: add --cursor {one_line(str(cursor))} for the next page, or --all", err=True
        )


def _table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    # On a narrow terminal the longer cells wrap; ids and times stay whole (never `2026-…`).
    table.add_column("id", no_wrap=True, min_width=32)
    for name in ("direction", "peer", "status", "urgency"):
        table.add_column(name, overflow="fold")
    table.add_column("due (UTC)", no_wrap=True, min_width=16)
    table.add_column("overdue", no_wrap=True)
    for item in items:
        # Text, never markup: a `[` in a peer's value is printed, not obeyed.
        table.add_row(
            Text(_text(item.get("id"))),
            Text(_text(item.get("direction"))),
            Text(_text(item.get("peer"))),
            Text(_text(item.get("status"))),
            Text(_text(item.get("urgency"))),
            Text(_when(item.get("due_at"))),
            Text("OVERDUE", style="bold red") if item.get("overdue") else Text(""),
        )
    return table


# --- show -----------------------------------------------------------------------------------


@requests_app.command("show")
def show(
    request_id: Annotated[str, typer.Argument(help="the request's id (32 hex digits)")],
    as_json: Annotated[
        bool, typer.Option("--json", help="the answer as the API gives it, for scripts")
    ] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show a request: its status, deadlines and messages, with receipts and attachments.

    Each message's type, direction, times, delivery and receipt, and its attachments with
    their sizes and SHA-256. The node decrypts the request for this read, and records it in
    its audit log (request.read)."""
    # Checked here: `x/../..` would otherwise be another route of the node.
    if not REQUEST_ID.fullmatch(request_id):
        raise fail("a request's id is 32 lower-case hex digits, as `requests list` shows", 2)
    with _reaching(_client(url, token)) as http:
        detail = _get(http, f"/api/v1/requests/{request_id}")
    if as_json:
        _print_json(detail)
        return
    for line in _detail_lines(detail):
        typer.echo(line)


def _detail_lines(detail: dict[str, Any]) -> Iterator[str]:
    document = detail.get("document") or {}
    outbound = detail.get("direction") == "outbound"
    yield f"request     {_text(detail.get('id'))}"
    yield (
        f"            {_text(detail.get('direction'))}, "
        f"{'to' if outbound else 'from'} {_text(detail.get('peer'))}"
    )
    yield f"type        {_text(document.get('request_type'))}"
    yield f"status      {_text(detail.get('status'))}"
    yield f"urgency     {_text(detail.get('urgency'))}"
    handling = _text(detail.get("handling"))
    if detail.get("restricted"):
        handling += ", restricted to the officers named on it"
    yield f"handling    {handling}"
    yield f"created     {_when(detail.get('created_at'), seconds=True)} UTC"
    yield f"updated     {_when(detail.get('updated_at'), seconds=True)} UTC"
    due = detail.get("due_at")
    overdue = ", OVERDUE" if detail.get("overdue") else ""
    yield f"due         {_when(due) + ' UTC' + overdue if due else 'nothing owed now'}"
    deadlines = detail.get("deadlines") or {}
    for key, label in (
        ("requested_date", "requested date"),
        ("acknowledge_by", "acknowledge by"),
        ("decide_by", "decide by"),
        ("execute_by", "execute by"),
        ("postponed_until", "postponed until"),
    ):
        value = deadlines.get(key)
        if value is not None:  # a date (YYYY-MM-DD) as given, a moment in UTC
            shown = _text(value) if len(str(value)) == 10 else f"{_when(value)} UTC"
            yield f"  {label:<16}{shown}"
    allowed = detail.get("allowed_messages") or []
    yield f"may send    {', '.join(_text(kind) for kind in allowed) or 'nothing now'}"
    messages = detail.get("messages") or []
    yield ""
    yield f"messages ({len(messages)}, oldest first)"
    for number, message in enumerate(messages, start=1):
        yield from _message_lines(number, message)


def _message_lines(number: int, message: dict[str, Any]) -> Iterator[str]:
    content = message.get("content") or {}
    kind = "request" if message.get("kind") == "request" else content.get("type")
    outbound = message.get("direction") == "outbound"
    receipt = message.get("receipt")
    yield ""
    yield (
        f"{number}. {_text(kind)}, {_text(message.get('direction'))}: "
        f"{_text(message.get('sender'))} -> {_text(message.get('recipient'))}"
    )
    yield f"   msg_id       {_text(message.get('msg_id'))}"
    if message.get("in_reply_to"):
        yield f"   in reply to  {_text(message.get('in_reply_to'))}"
    yield f"   sent         {_when(message.get('created_at'), seconds=True)} UTC"
    # Outbound: when the peer says it received it (its signed receipt); inbound: here.
    received = (receipt or {}).get("received_at") if outbound else message.get("received_at")
    yield f"   received     {_when(received, seconds=True) + ' UTC' if received else 'not yet'}"
    delivery = message.get("delivery")
    if outbound and isinstance(delivery, dict):
        yield f"   delivery     {_delivery(delivery)}"
    if isinstance(receipt, dict):
        signer = "this node" if not outbound else _text(message.get("recipient"))
        yield (
            f"   receipt      signed by {signer} (key {_text(receipt.get('signer_kid'))}), "
            f"envelope {_text(receipt.get('envelope_hash'))}"
        )
    else:
        yield "   receipt      none yet"
    attachments = message.get("attachments") or []
    if attachments:
        yield "   attachments"
    for item in attachments:
        yield (
            f"     {_text(item.get('index'))}. {_text(item.get('name'))}  "
            f"{_text(item.get('media_type'))}  {_size(item.get('size'))}"
        )
        yield f"        sha256 {_text(item.get('sha256'))}"


def _delivery(delivery: dict[str, Any]) -> str:
    state = _text(delivery.get("state"))
    attempts = delivery.get("attempts")
    said = [state]
    if isinstance(attempts, int) and attempts:
        said.append(f"{attempts} attempt{'s' if attempts != 1 else ''}")
    if delivery.get("delivered_at"):
        said.append(f"at {_when(delivery['delivered_at'], seconds=True)} UTC")
    if delivery.get("next_attempt_at"):
        said.append(f"next attempt {_when(delivery['next_attempt_at'], seconds=True)} UTC")
    if delivery.get("last_error") and state != "delivered":
        said.append(f"last error: {_text(delivery['last_error'])}")
    return ", ".join(said)

"""The peer's recovery listing as the restored node reads it: asked for page by page with a
signed request (app/recovery/request.py), each entry's form checked (its ids and time are
shown and recorded), and put in the restored node's own order."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from app.crypto.encoding import parse_time, utc_now
from app.errors import PeerError
from app.node import Node
from app.peers.client import read_json_bounded
from app.recovery.request import cursor_of, sign_request
from app.recovery.serve import OURS, YOURS

RECOVERY_PATH = "/p2p/v1/recovery"
# A page holds at most 16 MiB of sealed envelopes (serve.PAGE_BYTES), or one envelope of up
# to the peer's body limit; as base64 and JSON, about a third more. Peers run alike limits.
MIN_PAGE_BYTES = 64 * 1024 * 1024
MAX_PAGES = 100_000
HEX_ID = re.compile(r"[0-9a-f]{32}")
TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


@dataclass
class Entry:
    """A listed message: the peer's word for its role, place and time, checked as it is
    applied (`at`, to the second as signed; `request_id` and `in_reply_to` to order it)."""

    role: str  # "received" (the peer's message to us) or "sent" (ours to it)
    msg_id: str
    at: str
    in_reply_to: str | None
    request_id: str | None
    wire: dict[str, Any] | None
    receipt: object
    streamed: bool
    error: str | None = None


def pages(
    node: Node, http: httpx.Client, *, peer_url: str, peer: str, since: datetime
) -> Iterator[list[Entry]]:
    """The peer's listing for us since `since`, a page at a time."""
    after: str | None = None
    limit = max(MIN_PAGE_BYTES, 2 * node.settings.max_body_bytes)
    for _ in range(MAX_PAGES):
        keys = node.keys
        body = sign_request(
            keys.signing,
            sig_kid=keys.signing_kid,
            from_authority=node.authority_id,
            to_authority=peer,
            since=since,
            after=after,
            created_at=utc_now(),
        )
        page = _post(http, peer_url + RECOVERY_PATH, body, limit)
        entries = [_entry(item) for item in page["entries"]]
        yield entries
        following = page["next"]
        if following is None:
            return
        # The cursor is the page's last entry, and moves on: a peer cannot loop us.
        if not entries or following != cursor_of(parse_time(entries[-1].at), entries[-1].msg_id):
            raise PeerError("the peer's listing does not move on", code="peer_bad_response")
        if after is not None and following <= after:
            raise PeerError("the peer's listing does not move on", code="peer_bad_response")
        after = following
    raise PeerError("the peer's listing did not end", code="peer_bad_response")


def _post(http: httpx.Client, url: str, body: dict[str, str], limit: int) -> dict[str, Any]:
    try:
        with http.stream("POST", url, json=body) as response:
            answer = read_json_bounded(response, max_bytes=limit)
            status = response.status_code
    except httpx.HTTPError as exc:
        raise PeerError(
            f"could not reach the peer at {url}: {type(exc).__name__}", code="peer_unreachable"
        ) from exc
    if status != 200:
        said = answer.get("detail") if isinstance(answer, dict) else None
        shown = str(said)[:300].encode("ascii", "backslashreplace").decode()
        raise PeerError(
            f"the peer refused the recovery request (HTTP {status}: {shown})",
            code="peer_refused",
        )
    if (
        not isinstance(answer, dict)
        or not isinstance(answer.get("entries"), list)
        or not (answer.get("next") is None or isinstance(answer.get("next"), str))
    ):
        raise PeerError("the peer's listing is malformed", code="peer_bad_response")
    return answer


def _entry(item: object) -> Entry:
    """An entry as listed; its ids and time in their forms (they are shown and recorded)."""
    if (
        not isinstance(item, dict)
        or item.get("role") not in (OURS, YOURS)
        or not _id(item.get("msg_id"))
        or not (isinstance(item.get("at"), str) and TIME.fullmatch(item["at"]))
        or not all(
            _id(item.get(key)) or item.get(key) is None for key in ("request_id", "in_reply_to")
        )
    ):
        raise PeerError("the peer's listing holds a malformed entry", code="peer_bad_response")
    wire = item.get("envelope")
    return Entry(
        # The peer's "ours" is our "received"; kept in our words from here on.
        role="received" if item["role"] == OURS else "sent",
        msg_id=item["msg_id"],
        at=item["at"],
        in_reply_to=item.get("in_reply_to"),
        request_id=item.get("request_id"),
        wire=wire if isinstance(wire, dict) else None,
        receipt=item.get("receipt"),
        streamed=item.get("streamed") is True,
    )


def _id(value: object) -> bool:
    return isinstance(value, str) and HEX_ID.fullmatch(value) is not None


def in_order(entries: list[Entry]) -> list[Entry]:
    """By our clock (to the second), and within one second a message after the one it
    follows (our answer and the question it answers, made within a second, are listed by
    their ids), and ours first."""
    ordered: list[Entry] = []
    # Ours before the peer's within a second: one of ours naming the message a peer's also
    # names was sealed before that one arrived (else it would name it).
    rest = sorted(entries, key=lambda entry: (entry.at, entry.role != "sent", entry.msg_id))
    index = 0
    while index < len(rest):
        end = index
        while end < len(rest) and rest[end].at == rest[index].at:
            end += 1
        group = rest[index:end]
        while group:
            waiting = {entry.msg_id for entry in group}
            ready = next((entry for entry in group if entry.in_reply_to not in waiting), group[0])
            ordered.append(ready)
            group.remove(ready)
        index = end
    return ordered

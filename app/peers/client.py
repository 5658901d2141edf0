"""Outbound HTTP to peers: always a timeout, always a bounded read."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx

from app.config import Settings
from app.errors import BadRequest, PeerError
from app.tls import client_context

IDENTITY_PATH = "/.well-known/entraide/node"
ENVELOPES_PATH = "/p2p/v1/envelopes"
BATCH_PATH = "/p2p/v1/envelopes/batch"
MAX_BATCH_ENVELOPES = 64  # docs/protocol.md section 8.6
CONSISTENCY_PATH = "/p2p/v1/audit/consistency"
MAX_RESPONSE_BYTES = 256 * 1024
# A peer's Retry-After is honoured up to this: it may shed load, not park our deliveries.
MAX_RETRY_AFTER_SECONDS = 3600.0


class PeerAnswer(NamedTuple):
    """A peer's answer to a post: its status, its JSON body (None if unreadable), and how
    long it asked us to wait before trying again (Retry-After), if it did."""

    status: int
    body: object
    retry_after: float | None = None


def retry_after_of(response: httpx.Response, now: datetime) -> float | None:
    """Seconds a 429 or 503 answer asks us to wait (RFC 9110 §10.2.3: a number of seconds or
    an HTTP date), within [0, MAX_RETRY_AFTER_SECONDS]; None when not asked or unreadable."""
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # "²".isdigit() too, which int() refuses
        seconds = float(int(value[:12]))
    else:
        try:
            seconds = (parsedate_to_datetime(value) - now).total_seconds()
        except (TypeError, ValueError, OverflowError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def shown_url(url: str) -> str:
    """A peer URL for error messages and the audit trail: never its credentials (a URL with
    a password is refused, and the refusal must not record the password), bounded. Nothing
    is parsed: whatever precedes the last "@" after the scheme is hidden, even in a URL no
    parser takes or one whose password holds a "/"."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return repr((scheme + separator + rest)[:200])


def check_peer_url(url: str, *, allow_insecure_http: bool) -> str:
    shown = shown_url(url)
    try:
        parts = urlsplit(url)
        hostname, _port = parts.hostname, parts.port  # both parse lazily, and may raise
        # As the client will: IDNA host names (an empty label, a code point IDNA forbids)
        # and characters no URL may carry.
        decoded = httpx.URL(url).host  # decodes an IDNA (xn--) host, which may raise
        (hostname or "").encode("idna")
    except (ValueError, httpx.InvalidURL) as exc:  # UnicodeError is a ValueError
        raise BadRequest(f"{shown} is not a valid URL", code="invalid_peer_url") from exc
    if parts.scheme not in {"https", "http"} or not hostname or not decoded:
        raise BadRequest(f"{shown} is not an http(s) URL", code="invalid_peer_url")
    if parts.scheme == "http" and not allow_insecure_http:
        raise BadRequest(
            "peers must be reached over HTTPS; set ENTRAIDE_ALLOW_INSECURE_HTTP=true only "
            "for development and tests",
            code="insecure_peer_url",
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise BadRequest(
            "a peer URL carries no credentials, query or fragment", code="invalid_peer_url"
        )
    return url.rstrip("/")


def read_json_bounded(response: httpx.Response, *, max_bytes: int = MAX_RESPONSE_BYTES) -> Any:
    """Read at most `max_bytes` of a streamed response and parse it as JSON."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise PeerError("the peer's response is too large", code="peer_response_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise PeerError("the peer's response is not JSON", code="peer_bad_response") from exc


def fetch_identity(client: httpx.Client, base_url: str) -> Any:
    try:
        with client.stream("GET", base_url + IDENTITY_PATH) as response:
            if response.status_code != 200:
                raise PeerError(
                    f"the peer answered HTTP {response.status_code} for its identity document",
                    code="peer_unavailable",
                )
            return read_json_bounded(response)
    except httpx.HTTPError as exc:
        raise PeerError(
            f"could not reach the peer at {base_url}: {type(exc).__name__}",
            code="peer_unreachable",
        ) from exc


class _Watchdog:
    """Ends an exchange with a peer at a deadline, however slowly the peer answers.

    httpx's timeouts bound each socket read, not the whole exchange: a peer answering one
    byte at a time, just faster than the read timeout, could hold a worker forever. httpcore
    reports each new connection to the request's trace callback; the watchdog keeps the
    socket and shuts it down at the deadline, which makes the blocked read fail at once.
    Connections are not kept alive, so every exchange gets its own socket (and watchdog).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.timers: list[threading.Timer] = []

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        # The exchange is over: its timers must not outlive it (one thread each, for the
        # whole deadline, would pile up under load).
        if event.startswith("http11.response_closed."):
            for timer in self.timers:
                timer.cancel()
            return
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            timer = threading.Timer(self.seconds, _shutdown, args=(sock,))
            timer.daemon = True
            timer.start()
            self.timers.append(timer)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the exchange finished and closed the socket first


def make_http_client(
    timeout_seconds: float,
    *,
    tls: ssl.SSLContext | None = None,
    deadline_seconds: float | None = None,
) -> httpx.Client:
    """A client whose every exchange ends within `deadline_seconds` (default: four times
    the per-operation timeout), however slowly the peer answers."""
    total = deadline_seconds if deadline_seconds is not None else 4 * timeout_seconds

    def arm(request: httpx.Request) -> None:
        request.extensions["trace"] = _Watchdog(total)

    return httpx.Client(
        timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
        limits=httpx.Limits(max_keepalive_connections=0),
        follow_redirects=False,
        headers={"user-agent": "entraide/0.1"},
        verify=tls if tls is not None else True,
        event_hooks={"request": [arm]},
    )


def peer_http_client(settings: Settings) -> httpx.Client:
    """The client for calling peers: their CA bundle, our client certificate (app.tls)."""
    return make_http_client(settings.peer_timeout_seconds, tls=client_context(settings))

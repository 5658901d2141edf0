"""Outbound HTTP to peers: always a timeout, always a bounded read."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.errors import BadRequest, PeerError

IDENTITY_PATH = "/.well-known/entraide/node"
ENVELOPES_PATH = "/p2p/v1/envelopes"
CONSISTENCY_PATH = "/p2p/v1/audit/consistency"
MAX_RESPONSE_BYTES = 256 * 1024


def check_peer_url(url: str, *, allow_insecure_http: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise BadRequest(f"{url!r} is not an http(s) URL", code="invalid_peer_url")
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


def read_json_bounded(response: httpx.Response) -> Any:
    """Read at most MAX_RESPONSE_BYTES of a streamed response and parse it as JSON."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
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


def make_http_client(timeout_seconds: float) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
        follow_redirects=False,
        headers={"user-agent": "entraide/0.1"},
    )

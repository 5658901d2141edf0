"""What the running node publishes, read as a peer reads it, against the key files.

A running node loads its keys again after `entraide keys rotate`; if that fails (its
passphrase does not open them, say) it goes on with the old ones. Reading the files says
nothing about that: `doctor` and `keys rotate` read the node's identity document at its
public URL (the node of this host, or one replica behind the load balancer) and compare.
"""

from __future__ import annotations

from app.config import Settings
from app.crypto.identity import IdentityError, PeerIdentity, parse_identity_document
from app.crypto.keyfile import KeyFileError
from app.crypto.keys import NodeIdentity, NodeKeys
from app.errors import PeerError
from app.peers.client import IDENTITY_PATH, make_http_client, read_json_bounded
from app.tls import client_context

# Short: the node is on this host or near it, and the caller has more to say.
TIMEOUT_SECONDS = 3.0


class Unreadable(Exception):
    """No identity document could be read from the running node: says why, in a few words."""


def node_url(settings: Settings, identity: NodeIdentity) -> str:
    return (settings.public_url or identity.public_url).rstrip("/")


def read_published(settings: Settings, url: str) -> PeerIdentity:
    """The identity document served at `url` now, its self-signature checked."""
    import httpx

    try:
        tls = client_context(settings) if url.startswith("https://") else None
    except (KeyFileError, OSError, ValueError) as exc:
        raise Unreadable(f"the TLS client settings do not load: {exc}") from exc
    try:
        with (
            make_http_client(TIMEOUT_SECONDS, tls=tls) as http,
            http.stream("GET", url + IDENTITY_PATH) as response,
        ):
            if response.status_code != 200:
                raise Unreadable(f"HTTP {response.status_code}")
            document = read_json_bounded(response)
        return parse_identity_document(document)
    except httpx.HTTPError as exc:
        raise Unreadable(f"no answer ({type(exc).__name__})") from exc
    except PeerError as exc:
        raise Unreadable(exc.detail) from exc
    except IdentityError as exc:
        raise Unreadable(f"no valid identity document: {exc}") from exc


def difference(published: PeerIdentity, keys: NodeKeys) -> str | None:
    """None when the document publishes `keys`; else what it publishes instead."""
    if (
        published.signing.kid == keys.signing_kid
        and published.encryption.kid == keys.encryption_kid
        and len(published.rotations) == len(keys.rotations)
    ):
        return None
    return (
        f"it publishes signing key {published.signing.kid} (rotation {len(published.rotations)})"
        f" but the key files hold {keys.signing_kid} (rotation {len(keys.rotations)})"
    )


def reload_check(settings: Settings, url: str) -> str | None:
    """What the node's /readyz says of its reload of the keys (`keys_reload`), if failing."""
    import httpx

    try:
        tls = client_context(settings) if url.startswith("https://") else None
        with (
            make_http_client(TIMEOUT_SECONDS, tls=tls) as http,
            http.stream("GET", url + "/readyz") as response,
        ):
            body = read_json_bounded(response)
    except (httpx.HTTPError, PeerError, KeyFileError, OSError, ValueError):
        return None
    checks = body.get("checks") if isinstance(body, dict) else None
    found = checks.get("keys_reload") if isinstance(checks, dict) else None
    return found if isinstance(found, str) and found != "ok" else None

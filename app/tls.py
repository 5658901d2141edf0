"""TLS: serving HTTPS, calling peers over HTTPS, and pinning peers' client certificates.

Trust, in both directions (docs/threat-model.md, "TLS: trust decisions"):

- **Peers' server certificates** are verified against `ENTRAIDE_TLS_CA` (a CA bundle file),
  or the system's trusted CAs when it is unset, with host-name checking. TLS protects the
  routing metadata on the wire; the peer's identity is established by its pinned signing key
  regardless (every envelope, receipt and identity document is signed).
- **Mutual TLS on the P2P API** (optional): the node asks for a client certificate issued by
  a CA in `ENTRAIDE_TLS_CLIENT_CA` (a self-signed certificate may be its own CA), and with
  `ENTRAIDE_P2P_REQUIRE_CLIENT_CERT=true` every P2P call must present one whose SHA-256 is
  pinned for a peer (`entraide peers pin-cert`). The local API never requires one. The
  delivery worker presents `ENTRAIDE_TLS_CLIENT_CERT` / `ENTRAIDE_TLS_CLIENT_KEY` to peers.

Uvicorn does not pass the client certificate to the application, so `PeerCertProtocol`
adds it to the ASGI scope as the ASGI TLS extension does (`extensions.tls.client_cert_chain`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.crypto.keyfile import KeyFileError, check_private_mode
from app.errors import Forbidden
from app.lingering import LingeringH11Protocol
from app.models import Peer


class CertificateRefused(Forbidden):
    code = "client_certificate_refused"


def cert_sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def normalise_cert_pin(text: str) -> str:
    value = "".join(ch for ch in text if ch not in " :-").lower()
    if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
        raise ValueError("a certificate pin is the 64 hex digits of the certificate's SHA-256")
    return value


def pin_of_certificate_file(path: Path) -> str:
    """SHA-256 of a PEM (or DER) certificate file's DER bytes: what a peer presents."""
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        data = ssl.PEM_cert_to_DER_cert(data.decode("ascii"))
    return cert_sha256(data)


def _client_cert_der(scope: Scope) -> bytes | None:
    tls = scope.get("extensions", {}).get("tls", {})
    chain = tls.get("client_cert_chain") or []
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None


def check_peer_certificate(session: Session, settings: Settings, scope: Scope) -> str | None:
    """With mutual TLS required, the authority whose pinned certificate the caller presented;
    otherwise nothing is checked (None)."""
    if not settings.p2p_require_client_cert:
        return None
    der = _client_cert_der(scope)
    if der is None:
        raise CertificateRefused(
            "this node requires a client certificate on its P2P API",
            code="client_certificate_required",
        )
    authority = session.scalar(
        select(Peer.authority_id).where(Peer.tls_client_cert_sha256 == cert_sha256(der))
    )
    if authority is None:
        raise CertificateRefused("this client certificate is not pinned for any peer")
    return authority


# --- serving ------------------------------------------------------------------------------


def _with_client_cert(app: ASGIApp, pem: str) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            extensions: MutableMapping[str, Any] = dict(scope.get("extensions") or {})
            extensions["tls"] = {"client_cert_chain": [pem], "client_cert_error": None}
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return wrapped


class PeerCertProtocol(LingeringH11Protocol):
    """Uvicorn's h11 protocol (lingering, app/lingering.py), handing the verified client
    certificate to the app."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows the type the same way
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self.app = _with_client_cert(self.app, ssl.DER_cert_to_PEM_cert(der))


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`: none for plain HTTP."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.p2p_require_client_cert:
            raise KeyFileError("ENTRAIDE_P2P_REQUIRE_CLIENT_CERT needs ENTRAIDE_TLS_CERT")
        return {}
    if settings.tls_cert is None or settings.tls_key is None:
        raise KeyFileError("set both ENTRAIDE_TLS_CERT and ENTRAIDE_TLS_KEY")
    for path in (settings.tls_cert, settings.tls_key):
        if not path.exists():
            raise KeyFileError(f"{path} does not exist")
    check_private_mode(settings.tls_key)
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_cert),
        "ssl_keyfile": str(settings.tls_key),
        "http": PeerCertProtocol,
    }
    if settings.tls_client_ca is not None:
        # Optional at the TLS layer: the local API's clients present none; the P2P routes
        # check for a pinned one themselves.
        options["ssl_ca_certs"] = str(settings.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_OPTIONAL
    elif settings.p2p_require_client_cert:
        raise KeyFileError("ENTRAIDE_P2P_REQUIRE_CLIENT_CERT needs ENTRAIDE_TLS_CLIENT_CA")
    return options


# --- calling peers ------------------------------------------------------------------------


def client_context(settings: Settings) -> ssl.SSLContext:
    """Verification of peers' server certificates, and our client certificate if any."""
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca) if settings.tls_ca is not None else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_client_cert is not None:
        if settings.tls_client_key is None:
            raise KeyFileError("set ENTRAIDE_TLS_CLIENT_KEY with ENTRAIDE_TLS_CLIENT_CERT")
        check_private_mode(settings.tls_client_key)
        context.load_cert_chain(str(settings.tls_client_cert), str(settings.tls_client_key))
    return context

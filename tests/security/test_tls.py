"""Acceptance 7: TLS and mutual TLS between two real nodes, with certificates made here.

Both nodes serve HTTPS (ENTRAIDE_TLS_CERT/KEY), verify each other's server certificate with a
test CA (ENTRAIDE_TLS_CA), require a client certificate on their P2P API
(ENTRAIDE_P2P_REQUIRE_CLIENT_CERT with ENTRAIDE_TLS_CLIENT_CA) and pin the peer's exact one
(`entraide peers pin-cert`); plain-HTTP peers are refused (no ENTRAIDE_ALLOW_INSECURE_HTTP).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import delete, insert, literal, select, update

from app.crypto.encoding import utc_now
from app.crypto.keys import load_keys
from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry, Peer
from app.recovery.request import sign_request
from app.tls import pin_of_certificate_file
from tests.e2e.conftest import read_request, submit_example, wait_delivered
from tests.security.conftest import new_node, prepare

NOW = datetime.now(UTC)


class Authority:
    """A test certificate authority writing PEM files into `folder`."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(minutes=5))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(minutes=5))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


def tls_node(base: Path, authority: str, ca: Authority) -> LocalNode:
    label = authority.split("/")[0].lower()
    server = ca.issue(f"{label}-server", server=True)
    client = ca.issue(f"{label}-client", server=False)
    node = new_node(
        base,
        authority,
        ENTRAIDE_ALLOW_INSECURE_HTTP="false",
        ENTRAIDE_TLS_CERT=str(server[0]),
        ENTRAIDE_TLS_KEY=str(server[1]),
        ENTRAIDE_TLS_CA=str(ca.path),
        ENTRAIDE_TLS_CLIENT_CA=str(ca.path),
        ENTRAIDE_P2P_REQUIRE_CLIENT_CERT="true",
        ENTRAIDE_TLS_CLIENT_CERT=str(client[0]),
        ENTRAIDE_TLS_CLIENT_KEY=str(client[1]),
    )
    node.scheme, node.verify = "https", ssl.create_default_context(cafile=str(ca.path))
    return node


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"), "test-ca")


@pytest.fixture(scope="module")
def tls_pair(
    tmp_path_factory: pytest.TempPathFactory, pki: Authority
) -> Iterator[tuple[LocalNode, LocalNode]]:
    base = tmp_path_factory.mktemp("tls")
    es, ar = tls_node(base, "ES/MJ", pki), tls_node(base, "AR/MPF", pki)
    try:
        prepare([es, ar])
        es.pin(ar)
        ar.pin(es)
        es.cli("peers", "pin-cert", "AR/MPF", "--cert", str(pki.folder / "ar-client.crt"))
        ar.cli("peers", "pin-cert", "ES/MJ", "--cert", str(pki.folder / "es-client.crt"))
        yield es, ar
    finally:
        es.stop()
        ar.stop()


def test_exchange_over_mutual_tls(tls_pair: tuple[LocalNode, LocalNode]) -> None:
    es, ar = tls_pair
    assert es.url.startswith("https://")
    request_id = submit_example(es)
    assert wait_delivered(es, request_id)["status"] == "delivered"
    assert read_request(ar, request_id)["direction"] == "inbound"


def _p2p(node: LocalNode, pki: Authority, cert: tuple[Path, Path] | None) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(pki.path))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return httpx.post(node.url + "/p2p/v1/envelopes", json={"v": 1}, verify=context, timeout=10)


def test_p2p_refuses_missing_and_unpinned_client_certificates(
    tls_pair: tuple[LocalNode, LocalNode], pki: Authority, tmp_path: Path
) -> None:
    es, _ar = tls_pair
    missing = _p2p(es, pki, None)
    assert (missing.status_code, missing.json()["error"]) == (403, "client_certificate_required")
    # Issued by the trusted CA, but not the certificate pinned for any peer.
    wrong = _p2p(es, pki, pki.issue("impostor-client", server=False))
    assert (wrong.status_code, wrong.json()["error"]) == (403, "client_certificate_refused")
    # The pinned peer's own certificate passes the gate (and the garbage body is refused).
    pinned = _p2p(es, pki, (pki.folder / "ar-client.crt", pki.folder / "ar-client.key"))
    assert (pinned.status_code, pinned.json()["error"]) == (400, "malformed_envelope")
    # A certificate from another CA fails the TLS handshake itself.
    stranger = Authority(tmp_path, "other-ca").issue("stranger-client", server=False)
    with pytest.raises(httpx.HTTPError):
        _p2p(es, pki, stranger)
    # Both refusals are authentication failures: audited (and counted against the address).
    engine = make_engine(es.database_url)
    try:
        with engine.connect() as connection:
            outcomes = list(
                connection.scalars(
                    select(AuditEntry.outcome)
                    .where(AuditEntry.action == "peer.certificate_refused")
                    .order_by(AuditEntry.idx)
                )
            )
    finally:
        engine.dispose()
    assert outcomes == ["client_certificate_required", "client_certificate_refused"]


def test_local_api_needs_no_client_certificate_and_plain_http_is_refused(
    tls_pair: tuple[LocalNode, LocalNode],
) -> None:
    es, _ar = tls_pair
    with es.client("officer") as http:
        assert http.get("/api/v1/requests").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(es.url.replace("https://", "http://") + "/healthz", timeout=5)
    with es.client("admin") as http:
        response = http.post(
            "/api/v1/admin/peers", json={"url": "http://127.0.0.1:9", "fingerprint": "00" * 32}
        )
    assert (response.status_code, response.json()["error"]) == (400, "insecure_peer_url")


def test_peer_server_certificates_are_verified(tls_pair: tuple[LocalNode, LocalNode]) -> None:
    es, ar = tls_pair
    saved = es.extra_env.pop("ENTRAIDE_TLS_CA")
    try:  # without the test CA, AR's certificate is not trusted: pinning fails
        result = es.cli("peers", "add", ar.url, "--fingerprint", ar.fingerprint, check=False)
    finally:
        es.extra_env["ENTRAIDE_TLS_CA"] = saved
    assert result.returncode == 1
    assert "could not reach the peer" in result.stderr


def test_a_recovery_listing_over_mutual_tls_is_given_to_the_signers_own_certificate(
    tls_pair: tuple[LocalNode, LocalNode], pki: Authority
) -> None:
    """`POST /p2p/v1/recovery` (app/recovery) with mutual TLS: the signer's own pinned
    certificate gets the listing; without one, the gate refuses as for any P2P call."""
    es, ar = tls_pair
    wait_delivered(es, submit_example(es))
    keys = load_keys(es.keys_dir)
    body = sign_request(
        keys.signing,
        sig_kid=keys.signing_kid,
        from_authority="ES/MJ",
        to_authority="AR/MPF",
        since=utc_now() - timedelta(hours=1),
        after=None,
        created_at=utc_now(),
    )

    def listing(cert: tuple[Path, Path] | None) -> httpx.Response:
        context = ssl.create_default_context(cafile=str(pki.path))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        return httpx.post(ar.url + "/p2p/v1/recovery", json=body, verify=context, timeout=10)

    own = listing((pki.folder / "es-client.crt", pki.folder / "es-client.key"))
    assert own.status_code == 200, own.text
    assert {entry["role"] for entry in own.json()["entries"]} == {"yours"}
    missing = listing(None)
    assert (missing.status_code, missing.json()["error"]) == (403, "client_certificate_required")
    # Another peer's pinned certificate with ES/MJ's signed request (one captured and
    # replayed from that peer's connection): refused. AR/MPF's own client certificate is
    # pinned here, for the test, as a third peer's (a row copied from ES/MJ's).
    pin = pin_of_certificate_file(pki.folder / "ar-client.crt")
    engine = make_engine(ar.database_url)
    peers = Peer.__table__
    copied = [column for column in peers.c if column.name not in ("id", "authority_id")]
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(peers).from_select(
                    ["authority_id", *(column.name for column in copied)],
                    select(literal("FR/MJ"), *copied).where(peers.c.authority_id == "ES/MJ"),
                )
            )
            connection.execute(
                update(peers)
                .where(peers.c.authority_id == "FR/MJ")
                .values(tls_client_cert_sha256=pin)
            )
        other = listing((pki.folder / "ar-client.crt", pki.folder / "ar-client.key"))
        assert (other.status_code, other.json()["error"]) == (403, "certificate_mismatch")
    finally:
        with engine.begin() as connection:
            connection.execute(delete(peers).where(peers.c.authority_id == "FR/MJ"))
        engine.dispose()

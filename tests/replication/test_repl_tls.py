"""Peer mTLS on a real loopback socket: the internal plane requires client certificates.

The CA signs more than the mesh (a cluster CA issues certificates to every
workload), so the node also requires a configured peer name
(``KURA_INTERNAL_TLS_PEER_NAMES``) on the client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry
from twisted.internet import ssl
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from kura.config import PeerAuthConfig, TlsFiles
from kura.replication import wire
from kura.replication.client import PeerClient
from kura.replication.peer_auth import PeerAuthenticator
from kura.replication.tls import PeerTLSPolicy, name_matches
from kura.service import KuraNode
from kura.telemetry.metrics import KuraMetrics
from kura.testing import test_config as config_for

Key = ec.EllipticCurvePrivateKey


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _authority(common: str) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


#: The names mesh certificates carry, and the pattern the node requires.
PEER_NAMES = "*.kura-headless.cache.svc.cluster.local"


def _leaf(
    ca: tuple[x509.Certificate, Key], common: str, dns: str | None = None
) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    *([x509.DNSName(dns)] if dns else []),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca[1], hashes.SHA256())
    )
    return cert, key


def _files(directory: str, ca: x509.Certificate, leaf: tuple[x509.Certificate, Key]) -> TlsFiles:
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem")}
    with open(paths["ca.pem"], "wb") as handle:
        handle.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert.pem"], "wb") as handle:
        handle.write(leaf[0].public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as handle:
        handle.write(
            leaf[1].private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return TlsFiles(cert_path=paths["cert.pem"], key_path=paths["key.pem"], ca_path=paths["ca.pem"])


@pytest.fixture
def pki(tmp_path: Any) -> dict[str, TlsFiles]:
    """A mesh CA with node and peer identities, another workload of the same CA,
    and a stranger with its own CA."""
    ca = _authority("cluster CA")
    stranger_ca = _authority("someone else")
    mesh = "kura-headless.cache.svc.cluster.local"
    return {
        "node": _files(f"{tmp_path}/node", ca[0], _leaf(ca, "node", f"kura-0.{mesh}")),
        "peer": _files(f"{tmp_path}/peer", ca[0], _leaf(ca, "peer", f"kura-1.{mesh}")),
        "workload": _files(
            f"{tmp_path}/workload", ca[0], _leaf(ca, "app", "app.other.svc.cluster.local")
        ),
        "stranger": _files(f"{tmp_path}/stranger", ca[0], _leaf(stranger_ca, "stranger")),
    }


@pytest.fixture
def tls_node(tmp_path: Any, pki: dict[str, TlsFiles]) -> Any:
    """An in-process node on the real reactor whose internal plane requires mTLS."""
    from twisted.internet import reactor

    files = pki["node"]
    assert files.ca_path is not None
    config = config_for(
        f"{tmp_path}/data",
        KURA_BIND_HOST="127.0.0.1",
        KURA_NODE_URL="https://127.0.0.1:0",
        KURA_INTERNAL_TLS_CA_CERT_PATH=files.ca_path,
        KURA_INTERNAL_TLS_CERT_PATH=files.cert_path,
        KURA_INTERNAL_TLS_KEY_PATH=files.key_path,
        KURA_INTERNAL_TLS_PEER_NAMES=PEER_NAMES,
    )
    node = KuraNode(config, reactor, registry=CollectorRegistry())
    node.startService()
    pytest_twisted.blockon(node.started)
    yield node
    pytest_twisted.blockon(node.stopService())


def _client(policy: IPolicyForHTTPS) -> PeerClient:
    """A peer client (no peer secret: these nodes authenticate peers by mTLS)."""
    from twisted.internet import reactor

    auth = PeerAuthenticator(
        PeerAuthConfig(), tenant="default", clock=reactor, metrics=KuraMetrics(CollectorRegistry())
    )
    return PeerClient(reactor=reactor, tenant_id="default", auth=auth, tls_policy=policy)


def _base(node: KuraNode) -> str:
    address: Any = node.ports["internal"].getHost()
    return f"https://127.0.0.1:{address.port}"


@pytest_twisted.ensureDeferred
async def test_a_peer_with_a_mesh_certificate_is_served(
    tls_node: KuraNode, pki: dict[str, TlsFiles]
) -> None:
    """A client presenting a mesh certificate with a peer name gets the status report."""
    client = _client(PeerTLSPolicy(pki["peer"]))
    try:
        status = await client.status(_base(tls_node))
        assert status.tenant_id == "default"
    finally:
        await client.close()


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """Verifies the server against the mesh CA but presents no client certificate."""

    def __init__(self, ca_path: str) -> None:
        with open(ca_path, "rb") as handle:
            self._trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(handle.read())])

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode(), trustRoot=self._trust)


@pytest_twisted.ensureDeferred
async def test_a_client_without_a_certificate_fails_the_handshake(
    tls_node: KuraNode, pki: dict[str, TlsFiles]
) -> None:
    """No client certificate: the TLS handshake fails before any HTTP byte is served."""
    ca_path = pki["peer"].ca_path
    assert ca_path is not None
    client = _client(TrustOnly(ca_path))
    try:
        with pytest.raises(Exception) as caught:
            await client.status(_base(tls_node))
        assert "SSL" in repr(caught.value) or "TLS" in repr(caught.value)
        served = tls_node.metrics.registry.get_sample_value(
            "kura_http_requests_total", {"route": wire.STATUS_PATH, "status": "200"}
        )
        assert not served
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_another_authority_is_refused(
    tls_node: KuraNode, pki: dict[str, TlsFiles]
) -> None:
    """A client certificate not signed by the mesh CA fails the handshake."""
    client = _client(PeerTLSPolicy(pki["stranger"]))
    try:
        with pytest.raises(Exception) as caught:
            await client.status(_base(tls_node))
        assert "SSL" in repr(caught.value) or "TLS" in repr(caught.value)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_certificate_of_the_same_authority_without_a_peer_name_is_refused(
    tls_node: KuraNode, pki: dict[str, TlsFiles]
) -> None:
    """Another workload's certificate from the same CA fails the handshake: no peer name."""
    client = _client(PeerTLSPolicy(pki["workload"]))
    try:
        with pytest.raises(Exception) as caught:
            await client.status(_base(tls_node))
        assert "SSL" in repr(caught.value) or "TLS" in repr(caught.value)
        served = tls_node.metrics.registry.get_sample_value(
            "kura_http_requests_total", {"route": wire.STATUS_PATH, "status": "200"}
        )
        assert not served
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("name", "pattern", "matches"),
    [
        ("kura-1.kura-headless.ns.svc", "*.kura-headless.ns.svc", True),
        ("kura-headless.ns.svc", "*.kura-headless.ns.svc", False),
        ("a.b.kura-headless.ns.svc", "*.kura-headless.ns.svc", False),
        ("*.kura-headless.ns.svc", "*.kura-headless.ns.svc", False),
        ("peer.example", "peer.example", True),
        ("peer.example.evil", "peer.example", False),
    ],
)
def test_a_peer_name_pattern_stands_for_exactly_one_label(
    name: str, pattern: str, matches: bool
) -> None:
    """``*.`` matches one whole label, never several, nothing, or a wildcard certificate."""
    assert name_matches(name, pattern) is matches


@pytest_twisted.ensureDeferred
async def test_a_rotated_peer_identity_is_presented_once_reloaded(
    tls_node: KuraNode, pki: dict[str, TlsFiles]
) -> None:
    """One policy (as a node keeps one) reloads its files: an identity rewritten in
    place (here with one the node refuses, so the swap shows) is presented by new
    connections once the interval has passed, not before."""
    from twisted.internet.task import Clock

    clock = Clock()
    peer, stranger = pki["peer"], pki["stranger"]
    policy = PeerTLSPolicy(peer, clock, interval=1.0)

    async def handshake() -> str:
        client = _client(policy)  # a fresh pool: a new TLS connection
        try:
            await client.status(_base(tls_node))
            return "served"
        except Exception as error:  # the refused handshake
            return repr(error)
        finally:
            await client.close()

    assert await handshake() == "served"
    for source, target in (
        (stranger.cert_path, peer.cert_path),
        (stranger.key_path, peer.key_path),
    ):
        with open(source, "rb") as read, open(target, "wb") as write:
            write.write(read.read())
    assert await handshake() == "served"  # not looked at again yet
    clock.advance(1)
    refused = await handshake()
    assert "SSL" in refused or "TLS" in refused

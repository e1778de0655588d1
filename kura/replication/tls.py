"""Optional peer mTLS with Twisted's TLS (pyOpenSSL).

When ``KURA_INTERNAL_TLS_CA_CERT_PATH``, ``_CERT_PATH`` and ``_KEY_PATH`` are
set, the internal plane listens with TLS and **requires** a client
certificate signed by the CA bundle; the peer client presents the node's
certificate and verifies the peer's certificate against the same bundle and
the peer URL's host name (or IP address). A connection without a valid
client certificate fails its handshake before any HTTP byte is read.

A CA signs more than peers (a cluster CA issues certificates to every
workload), so with ``KURA_INTERNAL_TLS_PEER_NAMES`` the client certificate
must also carry one of the configured DNS names in its subjectAltName
(``*.`` matches exactly one label, so cert-manager's rotated certificates for
the same names keep working); anything else fails the handshake too.

The certificate file may hold a chain: the first certificate is the node's,
the rest are sent as intermediates.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from kura.config import TlsFiles
from kura.tls import Reloading, ReloadingServerOptions, load_certificates, load_identity


def _authorities(files: TlsFiles) -> list[ssl.Certificate]:
    assert files.ca_path is not None, "peer mTLS needs a CA bundle"
    return load_certificates(files.ca_path)


log = Logger(namespace="kura.replication.tls")

PEER_NAME_REFUSED = "refused a peer certificate without a configured name (it names {names})"


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names of a certificate's subjectAltName, lower-cased."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in extension.value.get_values_for_type(x509.DNSName)]


def name_matches(name: str, pattern: str) -> bool:
    """Whether DNS ``name`` matches ``pattern`` (a leading ``*.`` is one whole label)."""
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label) and label != "*" and dot == "." and rest == pattern[2:]
    return name == pattern


def has_peer_name(certificate: x509.Certificate, patterns: Sequence[str]) -> bool:
    """Whether ``certificate`` names a peer by one of ``patterns``."""
    return any(name_matches(n, p) for n in certificate_names(certificate) for p in patterns)


class _PeerNameOptions(ssl.CertificateOptions):
    """Server options that also require a configured name on the client certificate."""

    peer_names: tuple[str, ...] = ()

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection: SSL.Connection = super().serverConnectionForTLS(protocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
            self._verify,
        )
        return connection

    def _verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        # OpenSSL has checked the chain (``ok``); the name only matters for the
        # leaf (depth 0), the certificate the peer holds the key of.
        if not ok or depth != 0:
            return bool(ok)
        leaf = cert.to_cryptography()
        if has_peer_name(leaf, self.peer_names):
            return True
        log.warn(PEER_NAME_REFUSED, names=", ".join(certificate_names(leaf)) or "nothing")
        return False


def reloading_server_options(
    files: TlsFiles, peer_names: Sequence[str], clock: IReactorTime, interval: float
) -> ReloadingServerOptions:
    """:func:`server_options`, rebuilt when the certificate, key or CA bundle change."""
    return ReloadingServerOptions(
        Reloading(lambda: server_options(files, peer_names), files.paths, clock, interval)
    )


def server_options(files: TlsFiles, peer_names: Sequence[str] = ()) -> ssl.CertificateOptions:
    """Listener options: present the node certificate, require a client certificate.

    Args:
        files: the node's certificate, key and the CA bundle peers are signed by.
        peer_names: ``KURA_INTERNAL_TLS_PEER_NAMES``; when given, the client
            certificate must carry one of them, or the handshake fails.
    """
    private, intermediates = load_identity(files)
    kind = _PeerNameOptions if peer_names else ssl.CertificateOptions
    options = kind(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in intermediates],
        verify=True,
        caCerts=[c.original for c in _authorities(files)],
        requireCertificate=True,
    )
    if isinstance(options, _PeerNameOptions):
        options.peer_names = tuple(peer_names)
    return options


@implementer(IPolicyForHTTPS)
class PeerTLSPolicy:
    """Client side of peer mTLS: verify the peer, present our certificate.

    Args:
        files: the node's certificate, key and the CA bundle.
        clock, interval: with an interval, the files are looked at again
            (at most that often) and reloaded when they changed
            (:class:`kura.tls.Reloading`).
    """

    def __init__(
        self, files: TlsFiles, clock: IReactorTime | None = None, interval: float = 0.0
    ) -> None:
        self._material = Reloading(
            lambda: (load_identity(files)[0], ssl.trustRootFromCertificates(_authorities(files))),
            files.paths,
            clock if clock is not None else _NO_CLOCK,
            interval if clock is not None else 0.0,
        )

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        client, trust = self._material.get()
        creator: IOpenSSLClientConnectionCreator = ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=trust, clientCertificate=client
        )
        return creator


#: A policy built without a clock never looks at its files again.
_NO_CLOCK: IReactorTime = Clock()

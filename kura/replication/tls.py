"""Optional peer mTLS with Twisted's TLS (pyOpenSSL).

When ``KURA_INTERNAL_TLS_CA_CERT_PATH``, ``_CERT_PATH`` and ``_KEY_PATH`` are
set, the internal plane listens with TLS and **requires** a client
certificate signed by the CA bundle; the peer client presents the node's
certificate and verifies the peer's certificate against the same bundle and
the peer URL's host name (or IP address). A connection without a valid
client certificate fails its handshake before any HTTP byte is read.

The certificate file may hold a chain: the first certificate is the node's,
the rest are sent as intermediates.
"""

from __future__ import annotations

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from kura.config import TlsFiles
from kura.tls import load_certificates, load_identity


def _authorities(files: TlsFiles) -> list[ssl.Certificate]:
    assert files.ca_path is not None, "peer mTLS needs a CA bundle"
    return load_certificates(files.ca_path)


def server_options(files: TlsFiles) -> ssl.CertificateOptions:
    """Listener options: present the node certificate, require a client certificate."""
    private, intermediates = load_identity(files)
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in intermediates],
        verify=True,
        caCerts=[c.original for c in _authorities(files)],
        requireCertificate=True,
    )


@implementer(IPolicyForHTTPS)
class PeerTLSPolicy:
    """Client side of peer mTLS: verify the peer, present our certificate."""

    def __init__(self, files: TlsFiles) -> None:
        self._client, _ = load_identity(files)
        self._trust = ssl.trustRootFromCertificates(_authorities(files))

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        creator: IOpenSSLClientConnectionCreator = ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._trust, clientCertificate=self._client
        )
        return creator

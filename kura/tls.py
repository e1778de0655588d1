"""TLS material: loading PEM identities, and the public HTTPS listener's options."""

from __future__ import annotations

import re

from OpenSSL import crypto
from twisted.internet import ssl

from kura.config import TlsFiles

#: ALPN, in preference order: HTTP/2 first, HTTP/1.1 for everyone else.
ALPN_PROTOCOLS = [b"h2", b"http/1.1"]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def load_certificates(path: str) -> list[ssl.Certificate]:
    """Every PEM certificate in ``path``, in order.

    Raises:
        ValueError: the file holds no certificate.
    """
    blocks = _PEM_CERTIFICATE.findall(_read(path))
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def load_identity(files: TlsFiles) -> tuple[ssl.PrivateCertificate, list[ssl.Certificate]]:
    """The leaf certificate with its key, and the intermediates after it."""
    chain = load_certificates(files.cert_path)
    private = ssl.PrivateCertificate.fromCertificateAndKeyPair(
        chain[0], ssl.KeyPair.load(_read(files.key_path), crypto.FILETYPE_PEM)
    )
    return private, chain[1:]


def public_server_options(files: TlsFiles) -> ssl.CertificateOptions:
    """Options for the public HTTPS listener.

    twisted.web serves every HTTPS connection (the accelerator is plaintext
    only); ALPN lets clients choose HTTP/2.
    """
    private, intermediates = load_identity(files)
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in intermediates],
        acceptableProtocols=ALPN_PROTOCOLS,
    )

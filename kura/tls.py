"""TLS material: loading PEM identities, the public HTTPS listener's options, and
reloading both when their files change.

cert-manager (and most secret rotators) rewrite a certificate and its key in
place before the old one expires. :class:`Reloading` holds whatever is built
from a set of files (server options, a client identity). When a new
connection asks for it and ``KURA_TLS_RELOAD_INTERVAL_MS`` has passed since
the last look, the files' identity (inode, size, modification time) is
compared (two ``stat`` calls, no timer) and the material rebuilt on a
change; new handshakes use the new material, connections already up keep
theirs. A rebuild that fails (a half-written pair, a key
that does not match its certificate) keeps the old material and is retried
at the next check, with a warning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from kura.config import TlsFiles

log = Logger(namespace="kura.tls")

RELOADED = "reloaded TLS material from {paths}"
RELOAD_FAILED = "kept the current TLS material: reloading {paths} failed ({error})"

T = TypeVar("T")

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


def _identity_of(paths: Sequence[str]) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when a file is rewritten or replaced (``None``: it is missing)."""
    seen: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            found = os.stat(path)
        except OSError:
            seen.append(None)
        else:
            seen.append((found.st_ino, found.st_size, found.st_mtime_ns))
    return tuple(seen)


class Reloading(Generic[T]):
    """Material built from files, rebuilt when they change (see the module docstring).

    Args:
        build: makes the material from the files (raises when they are bad).
        paths: the files ``build`` reads.
        clock: what "now" is for the interval.
        interval: seconds between looks at the files; 0 never looks again.

    Raises:
        Exception: whatever ``build`` raises at construction (a node with bad
            TLS files does not start).
    """

    def __init__(
        self,
        build: Callable[[], T],
        paths: Sequence[str],
        clock: IReactorTime,
        interval: float = 0.0,
    ) -> None:
        self._build = build
        self._paths = tuple(paths)
        self._seen = _identity_of(self._paths)
        self._current = build()
        self._clock = clock
        self._interval = interval
        self._next_look = clock.seconds() + interval

    def get(self) -> T:
        """The current material, after a look at the files if one is due."""
        if self._interval > 0 and self._clock.seconds() >= self._next_look:
            self._next_look = self._clock.seconds() + self._interval
            self.check()
        return self._current

    def check(self) -> bool:
        """Rebuild if a file changed since the last good build; whether it did."""
        seen = _identity_of(self._paths)
        if seen == self._seen:
            return False
        try:
            material = self._build()
        except Exception as error:  # any bad file keeps the old material
            log.warn(RELOAD_FAILED, paths=", ".join(self._paths), error=error)
            return False
        self._current = material
        self._seen = seen
        log.info(RELOADED, paths=", ".join(self._paths))
        return True


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerOptions:
    """Listener options whose every new connection uses the current material."""

    def __init__(self, reloading: Reloading[ssl.CertificateOptions]) -> None:
        self.reloading = reloading

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection: SSL.Connection = self.reloading.get().serverConnectionForTLS(protocol)
        return connection


def public_https_options(
    files: TlsFiles, clock: IReactorTime, interval: float
) -> ReloadingServerOptions:
    """The public HTTPS listener's options, reloaded when its files change."""
    return ReloadingServerOptions(
        Reloading(lambda: public_server_options(files), files.paths, clock, interval)
    )

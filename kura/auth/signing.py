"""Secrets: HMAC response signatures and constant-time comparison."""

from __future__ import annotations

import base64
import hashlib
import hmac

from kura.config.extension import SignerConfig


def _bytes(value: str | bytes) -> bytes:
    # surrogatepass: a str from any decoder encodes; nothing here may raise
    # on odd client input (that would be a 500 instead of a 401).
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


def constant_time_equals(given: str | bytes, expected: str | bytes) -> bool:
    """Whether two secrets are equal, in time independent of where they differ.

    Both sides are hashed with SHA-256 first and the digests compared with
    :func:`hmac.compare_digest`, so neither the length nor a common prefix
    leaks, and non-ASCII text (which ``compare_digest`` refuses for ``str``)
    is simply unequal instead of an exception.
    """
    return hmac.compare_digest(
        hashlib.sha256(_bytes(given)).digest(), hashlib.sha256(_bytes(expected)).digest()
    )


def hmac_sha256_base64(signer: SignerConfig, payload: str | bytes) -> str:
    """The base64 (standard alphabet, padded) HMAC-SHA256 of ``payload``."""
    mac = hmac.new(signer.key, _bytes(payload), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")

"""Turning a hook's :class:`~kura.auth.results.Headers` into safe header bytes.

A hook's header names and values go straight into the response head, so
anything that could split the head or change its framing is dropped:

* names that are not HTTP tokens (RFC 9110 section 5.6.2; this excludes CR,
  LF, ``:``, spaces and non-ASCII);
* framing and hop-by-hop headers (``content-length``, ``transfer-encoding``,
  ``connection`` ...), which kura sets itself;
* values with control characters (CR, LF, NUL ...; horizontal tab is
  allowed) or characters outside latin-1 (not representable as octets).

Dropping is not a failure: the remaining headers are sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from twisted.logger import Logger

log = Logger(namespace="kura.auth")

HEADER_DROPPED = "extension response header {name!r} dropped: {reason}"

#: The header a failed response_headers hook leaves on the response.
EXTENSION_ERROR_HEADER = (b"x-kura-extension-error", b"response_headers")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: Headers kura owns: framing, hop-by-hop, and HTTP/2 connection headers.
RESERVED = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def sanitize(pairs: Iterable[tuple[object, object]]) -> list[tuple[bytes, bytes]]:
    """The acceptable ``(name, value)`` pairs as lower-cased header bytes."""
    safe: list[tuple[bytes, bytes]] = []
    for name, value in pairs:
        problem = _problem(name, value)
        if problem is not None:
            log.warn(HEADER_DROPPED, name=name, reason=problem)
            continue
        assert isinstance(name, str) and isinstance(value, str)
        safe.append((name.lower().encode("ascii"), value.encode("latin-1")))
    return safe


def _problem(name: object, value: object) -> str | None:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        return "the name is not an HTTP token"
    if name.lower() in RESERVED:
        return "kura sets this header itself"
    if not isinstance(value, str):
        return "the value is not a str"
    if _CONTROL.search(value):
        return "the value contains control characters"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return "the value is not latin-1 text"
    return None

"""Response heads written by the accelerator, byte-compatible with twisted.web's.

The accelerated and fallback paths must answer identically (status line,
header names, order and values, except ``Date`` and ``X-Request-Id``), so the
head is assembled here from the same :func:`kura.web.download.artifact_head`
headers the fallback sets on its ``Request``, in the order twisted.web emits
them: ``Server``, ``Date``, the artifact headers, ``X-Request-Id``,
``Connection``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from twisted.web.http import datetimeToString

from kura.web.request import SERVER_NAME

_REASONS = {200: b"OK", 206: b"Partial Content"}


class DateCache:
    """The ``Date`` value, formatted at most once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self, now: float | None = None) -> bytes:
        second = int(time.time() if now is None else now)
        if second != self._second:
            self._second = second
            self._value = datetimeToString(second)
        return self._value


def build_head(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    date: bytes,
    request_id: bytes,
    keep_alive: bool,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """Serialize a response head exactly as twisted.web would for the same headers."""
    parts = [
        b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
        % (status, _REASONS.get(status, b"OK"), SERVER_NAME, date)
    ]
    for name, value in headers:
        parts.append(b"%s: %s\r\n" % (name, value))
    for name, value in extra:
        parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(
        b"X-Request-Id: %s\r\nConnection: %s\r\n\r\n"
        % (request_id, b"keep-alive" if keep_alive else b"close")
    )
    return b"".join(parts)

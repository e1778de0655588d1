"""Response heads written by the accelerator, byte-compatible with twisted.web's.

The accelerated and fallback paths must answer identically (status line,
header names, order and values, except ``Date`` and ``X-Request-Id``), so the
head is assembled here from the same :func:`kura.web.download.artifact_head`
headers the fallback sets on its ``Request``, in the order twisted.web emits
them: ``Server``, ``Date``, the artifact headers, ``X-Request-Id``,
``Connection``.
"""

from __future__ import annotations

from collections.abc import Iterable

from kura.web.request import SERVER_NAME

_REASONS = {200: b"OK", 206: b"Partial Content"}


def header_fields(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``headers`` as head lines (``name: value`` CRLF each), in order."""
    return b"".join([b"%s: %s\r\n" % (name, value) for name, value in headers])


_STATUS_LINES: dict[int, bytes] = {}
_ENDINGS = {True: b"\r\nConnection: keep-alive\r\n\r\n", False: b"\r\nConnection: close\r\n\r\n"}


def head_from_fields(
    status: int, fields: bytes, *, date: bytes, request_id: bytes, keep_alive: bool
) -> bytes:
    """Serialize a response head exactly as twisted.web would for the same headers.

    ``fields`` are the artifact's headers already serialized
    (:func:`header_fields`, kept per artifact version by the decision), with
    any extension headers appended.
    """
    start = _STATUS_LINES.get(status)
    if start is None:
        start = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: " % (
            status,
            _REASONS.get(status, b"OK"),
            SERVER_NAME,
        )
    return b"".join(
        (start, date, b"\r\n", fields, b"X-Request-Id: ", request_id, _ENDINGS[keep_alive])
    )

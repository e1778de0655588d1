"""The one place domain errors become HTTP responses.

Every error body is JSON ``{"message": ...}`` with ``Content-Type:
application/json``, except the 401/403 answers of routes whose clients insist
on ``text/plain`` (Nx). Unknown exceptions become a 500 and are logged with
their traceback; a client that went away (``CancelledError``) is not a
server fault and is not logged as one.

Two writers share these rules: :func:`respond_with_error` sets them on a
twisted.web request, and :func:`render_error_response` serializes a whole
closing response for code that writes straight to a transport (the
accelerator's deny, the channel's 408 when a head takes too long).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from kura.domain.errors import KuraError, RangeNotSatisfiable, Unauthorized

from .routing import RouteSpec

log = Logger(namespace="kura.api")

REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Payload Too Large",
    415: b"Unsupported Media Type",
    416: b"Range Not Satisfiable",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    507: b"Insufficient Storage",
}


def error_body(message: str) -> bytes:
    """The JSON error body (control characters escaped by the encoder)."""
    return json.dumps({"message": message}).encode("utf-8")


class RequestTimeout(KuraError):
    """A request head did not arrive in time (answered by the channel, then closed)."""

    status = 408
    close = True


def _plain(error: KuraError, spec: RouteSpec | None) -> bool:
    return spec is not None and spec.plain_auth_errors and error.status in (401, 403)


def error_headers(error: KuraError, spec: RouteSpec | None) -> list[tuple[bytes, bytes]]:
    """Headers an error response carries besides Content-Length.

    ``spec`` is ``None`` for errors that precede routing (a head deadline).
    """
    plain = _plain(error, spec)
    headers = [(b"Content-Type", b"text/plain" if plain else b"application/json")]
    if error.retry_after is not None:
        headers.append((b"Retry-After", b"%d" % error.retry_after))
    if isinstance(error, Unauthorized) and error.challenge is not None:
        headers.append((b"WWW-Authenticate", error.challenge.encode("ascii")))
    if isinstance(error, RangeNotSatisfiable):
        headers.append((b"Accept-Ranges", b"bytes"))
        headers.append((b"Content-Range", b"bytes */%d" % error.size))
    return headers


def render_error_body(error: KuraError, spec: RouteSpec | None) -> bytes:
    """The body answering ``error`` on ``spec``'s route (``None``: no route)."""
    if _plain(error, spec):
        return error.message.encode("utf-8", "replace")
    return error_body(error.message)


def render_error_response(
    error: KuraError,
    spec: RouteSpec | None = None,
    *,
    before: Iterable[tuple[bytes, bytes]] = (),
    after: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """A complete HTTP/1.1 response answering ``error``, which closes the connection.

    For writers below twisted.web's ``Request``, which then close the
    connection. The head is the status line, ``before``, the error's own
    headers (:func:`error_headers`), ``Content-Length``, ``Connection:
    close`` and ``after``; the body is :func:`render_error_body`'s.

    Args:
        error: what to answer.
        spec: the route the request matched, ``None`` before routing.
        before: headers placed first (the accelerator's ``Server``, ``Date``).
        after: headers placed last (the accelerator's ``X-Request-Id``).
    """
    body = render_error_body(error, spec)
    parts = [b"HTTP/1.1 %d %s\r\n" % (error.status, REASONS.get(error.status, b"Error"))]
    parts += [b"%s: %s\r\n" % header for header in before]
    parts += [b"%s: %s\r\n" % header for header in error_headers(error, spec)]
    parts.append(b"Content-Length: %d\r\nConnection: close\r\n" % len(body))
    parts += [b"%s: %s\r\n" % header for header in after]
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def respond_with_error(request: IRequest, error: KuraError, spec: RouteSpec) -> bytes:
    """Set status and headers of ``request`` for ``error``; return the body."""
    body = render_error_body(error, spec)
    request.setResponseCode(error.status, REASONS.get(error.status))
    for name, value in error_headers(error, spec):
        request.setHeader(name, value)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    if error.close:
        request.setHeader(b"Connection", b"close")
        channel = getattr(request, "channel", None)
        if channel is not None and hasattr(channel, "persistent"):
            channel.persistent = False
    return b"" if request.method == b"HEAD" else body


#: Statuses that mean cache trouble rather than a wrong request.
TROUBLE = frozenset({413, 429, 500, 503, 507})


def as_seen_by_client(error: KuraError, spec: RouteSpec) -> KuraError:
    """``error``, or the route's trouble status for clients that die on it.

    The message stays; only the status changes (the connection still closes
    when the original error would have closed it).
    """
    if spec.trouble_status is None or error.status not in TROUBLE:
        return error
    translated = KuraError(error.message, close=error.close)
    translated.status = spec.trouble_status
    translated.retry_after = error.retry_after
    return translated


def classify_failure(failure: Failure) -> KuraError | None:
    """The client-facing error for ``failure``, or ``None`` when there is none to send."""
    error = failure.value
    if isinstance(error, KuraError):
        return error
    if isinstance(error, HTTPException):
        code = error.code or 500
        converted = KuraError(error.description or error.name)
        converted.status = code if code in (404, 405) else 404
        converted.message = "Not found" if converted.status == 404 else "Method not allowed"
        return converted
    if failure.check(CancelledError):
        return None
    return KuraError("Internal server error")

"""Typed domain errors. Each carries the HTTP status and message it maps to.

The storage layer raises these without knowing about HTTP; the one place that
turns them into responses is :mod:`kura.web.errors`. The status lives here so
that the accelerator and the twisted.web path answer identically.
"""

from __future__ import annotations


class KuraError(Exception):
    """Base class: an expected failure with a client-facing message.

    Attributes:
        status: the HTTP status this error answers with.
        message: the JSON ``message`` field.
        retry_after: seconds for a ``Retry-After`` header, when retryable.
        close: whether the connection must close after the answer (e.g. a
            request body was left unread).
    """

    status = 500
    retry_after: int | None = None
    close = False

    def __init__(self, message: str, *, close: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if close is not None:
            self.close = close


class BadRequest(KuraError):
    status = 400


class DigestMismatch(BadRequest):
    """A body is not the one its declared SHA-256 digest names; nothing was stored."""


class Unauthorized(KuraError):
    """No (valid) credentials.

    Attributes:
        challenge: the ``WWW-Authenticate`` value, for clients that send
            credentials only when challenged.
    """

    status = 401

    def __init__(
        self, message: str, *, challenge: str | None = None, close: bool | None = None
    ) -> None:
        super().__init__(message, close=close)
        self.challenge = challenge


class Forbidden(KuraError):
    status = 403


class NotFound(KuraError):
    status = 404


class UnsupportedMediaType(KuraError):
    status = 415


class PayloadTooLarge(KuraError):
    """The declared or streamed body exceeds the route's limit."""

    status = 413
    close = True


class RangeNotSatisfiable(KuraError):
    status = 416

    def __init__(self, size: int) -> None:
        super().__init__("Requested range not satisfiable")
        self.size = size


class Unprocessable(KuraError):
    status = 422


class ServiceUnavailable(KuraError):
    """A retryable server-side condition (draining, budgets, fd exhaustion)."""

    status = 503

    def __init__(
        self, message: str, *, retry_after: int | None = 1, close: bool | None = None
    ) -> None:
        super().__init__(message, close=close)
        self.retry_after = retry_after


class TmpBudgetExhausted(ServiceUnavailable):
    """Staging the body would exceed ``KURA_TMP_DIR_MAX_BYTES``."""

    close = True


class TooManyRequests(KuraError):
    """A cap on concurrent work is reached (one client's uploads in flight, the
    node's unfinished multipart uploads); retryable once some of it ends."""

    status = 429
    retry_after = 1


class InsufficientStorage(KuraError):
    """The data filesystem is full (ENOSPC). Old artifacts are still served."""

    status = 507
    retry_after = 1
    close = True


class StorageFault(KuraError):
    """A genuine server-side storage failure (I/O error, corrupt metadata)."""

    status = 500


class BadFraming(BadRequest):
    """The request body was malformed (chunking, length mismatch)."""

    close = True


class TombstonedWrite(KuraError):
    """A write older than its namespace's tombstone; nothing is stored."""

    status = 409

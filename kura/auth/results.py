"""The typed values extension hooks return.

``authenticate`` returns a :class:`Principal`, :class:`Anonymous` or
:class:`Deny`; ``authorize`` returns :class:`Allow` or :class:`Deny`;
``response_headers`` returns :class:`Headers` (or ``None`` for none). Any
other value is a hook failure and is handled fail-closed (see
:mod:`kura.auth.authorizer`), so a hook that forgets to ``return`` denies
instead of allowing.

Every result but :class:`Headers` may carry ``ttl_seconds`` (on ``Headers``
it is deprecated, ignored and warns): how long the cached result stands
(``0`` means "do not cache"); ``None`` means the configured default
(``KURA_EXTENSION_AUTH_CACHE_ALLOW_TTL_SECONDS`` for principals, anonymous
and allow; ``KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS`` for denies).
Constructors validate their fields and raise ``TypeError``/``ValueError``,
which inside a hook counts as a hook failure.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Mapping
from typing import Any

import attrs

from kura.domain.errors import (
    BadRequest,
    Forbidden,
    KuraError,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
)

HEADERS_TTL_DEPRECATED = (
    "Headers(ttl_seconds=...) is deprecated and ignored: response headers are never cached"
)


def _ttl(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"ttl_seconds must be a number or None, got {value!r}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"ttl_seconds must be >= 0, got {value!r}")


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy, so a hook cannot change a cached result later."""
    return types.MappingProxyType(dict(value or {}))


def _text(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, got {value!r}")


@attrs.frozen
class Principal:
    """An authenticated caller.

    Attributes:
        id: a stable identifier (e.g. the token subject).
        kind: what the id names (``user``, ``project``, ...).
        attributes: anything ``authorize`` needs later (grants, handles);
            kept read-only. Part of the authorize cache key.
        ttl_seconds: how long this authentication is cached.
    """

    id: str = attrs.field(validator=_text)
    kind: str = attrs.field(default="subject", validator=_text)
    attributes: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping, hash=False)
    ttl_seconds: float | None = attrs.field(default=None, validator=_ttl, kw_only=True)


@attrs.frozen
class Anonymous:
    """No credentials (or none the extension cares about); not a deny."""

    ttl_seconds: float | None = attrs.field(default=None, validator=_ttl, kw_only=True)


#: The anonymous result used when there is no ``authenticate`` hook.
ANONYMOUS = Anonymous()


#: How widely a cached ``authorize`` result applies.
SCOPES = ("request", "namespace")


def _scope(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {value!r}")


@attrs.frozen
class Allow:
    """``authorize``: the principal may do what the request asks.

    Attributes:
        ttl_seconds: how long the allow is cached.
        scope: ``request`` (the default): the cached result answers only the
            same principal, tenant, namespace, operation, producer, route,
            method, transport *and artifact key*. ``namespace``: the hook
            decided for the whole namespace, and the result answers every
            key of it (with the rest equal).
    """

    ttl_seconds: float | None = attrs.field(default=None, validator=_ttl, kw_only=True)
    scope: str = attrs.field(default="request", validator=_scope, kw_only=True)


#: The result used when there is no ``authorize`` hook.
ALLOW = Allow()


def _status(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ValueError(f"Deny.status must be an HTTP error status (400-599), got {value!r}")


@attrs.frozen
class Deny:
    """Refuse the request with ``status`` and a JSON ``{"message": message}``.

    Attributes:
        status: 400-599; 401 and 403 are the usual ones, 503 when the
            authority cannot be reached.
        message: the client-facing message.
        ttl_seconds: how long the deny is cached.
        scope: as :attr:`Allow.scope` (only meaningful for ``authorize``;
            ``authenticate`` results are cached per credentials).
    """

    status: int = attrs.field(validator=_status)
    message: str = attrs.field(validator=_text)
    ttl_seconds: float | None = attrs.field(default=None, validator=_ttl, kw_only=True)
    scope: str = attrs.field(default="request", validator=_scope, kw_only=True)

    def to_error(self) -> KuraError:
        """The :class:`~kura.domain.errors.KuraError` the HTTP layer answers with."""
        return deny_error(self.status, self.message)


def deny_error(status: int, message: str) -> KuraError:
    """A ``KuraError`` carrying ``status`` and ``message``.

    The usual statuses map to their named subclasses; any other one is a
    plain ``KuraError`` whose ``status`` is set on the instance.
    """
    if status == 401:
        return Unauthorized(message)
    if status == 403:
        return Forbidden(message)
    if status == 400:
        return BadRequest(message)
    if status == 404:
        return NotFound(message)
    if status == 503:
        # A deny is the hook's answer, not a node condition: no Retry-After.
        return ServiceUnavailable(message, retry_after=None)
    error = KuraError(message)
    error.status = status
    return error


@attrs.frozen
class SignRequest:
    """Ask kura to HMAC-sign ``payload`` and send the base64 MAC in ``header``.

    Attributes:
        header: the response header name to set.
        signer: the id of a ``KURA_EXTENSION_SIGNER_<ID>_*`` signer.
        payload: the text (UTF-8) or bytes to sign.
    """

    header: str = attrs.field(validator=_text)
    signer: str = attrs.field(validator=_text)
    payload: str | bytes = attrs.field()

    @payload.validator
    def _payload(self, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, str | bytes):
            raise TypeError(f"SignRequest.payload must be str or bytes, got {value!r}")


@attrs.frozen
class Headers:
    """``response_headers``: extra response headers, optionally one signed.

    Attributes:
        headers: header name to value. Names that are not HTTP tokens,
            framing headers, and values with control characters are dropped
            when the response is built.
        sign: an HMAC signature to add.
        ttl_seconds: deprecated and ignored (response headers are never
            cached); passing it warns. Kept so existing extensions still load.
    """

    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_mapping)
    sign: SignRequest | None = attrs.field(default=None, kw_only=True)
    ttl_seconds: float | None = attrs.field(default=None, validator=_ttl, kw_only=True)

    @sign.validator
    def _sign(self, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and not isinstance(value, SignRequest):
            raise TypeError(f"Headers.sign must be a SignRequest or None, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.ttl_seconds is not None:
            # stacklevel 3: past attrs' generated __init__, to the hook that built it.
            warnings.warn(HEADERS_TTL_DEPRECATED, DeprecationWarning, stacklevel=3)


AuthenticateResult = Principal | Anonymous | Deny
AuthorizeResult = Allow | Deny

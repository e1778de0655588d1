"""What a hook sees about the request: :class:`HookContext`.

The fields are upstream Kura's extension context. The HTTP layer builds one
per request from the request's derived target (what its handler acts on;
:func:`kura.api.routes.resolve_target`) before any body byte is read, with
:func:`header_map` for the headers.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping, Sequence

import attrs

#: ``Authorization: Bearer <b64token>`` (RFC 6750 section 2.1; the scheme is
#: case-insensitive, the token is visible ASCII from a fixed alphabet).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")

HeaderValue = str | bytes | Sequence[str | bytes]
HeaderInput = Mapping[str | bytes, HeaderValue] | Iterable[tuple[str | bytes, str | bytes]]


def _text(value: str | bytes) -> str:
    # Header bytes are opaque octets; latin-1 maps each to one character
    # without ever failing, so odd bytes become odd text, never an error.
    return value.decode("latin-1") if isinstance(value, bytes) else value


def header_map(headers: HeaderInput | None) -> Mapping[str, str]:
    """Request headers as a read-only map with lower-cased names.

    Accepts a mapping (values may be one value or a list, e.g. twisted's
    raw headers) or ``(name, value)`` pairs; ``bytes`` are decoded as
    latin-1. A header sent more than once has its values joined with
    ``", "`` (RFC 9110 section 5.3), so two ``Authorization`` headers become
    one value no bearer parser accepts.
    """
    merged: dict[str, list[str]] = {}
    pairs: Iterable[tuple[str | bytes, HeaderValue]]
    if headers is None:
        pairs = ()
    elif isinstance(headers, Mapping):
        pairs = headers.items()
    else:
        pairs = headers
    for name, value in pairs:
        values = [value] if isinstance(value, str | bytes) else list(value)
        merged.setdefault(_text(name).lower(), []).extend(_text(v) for v in values)
    return types.MappingProxyType({name: ", ".join(vs) for name, vs in merged.items()})


def _read_only(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value or {}))


@attrs.frozen(kw_only=True)
class HookContext:
    """The request as the hooks see it (all keyword arguments).

    Attributes:
        transport: ``http``, ``https`` or ``h2`` (``grpc`` upstream).
        route: the route template, e.g. ``/api/cache/cas/{id}``.
        method: the request method.
        operation: ``artifact.read`` (GET, module HEAD), ``artifact.write``
            (PUT/POST, module start/part/complete), ``artifact.delete``
            (ccache DELETE), ``namespace.delete`` (clean) or ``request``
            (anything else).
        server_tenant_id: this node's ``KURA_TENANT_ID``.
        tenant_id: the request's tenant (``tenant_id``/``account_handle``;
            the path's on Gradle's path form; ``default`` on Nx, Metro and
            the neighbour protocols; the stored upload's for module
            part/complete), or ``None``.
        namespace_id: the namespace the request acts on (``namespace_id``/
            ``project_handle``; the path's on Gradle's path form; ``nx``,
            ``metro`` ... on fixed-namespace routes; the upload's for module
            part/complete), or ``None`` when tenant-scoped or when the
            request acts on no namespace.
        producer: ``xcode``, ``gradle``, ``module``, ``nx``, ``metro`` ...
        artifact_key: the storage key of the one artifact the request acts
            on (key-value PUT: from ``cas_id``, in the query or else the
            body, in which case the hooks run once the body is read).
        artifact_hash: the content hash the request names, when it has
            one (module ``hash``, the CAS id).
        headers: every request header, lower-cased names (see
            :func:`header_map`).
        query: the query parameters given exactly once, decoded (the
            handler's own parse). Informational: decide on ``tenant_id``,
            ``namespace_id`` and ``artifact_key``, which are what the
            request acts on; a parameter the route ignores is no grant.
        status_code: the response status, set for ``response_headers`` only.
    """

    transport: str = "http"
    route: str
    method: str
    operation: str = "request"
    server_tenant_id: str
    tenant_id: str | None = None
    namespace_id: str | None = None
    producer: str | None = None
    artifact_key: str | None = None
    artifact_hash: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=header_map)
    query: Mapping[str, str] = attrs.field(factory=dict, converter=_read_only)
    status_code: int | None = None

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None``."""
        return self.headers.get(name.lower())

    def bearer_token(self) -> str | None:
        """The token of a well-formed ``Authorization: Bearer`` header.

        ``None`` when the header is missing, uses another scheme, is empty,
        or carries anything but a visible-ASCII token (non-ASCII bytes, a
        second header joined in): such credentials are a 401, never an
        exception.
        """
        value = self.header("authorization")
        if value is None:
            return None
        match = _BEARER.fullmatch(value.strip())
        return match.group(1) if match else None

    def with_status(self, status_code: int) -> HookContext:
        """This context with ``status_code`` set (for ``response_headers``)."""
        return attrs.evolve(self, status_code=status_code)

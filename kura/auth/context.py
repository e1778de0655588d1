"""What a hook sees about the request: :class:`HookContext`.

The fields are upstream Kura's extension context. The HTTP layer builds one
per request from the request head (before any body byte is read) with
:func:`header_map` and :func:`raw_query` for the two maps.
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


def raw_query(raw: str | bytes) -> dict[str, str]:
    """The query string split on ``&`` and ``=`` without percent-decoding.

    This is upstream's extension view of the query. A name given twice
    keeps its first value (the admission gate refuses repeated tenant and
    namespace parameters anyway); a segment without ``=`` has value ``""``.
    """
    text = _text(raw).lstrip("?")
    found: dict[str, str] = {}
    for segment in text.split("&"):
        if not segment:
            continue
        name, _, value = segment.partition("=")
        if name and name not in found:
            found[name] = value
    return found


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
            (PUT/POST, module start/part/complete), ``namespace.delete``
            (clean) or ``request`` (anything else).
        server_tenant_id: this node's ``KURA_TENANT_ID``.
        tenant_id: the request's tenant (``tenant_id``/``account_handle``;
            ``default`` on Nx and Metro; the stored upload's for module
            part/complete), or ``None``.
        namespace_id: the request's namespace (``namespace_id``/
            ``project_handle``; ``nx``/``metro`` on those routes), or
            ``None`` when tenant-scoped.
        producer: ``xcode``, ``gradle``, ``module``, ``nx``, ``metro`` ...
        artifact_key: the storage key, when the route addresses one.
        artifact_hash: the content hash the request names, when it has
            one (module ``hash``, the CAS id).
        headers: every request header, lower-cased names (see
            :func:`header_map`).
        query: the raw query map (see :func:`raw_query`).
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

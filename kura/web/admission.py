"""What admission decides from a request head, for any Klein app served by kura.

A site admits every request from its head before reading a body byte (see
:mod:`kura.web.request`): its gate (:class:`kura.web.interfaces.IGate`; the public API's
:class:`kura.api.gate.Gate`, the internal plane's
:class:`kura.replication.internal.InternalGate`) turns a :class:`RequestHead`
into an :class:`Admission` or refuses it with a ``KuraError``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import attrs
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, MapAdapter

from kura.auth.context import HookContext
from kura.auth.results import Anonymous, Principal
from kura.domain.artifacts import NO_TARGET, ArtifactAddress, Manifest, Target

from .routing import Query, RouteSpec

#: Who a request runs as (what the authorizer said).
Caller = Principal | Anonymous

UNMATCHED = RouteSpec(endpoint="_unmatched", template="/_unmatched")


@attrs.frozen
class RequestHead:
    """The parts of a request head admission looks at.

    Attributes:
        method: the request method as sent.
        path: the raw (still percent-encoded) path, without the query.
        query: decoded query parameters (each may repeat).
        headers: lower-cased header names to their values, in order.
        declared_length: ``Content-Length``, or ``None`` for chunked/unknown.
        transport: ``http``, ``https`` or ``h2``.
        raw_query: the query string as sent (peer signatures cover it).
        peer: the address the request came from (for logs).
    """

    method: str
    path: bytes
    query: Mapping[str, list[str]]
    headers: Mapping[str, list[str]]
    declared_length: int | None
    transport: str = "http"
    raw_query: bytes = b""
    peer: str = ""


class Pacer(Protocol):
    """A bandwidth reservation clock (see kura.replication)."""

    def reserve(self, size: int) -> float:
        """Reserve ``size`` bytes; return the seconds to wait before going on."""


@attrs.frozen
class Admission:
    """The head-time verdict for an admitted request.

    Attributes:
        spec: the route.
        path_args: values of the URL rule's variables.
        query: the request's query parameters.
        target: what the request acts on (:func:`~kura.api.routes.resolve_target`);
            handlers and hooks both read it, nothing re-derives it.
        existing: for write-once uploads, the artifact already stored (the
            request is answered without reading its body).
        context: route-specific values resolved at admission (e.g. the
            multipart upload record).
        pacer: paces the body's arrival (replication ingest): the request
            pauses its transport for the delay each chunk reserves.
        caller: who the extension hooks said the request runs as.
        hook_context: the context the hooks saw (``response_headers`` reuses
            it with the response status).
        authorize_after_body: the hooks still have to run once the (small)
            body is read: a key-value PUT names its key only in the body.
    """

    spec: RouteSpec
    path_args: Mapping[str, str]
    query: Query
    target: Target = NO_TARGET
    existing: Manifest | None = None
    context: Mapping[str, Any] = attrs.field(factory=dict)
    pacer: Pacer | None = None
    caller: Caller | None = None
    hook_context: HookContext | None = None
    authorize_after_body: bool = False

    @property
    def address(self) -> ArtifactAddress | None:
        """The one artifact the request acts on, if any."""
        return self.target.address

    @property
    def skips_body(self) -> bool:
        return self.existing is not None

    @property
    def hashes_body(self) -> bool:
        """Stage the body with its SHA-256 computed as it arrives.

        Every body that becomes an artifact is (its digest is stored with it,
        and checked against a ``verify_digest`` key or a peer's declared
        digest before publishing); a multipart part is not, the assembled
        body is hashed when its upload completes.
        """
        return not self.spec.needs_upload


class RouteMatch:
    """Matches paths against the Klein ``url_map`` (the one route table)."""

    def __init__(self, url_map: Map, specs: Mapping[str, RouteSpec]) -> None:
        self._adapter: MapAdapter = url_map.bind("kura")
        self.specs = specs
        # The answers of the route table, memoized: popular artifacts are
        # fetched again and again, and werkzeug's matcher is the single most
        # expensive step of an accelerated 4 KiB response.
        self._memo = functools.lru_cache(maxsize=8192)(self._lookup)

    def match(self, method: str, path: bytes) -> tuple[RouteSpec, Mapping[str, str]] | None:
        """The spec and (read-only) path arguments for ``method path``, or ``None``.

        ``path`` is percent-decoded exactly as Klein decodes it before its own
        match, so both agree on which endpoint a request reaches.
        """
        return self._memo(method, path)

    def _lookup(self, method: str, path: bytes) -> tuple[RouteSpec, Mapping[str, str]] | None:
        try:
            path_info = unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            return None
        try:
            endpoint, args = self._adapter.match(path_info, method=method)
        except HTTPException:
            return None
        spec = self.specs.get(endpoint)
        if spec is None:
            return None
        return spec, MappingProxyType({k: str(v) for k, v in args.items()})

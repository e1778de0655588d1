"""Which parsed request heads the accelerator may serve itself.

A head is a *candidate* only if it is a strictly parsed HTTP/1.1 ``GET`` of an
accelerable route in the Klein app's own ``url_map`` (through
:class:`kura.api.gate.RouteMatch`, never a copy of the routes), its query
needs no decoding and is unambiguous, and the route's own address resolver
accepts it (right tenant, valid ids). Everything else falls back to
twisted.web, which then answers with the full rules (400, 403, 404, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import attrs

from kura.api.routes import resolve_target
from kura.domain.artifacts import Target
from kura.domain.errors import KuraError
from kura.web.admission import RouteMatch
from kura.web.routing import Query, RouteSpec

from . import reasons
from .head import RequestHead, parse_query


class Candidate(NamedTuple):
    """A request the accelerator may serve, if the artifact turns out servable.

    (A named tuple: one is made per request, see :class:`~.head.RequestHead`.)

    Attributes:
        target: what the request acts on, derived exactly as the twisted.web
            path derives it (the hooks see it).
        params: the decoded query parameters.
    """

    head: RequestHead
    spec: RouteSpec
    path_args: Mapping[str, str]
    target: Target
    params: Mapping[str, list[str]]
    artifact_id: str


_new_candidate = tuple.__new__


@attrs.frozen
class _Resolution:
    """What a request target (path and query) resolves to, whatever the rest of the head."""

    spec: RouteSpec
    path_args: Mapping[str, str]
    target: Target
    params: Mapping[str, list[str]]
    artifact_id: str


class Classifier:
    """Turns parsed heads into candidates or fallback reasons.

    Only the method, version and target decide, so the resolution of a
    target is memoized: a popular artifact is classified once, not on every
    download.
    """

    def __init__(self, routes: RouteMatch, node_tenant: str) -> None:
        self._routes = routes
        self._node_tenant = node_tenant
        self._resolve = functools.lru_cache(maxsize=8192)(self._resolve_target)

    def classify(self, head: RequestHead) -> Candidate | str:
        """A :class:`Candidate`, or the reason (a :mod:`.reasons` label) to fall back."""
        if head.method != b"GET" or head.version != b"HTTP/1.1":
            return reasons.METHOD
        found = self._resolve(head.path, head.query)
        if isinstance(found, str):
            return found
        # tuple.__new__ directly: the named tuple's own __new__ is a Python function.
        return _new_candidate(
            Candidate,
            (head, found.spec, found.path_args, found.target, found.params, found.artifact_id),
        )

    def _resolve_target(self, path: bytes, raw_query: bytes) -> _Resolution | str:
        match = self._routes.match("GET", path)
        if match is None:
            return reasons.ROUTE
        spec, path_args = match
        if not spec.accelerable or spec.address is None:
            return reasons.ROUTE
        params = parse_query(raw_query)
        if params is None:
            return reasons.QUERY
        try:
            target = resolve_target(spec, path_args, Query(params), self._node_tenant)
        except KuraError:
            return reasons.REQUEST
        address = target.address
        assert address is not None  # accelerable routes address one artifact
        return _Resolution(spec, path_args, target, params, address.artifact_id(self._node_tenant))

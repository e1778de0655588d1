"""The public route table as data: one :class:`Route` per URL rule and method.

Each protocol module (:mod:`kura.api.protocols`) and the probes
(:mod:`kura.api.probes`) list their routes from an instance bound to what
they use; :class:`kura.api.app.PublicAPI` concatenates the lists and builds
its own Klein app from them when it is constructed. Nothing is registered
at import time, and two nodes in one process share no route state.

A route's :class:`~kura.web.routing.RouteSpec` (what the request acts on,
how its body is received, what it may do) is keyed by its endpoint name;
admission (:mod:`kura.api.gate`) and the accelerator look specs up by the
endpoint the Klein ``url_map`` matched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from kura.web.request import KuraRequest
from kura.web.routing import BodyKind, Operation, RouteSpec, template_of

from .artifacts import Body

#: A route handler: answers an admitted request (what it acts on, path
#: arguments included, is its admission's); sets status and headers and
#: returns the body.
Handler = Callable[[KuraRequest], Awaitable[Body]]


@attrs.frozen
class Route:
    """One row of the route table.

    Attributes:
        rule: the werkzeug URL rule (``/api/cache/cas/<id>``).
        method: the one HTTP method it answers.
        spec: what the route means (its ``endpoint`` names the row).
        handler: answers the admitted request.
    """

    rule: str
    method: str
    spec: RouteSpec
    handler: Handler


def route(endpoint: str, rule: str, method: str, handler: Handler, **fields: Any) -> Route:
    """A :class:`Route` whose spec has ``fields`` and the template of ``rule``."""
    spec = RouteSpec(endpoint=endpoint, template=template_of(rule), **fields)
    return Route(rule, method, spec, handler)


def artifact_read(endpoint: str, rule: str, handler: Handler, **fields: Any) -> Route:
    """A ``GET`` of a stored artifact body.

    The accelerator may serve it, and storage trouble answers a miss (a
    cache in trouble must never fail a build); a route that differs says so
    in ``fields``.
    """
    fields = {"accelerable": True, "misses_on_fault": True, **fields}
    return route(endpoint, rule, "GET", handler, operation=Operation.READ, **fields)


def artifact_write(
    endpoint: str, rule: str, method: str, handler: Handler, *, body_limit: int, **fields: Any
) -> Route:
    """An upload of an artifact body, staged on disk as it arrives.

    A declared length above ``body_limit`` is refused before any body byte
    is read, and a body that grows past it is cut off.
    """
    return route(
        endpoint,
        rule,
        method,
        handler,
        operation=Operation.WRITE,
        body=BodyKind.STAGED,
        body_limit=body_limit,
        **fields,
    )


def specs_of(routes: Iterable[Route]) -> Mapping[str, RouteSpec]:
    """The specs of ``routes`` by endpoint (read-only).

    Raises:
        ValueError: two routes share an endpoint name.
    """
    specs: dict[str, RouteSpec] = {}
    for row in routes:
        endpoint = row.spec.endpoint
        if endpoint in specs:
            raise ValueError(f"endpoint {endpoint!r} is declared twice")
        specs[endpoint] = row.spec
    return MappingProxyType(specs)

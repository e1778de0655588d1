"""The one public route table: the shared Klein app and a RouteSpec per endpoint.

Routes are declared with :func:`route` on :class:`kura.api.app.PublicAPI` and
on the mixins it inherits (:mod:`kura.api.neighbours`). This module exists so
that those mixins can register routes without importing ``app`` (which
imports them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from klein import Klein

from kura.web.http import KuraRequest
from kura.web.routing import RouteSpec, template_of

Handler = TypeVar("Handler", bound=Callable[..., Any])

_app = Klein()
_SPECS: dict[str, RouteSpec] = {}


class _Responder(Protocol):
    async def _extension_headers(self, request: KuraRequest) -> None: ...


def route(rule: str, *, methods: list[str], **fields: Any) -> Callable[[Handler], Handler]:
    """Register a Klein route and its :class:`RouteSpec` under one endpoint name.

    The endpoint is the handler's name, so it must be unique across the app.
    Non-probe handlers get the extension's response headers added after they
    return.
    """

    def register(handler: Handler) -> Handler:
        endpoint = handler.__name__
        if endpoint in _SPECS:
            raise ValueError(f"endpoint {endpoint!r} is declared twice")
        spec = RouteSpec(endpoint=endpoint, template=template_of(rule), **fields)
        _SPECS[endpoint] = spec
        if spec.probe:
            _app.route(rule, methods=methods, endpoint=endpoint)(handler)
            return handler

        @functools.wraps(handler)
        async def respond(self: _Responder, request: KuraRequest, **kwargs: Any) -> Any:
            body = await handler(self, request, **kwargs)
            await self._extension_headers(request)
            return body

        _app.route(rule, methods=methods, endpoint=endpoint)(respond)
        return handler

    return register

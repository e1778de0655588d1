"""The node's authorizer as the serving paths use it.

:class:`RequestAuthorization` builds upstream's hook context from the
request's derived :class:`~kura.api.routes.Target` (tenant, namespace,
producer, key, hash: what the handler then acts on, never a second parse)
plus route, method, headers and transport, and runs the node's authorizer
(:mod:`kura.auth`: an extension, the built-in tokens, or open access). Both
serving paths go through it, exactly once per request: the twisted.web path
at admission (before any body byte is read), the accelerator after the
artifact is known to be servable and before any success byte is written.

A deny closes the connection on both paths, so their answers stay identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from kura.auth import HookContext
from kura.auth.context import HeaderInput
from kura.auth.results import Anonymous, Principal
from kura.domain.artifacts import Target
from kura.domain.errors import KuraError
from kura.web.routing import RouteSpec

Caller = Principal | Anonymous


def query_map(query: Mapping[str, list[str]]) -> dict[str, str]:
    """The hook context's ``query``: each parameter given exactly once, decoded.

    It is the handler's own parse of the query (a parameter given twice is
    left out: it is ambiguous, and a handler that reads one refuses it).
    Informational only: hooks decide on the derived fields.
    """
    return {name: values[0] for name, values in query.items() if len(values) == 1}


class RequestAuthorization:
    """Runs the node's authorizer for public requests (see the module docstring).

    Args:
        authorizer: an ``IRequestAuthorizer``: the extension, the built-in
            tokens, or open access.
        node_tenant: ``server_tenant_id`` in every context.
    """

    def __init__(self, authorizer: Any, node_tenant: str) -> None:
        self.authorizer = authorizer
        self._node_tenant = node_tenant
        # Built-in authorizers decide without waiting: no coroutine, no
        # Deferred chain on the accelerated path's hot loop.
        self._decide = getattr(authorizer, "decide", None)
        self._checks: dict[str, bool] = {}

    def needs_check(self, spec: RouteSpec) -> bool:
        """Whether requests of ``spec`` must be checked (else they run anonymous)."""
        checks = self._checks.get(spec.endpoint)
        if checks is None:
            checks = self._checks[spec.endpoint] = bool(
                self.authorizer.checks(spec.operation.value)
            )
        return checks

    def context(
        self,
        *,
        spec: RouteSpec,
        method: str,
        target: Target,
        headers: HeaderInput,
        query: Mapping[str, list[str]],
        transport: str,
    ) -> HookContext:
        """The hook context of a request: exactly what its handler acts on."""
        return HookContext(
            transport=transport,
            route=spec.template,
            method=method,
            operation=spec.operation.value,
            server_tenant_id=self._node_tenant,
            tenant_id=target.tenant,
            namespace_id=target.namespace or None,
            producer=target.producer.value if target.producer is not None else None,
            artifact_key=target.key,
            artifact_hash=target.hash,
            headers=headers,
            query=query_map(query),
        )

    def check(self, ctx: HookContext) -> Deferred[Caller]:
        """Who the request runs as; fails with the deny (which closes the connection)."""
        if self._decide is not None:
            try:
                return succeed(self._decide(ctx))
            except KuraError as error:
                error.close = True
                return fail(error)
        d: Deferred[Caller] = Deferred.fromCoroutine(self.authorizer.check(ctx))
        return d.addErrback(_closing)

    def check_response(self, ctx: HookContext, status: int) -> Deferred[list[tuple[bytes, bytes]]]:
        """Both steps of a response decided up front (the accelerator's):
        :meth:`check`, then the extension's headers for ``status``."""
        checked = self.check(ctx)
        if not self.authorizer.adds_headers:
            return checked.addCallback(lambda caller: [])
        return checked.addCallback(lambda caller: self.response_headers(ctx, caller, status))

    def response_headers(
        self, ctx: HookContext | None, caller: Caller | None, status: int
    ) -> Deferred[list[tuple[bytes, bytes]]]:
        """The extension's extra headers for a response with ``status``."""
        if ctx is None or caller is None or not self.authorizer.adds_headers:
            return succeed([])
        return Deferred.fromCoroutine(
            self.authorizer.response_headers(ctx.with_status(status), caller)
        )


def _closing(failure: Any) -> Any:
    error = failure.value
    if isinstance(error, KuraError):
        error.close = True
    return failure

"""The extension hooks as the serving paths use them.

:class:`RequestAuthorization` builds upstream's hook context from what a
request head says (route, tenant, namespace, producer, key, hash, headers,
raw query) and runs the node's authorizer (:mod:`kura.auth`). Both serving
paths go through it, exactly once per request: the twisted.web path at
admission (before any body byte is read), the accelerator after the artifact
is known to be servable and before any success byte is written.

A deny closes the connection on both paths, so their answers stay identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed

from kura.artifacts import ArtifactAddress, Producer
from kura.auth import HookContext, raw_query
from kura.auth.context import HeaderInput
from kura.auth.results import ANONYMOUS, Anonymous, Principal
from kura.errors import KuraError

from .routes import Query, RouteSpec

#: The tenant upstream reports for routes that carry none (Nx, Metro).
TENANTLESS = "default"

Caller = Principal | Anonymous


def artifact_hash(spec: RouteSpec, path_args: Mapping[str, str], query: Query) -> str | None:
    """The content hash a request names, when it names one (context field)."""
    if spec.producer is Producer.MODULE:
        return query.single("hash")
    for arg in ("id", "hash", "cache_key"):
        if arg in path_args:
            return path_args[arg]
    return None


class RequestAuthorization:
    """Runs the hooks for public requests (see the module docstring).

    Args:
        authorizer: an ``IRequestAuthorizer`` (``NoExtension`` when none is
            configured, in which case everything here is a cheap no-op).
        node_tenant: ``server_tenant_id`` in every context.
    """

    def __init__(self, authorizer: Any, node_tenant: str) -> None:
        self.authorizer = authorizer
        self._node_tenant = node_tenant

    @property
    def enabled(self) -> bool:
        return bool(self.authorizer.enabled)

    def context(
        self,
        *,
        spec: RouteSpec,
        method: str,
        path_args: Mapping[str, str],
        query: Query,
        address: ArtifactAddress | None,
        headers: HeaderInput,
        query_bytes: bytes,
        transport: str,
        tenant: str | None = None,
        namespace: str | None = None,
    ) -> HookContext:
        """The hook context of a request.

        ``tenant`` and ``namespace`` override what the query says (module
        part/complete take them from the stored upload).
        """
        if tenant is None and spec.tenant_arg is not None:
            tenant = path_args.get(spec.tenant_arg)
        if tenant is None:
            if spec.tenant_required or (spec.address is not None and not spec.tenantless):
                tenant = query.single("tenant_id", alias="account_handle")
            else:
                tenant = TENANTLESS if spec.tenantless else None
        if namespace is None and address is not None:
            namespace = address.namespace
        return HookContext(
            transport=transport,
            route=spec.template,
            method=method,
            operation=spec.operation.value,
            server_tenant_id=self._node_tenant,
            tenant_id=tenant,
            namespace_id=namespace or None,
            producer=spec.producer.value if spec.producer is not None else None,
            artifact_key=address.key if address is not None else None,
            artifact_hash=artifact_hash(spec, path_args, query),
            headers=headers,
            query=raw_query(query_bytes),
        )

    def check(self, ctx: HookContext) -> Deferred[Caller]:
        """Who the request runs as; fails with the deny (which closes the connection)."""
        if not self.enabled:
            return succeed(ANONYMOUS)
        d: Deferred[Caller] = Deferred.fromCoroutine(self.authorizer.check(ctx))
        return d.addErrback(_closing)

    def response_headers(
        self, ctx: HookContext | None, caller: Caller | None, status: int
    ) -> Deferred[list[tuple[bytes, bytes]]]:
        """The extension's extra headers for a response with ``status``."""
        if not self.enabled or ctx is None:
            return succeed([])
        return Deferred.fromCoroutine(
            self.authorizer.response_headers(ctx.with_status(status), caller)
        )


def _closing(failure: Any) -> Any:
    error = failure.value
    if isinstance(error, KuraError):
        error.close = True
    return failure

"""What each public route means, beyond its URL rule.

The Klein app's ``url_map`` is the only route table. Each endpoint in it has
a :class:`RouteSpec` (keyed by endpoint name) that says which artifact the
request addresses, how its body is received, and what it may do. The
twisted.web path and the accelerator both resolve requests through these
specs, so they cannot disagree about tenants, namespaces or keys.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping

import attrs

from kura.domain.artifacts import ArtifactAddress, Producer, is_valid_key, is_valid_namespace
from kura.domain.errors import BadRequest, Forbidden

MiB = 1024 * 1024
GiB = 1024 * MiB


class Operation(enum.StrEnum):
    """What a request does, as the extension hooks see it."""

    READ = "artifact.read"
    WRITE = "artifact.write"
    #: Removes one entry (ccache's DELETE).
    DELETE = "artifact.delete"
    DELETE_NAMESPACE = "namespace.delete"
    REQUEST = "request"

    @property
    def destructive(self) -> bool:
        """Cleans and deletes: refused to anonymous callers unless allowed."""
        return self in (Operation.DELETE, Operation.DELETE_NAMESPACE)


class BodyKind(enum.Enum):
    """How a route receives its request body."""

    #: No body is expected; a small one is read and ignored (as twisted.web would).
    NONE = "none"
    #: A small body kept in memory (JSON payloads).
    MEMORY = "memory"
    #: An artifact body streamed into a staging file.
    STAGED = "staged"


#: A route without a body policy reads at most this much of a stray body.
STRAY_BODY_LIMIT = 64 * 1024


class Query:
    """A request's query parameters, with kura's strictness rules.

    A parameter given twice, or given under both its name and its alias with
    different values, is ambiguous (two parsers could each pick a different
    one: a tenant confusion) and is a 400 on every serving path.
    """

    def __init__(self, params: Mapping[str, list[str]]) -> None:
        self._params = params

    def single(self, name: str, alias: str | None = None) -> str | None:
        """The one value of ``name`` (or ``alias``); empty counts as missing.

        Raises:
            BadRequest: the parameter is repeated or conflicts with its alias.
        """
        primary = self._params.get(name, [])
        secondary = self._params.get(alias, []) if alias is not None else []
        distinct = {v for v in (*primary, *secondary) if v != ""}
        if len(primary) > 1 or len(secondary) > 1 or len(distinct) > 1:
            shown = f"{name}/{alias}" if alias else name
            raise BadRequest(f"Ambiguous query parameter {shown}: give it once")
        return distinct.pop() if distinct else None


AddressResolver = Callable[[Mapping[str, str], Query, str], ArtifactAddress]

#: The tenant upstream reports for routes that carry none (Nx, Metro, ...).
TENANTLESS = "default"


@attrs.frozen
class Target:
    """What a request acts on, derived once (:func:`resolve_target`).

    The handler acts on exactly this and the extension hooks are shown
    exactly this, so they cannot disagree about tenant, namespace or key.

    Attributes:
        producer: the cache protocol, when the route has one.
        tenant: the tenant the request names (``default`` on protocols that
            carry none; ``None`` on routes that carry none at all).
        namespace: the namespace acted on (``""`` when tenant-scoped), or
            ``None`` when the request acts on no namespace.
        key: the storage key of the one artifact acted on, or ``None``.
        hash: the content hash the request names, when it names one.
    """

    producer: Producer | None = None
    tenant: str | None = None
    namespace: str | None = None
    key: str | None = None
    hash: str | None = None

    @property
    def address(self) -> ArtifactAddress | None:
        """The artifact acted on, when the request names one."""
        if self.producer is None or self.namespace is None or self.key is None:
            return None
        return ArtifactAddress(self.producer, self.namespace, self.key)

    @classmethod
    def of(cls, address: ArtifactAddress, tenant: str | None = None) -> Target:
        return cls(address.producer, tenant, address.namespace, address.key)


#: The target of requests that act on nothing (probes, unmatched paths).
NO_TARGET = Target()


@attrs.frozen
class RouteSpec:
    """The meaning of one endpoint.

    Attributes:
        endpoint: the Klein endpoint name (the key of this spec).
        template: the route template used as the metric label.
        operation: what the request does (for authorization).
        producer: the cache protocol, when the route addresses artifacts.
        address: resolves ``(path args, query, node tenant)`` to the
            artifact; raises :class:`BadRequest`/:class:`Forbidden` on bad
            ids or tenants. ``None`` when the route has no single artifact.
        tenant_required: the route carries ``tenant_id`` (checked even when
            ``address`` is ``None``).
        namespaced: the route acts on the namespace of its query as a whole
            (clean) or on a key it may learn only from the body (key-value
            PUT): its target names that namespace.
        body: how the request body is received.
        body_limit: the largest accepted body, in bytes.
        too_large_message: the 413 message for this route.
        accelerable: GETs may be served by the accelerator.
        probe: liveness/readiness/metrics (no auth, no draining, no
            public accounting).
        misses_on_fault: reads answer 404 instead of 5xx on storage
            trouble (clients that fail a whole build on any other status).
        plain_auth_errors: 401/403 bodies are ``text/plain`` (Nx).
        public: counts as public traffic (in-flight slot, time to first
            byte) that replication backs off against; false for the peer plane.
        needs_upload: admission loads the multipart upload named by
            ``upload_id`` (404 before the body when it is unknown).
        verify_digest: the key is the SHA-256 of the body (Bazel CAS); the
            staged body is hashed and a mismatch is a 400.
        head_check: extra validation of the query at admission (raises
            :class:`BadRequest`).
        not_found_message: the 404 message of reads.
        tenantless: the protocol carries no tenant (Nx, Metro); hooks see
            tenant ``default``.
        key_in_body: the artifact key may come only in the (small) body
            (key-value PUT's ``cas_id``), so hooks run once it is read.
        tenant_arg: the path argument that carries the tenant (Gradle's
            path form, for clients that drop the query string); the
            address resolver checks it and the hooks see it.
        overwrites: a PUT replaces an existing artifact (last writer wins)
            instead of being answered as already stored: ccache rewrites
            its manifests under the same key.
        trouble_status: answers *cache trouble* on writes (too large, budget
            or disk full, draining, storage faults) for clients that fail a
            task on any other status (Nx fails on all but 200/403/409).
    """

    endpoint: str
    template: str
    operation: Operation = Operation.REQUEST
    producer: Producer | None = None
    address: AddressResolver | None = None
    tenant_required: bool = False
    namespaced: bool = False
    body: BodyKind = BodyKind.NONE
    body_limit: int = STRAY_BODY_LIMIT
    too_large_message: str = "Request body exceeded allowed size"
    accelerable: bool = False
    probe: bool = False
    misses_on_fault: bool = False
    plain_auth_errors: bool = False
    public: bool = True
    needs_upload: bool = False
    verify_digest: bool = False
    head_check: Callable[[Query], None] | None = None
    tenantless: bool = False
    key_in_body: bool = False
    not_found_message: str = "Artifact not found"
    tenant_arg: str | None = None
    overwrites: bool = False
    trouble_status: int | None = None


_WERKZEUG_ARG = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def template_of(rule: str) -> str:
    """``/api/cache/cas/<id>`` → ``/api/cache/cas/{id}`` (the metric label)."""
    return _WERKZEUG_ARG.sub(r"{\1}", rule)


# -- tenancy and addressing ----------------------------------------------------------


def check_tenant(query: Query, node_tenant: str) -> str:
    """The request's tenant, which must be this node's (case-insensitively).

    Raises:
        BadRequest: ``Missing tenant_id`` (or an ambiguous one).
        Forbidden: the tenant is served by another node.
    """
    tenant = query.single("tenant_id", alias="account_handle")
    if tenant is None:
        raise BadRequest("Missing tenant_id")
    if tenant.lower() != node_tenant.lower():
        raise Forbidden(f"Forbidden: tenant '{tenant}' is routed to server for '{node_tenant}'")
    return tenant


def namespace_of(query: Query) -> str:
    """The request's namespace (``""`` when tenant-scoped)."""
    namespace = query.single("namespace_id", alias="project_handle") or ""
    if not is_valid_namespace(namespace):
        raise BadRequest("Invalid namespace_id")
    return namespace


def _key(value: str | None, what: str) -> str:
    if value is None:
        raise BadRequest(f"Missing {what}")
    if not is_valid_key(value):
        raise BadRequest(f"Invalid {what}")
    return value


def tenant_scoped(producer: Producer, arg: str) -> AddressResolver:
    """Routes whose key is a path segment and whose namespace is in the query."""

    def resolve(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
        check_tenant(query, node_tenant)
        return ArtifactAddress(producer, namespace_of(query), _key(path.get(arg), arg))

    return resolve


def tenant_in_path(
    producer: Producer,
    key_arg: str,
    *,
    tenant_arg: str = "tenant",
    namespace_arg: str | None = None,
) -> AddressResolver:
    """Routes that carry tenant (and namespace) as path segments.

    For clients that drop the URL's query string (stock Gradle): the
    address is the same as the query form's (``tenant_scoped``) for the
    same tenant, namespace and key. Without ``namespace_arg`` the route is
    tenant-scoped (namespace ``""``).

    Raises:
        BadRequest: an invalid namespace or key.
        Forbidden: the tenant is served by another node.
    """

    def resolve(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
        tenant = path.get(tenant_arg) or ""
        if tenant.lower() != node_tenant.lower():
            raise Forbidden(f"Forbidden: tenant '{tenant}' is routed to server for '{node_tenant}'")
        namespace = "" if namespace_arg is None else path.get(namespace_arg) or ""
        if namespace_arg is not None and (not namespace or not is_valid_namespace(namespace)):
            raise BadRequest("Invalid namespace_id")
        return ArtifactAddress(producer, namespace, _key(path.get(key_arg), key_arg))

    return resolve


def fixed_namespace(producer: Producer, namespace: str, arg: str) -> AddressResolver:
    """Routes with no tenant and a fixed namespace (Nx, Metro)."""

    def resolve(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
        return ArtifactAddress(producer, namespace, _key(path.get(arg), arg))

    return resolve


def keyvalue_address(cas_id: str, namespace: str) -> ArtifactAddress:
    """Key-value entries live under ``action_cache/{cas_id}`` (producer xcode)."""
    return ArtifactAddress(Producer.XCODE, namespace, f"action_cache/{_key(cas_id, 'cas_id')}")


def content_hash(spec: RouteSpec, path_args: Mapping[str, str], query: Query) -> str | None:
    """The content hash a request names, when it names one."""
    if spec.producer is Producer.MODULE:
        return query.single("hash")
    for arg in ("id", "hash", "cache_key"):
        if arg in path_args:
            return path_args[arg]
    return None


def resolve_target(
    spec: RouteSpec, path_args: Mapping[str, str], query: Query, node_tenant: str
) -> Target:
    """What a request acts on: the one derivation handlers and hooks share.

    Raises:
        BadRequest: a missing or invalid tenant, namespace or key.
        Forbidden: the request names another tenant than the node's.
    """
    tenant: str | None
    if spec.address is not None:
        address = spec.address(path_args, query, node_tenant)
        if spec.tenant_arg is not None:
            tenant = path_args.get(spec.tenant_arg)
        elif spec.tenantless:
            tenant = TENANTLESS
        else:
            tenant = query.single("tenant_id", alias="account_handle")
        return Target(
            address.producer,
            tenant,
            address.namespace,
            address.key,
            content_hash(spec, path_args, query),
        )
    if spec.namespaced:
        tenant = check_tenant(query, node_tenant)
        namespace = namespace_of(query)
        key = None
        if spec.key_in_body:
            cas_id = query.single("cas_id")
            key = None if cas_id is None else keyvalue_address(cas_id, namespace).key
        return Target(spec.producer, tenant, namespace, key)
    if spec.tenant_required:
        return Target(spec.producer, check_tenant(query, node_tenant))
    return Target(spec.producer, TENANTLESS if spec.tenantless else None)


def keyvalue_get(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    check_tenant(query, node_tenant)
    return keyvalue_address(path.get("cas_id") or "", namespace_of(query))


def xcode_cas(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    check_tenant(query, node_tenant)
    return ArtifactAddress(
        Producer.XCODE, namespace_of(query), f"blob/{_key(path.get('id'), 'id')}"
    )


def module_key(category: str, hash: str, name: str) -> str:
    return f"{category}/{hash}/{name}"


def module_artifact(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    """Module routes: the key comes from the query (the ``{id}`` segment is ignored)."""
    check_tenant(query, node_tenant)
    category = _key(query.single("cache_category") or "builds", "cache_category")
    hash_ = _key(query.single("hash"), "hash")
    name = _key(query.single("name"), "name")
    return ArtifactAddress(Producer.MODULE, namespace_of(query), module_key(category, hash_, name))

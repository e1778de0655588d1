"""What the public routes act on: tenancy, addressing, and :func:`resolve_target`.

Each public route's :class:`~kura.web.routing.RouteSpec` names an address
resolver from here; :func:`resolve_target` derives, once per request, the
tenant, namespace, producer and key the handler acts on and the extension
hooks are shown. The twisted.web path and the accelerator both resolve
requests through it, so they cannot disagree about tenants, namespaces or
keys.
"""

from __future__ import annotations

from collections.abc import Mapping

from kura.domain.artifacts import (
    ArtifactAddress,
    Producer,
    Target,
    is_valid_key,
    is_valid_namespace,
)
from kura.domain.errors import BadRequest, Forbidden
from kura.web.routing import AddressResolver, Query, RouteSpec

#: The tenant upstream reports for routes that carry none (Nx, Metro, ...).
TENANTLESS = "default"


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

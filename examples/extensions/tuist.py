"""Tuist's cache policy as a kura extension: a port of upstream's ``tuist.lua``.

Run it with ``KURA_EXTENSION_SCRIPT_PATH=examples/extensions/tuist.py`` and:

* ``KURA_EXTENSION_JWT_VERIFIER_TUIST_SECRET`` (and optionally ``_ALGORITHM``,
  ``_ISSUER``, ``_AUDIENCES``): verifies Tuist-issued JWTs locally;
* ``KURA_EXTENSION_HTTP_CLIENT_TUIST_BASE_URL``: the Tuist server;
* ``KURA_EXTENSION_TUIST_INTROSPECT_CLIENT_ID`` and ``..._CLIENT_SECRET``:
  the OAuth client kura introspects tokens with.

**authenticate.** A bearer JWT that verifies and whose ``cache_grants``
grant the requested action on the target is a principal at once (no server
round trip), as is a legacy JWT without ``scopes`` whose ``projects`` claim
names the target project. Otherwise the token is introspected
(``POST /oauth2/introspect``) when the introspection client is configured;
without it, project targets ask ``GET /api/cache/access`` and account
targets are a 503.

**authorize.** The request's tenant must be the node's; the target is the
account (``tenant``) or the project (``tenant/namespace``), and the action
(read or write) must be granted for it. Its results are per project, so they
are cached per namespace (``scope="namespace"``), not per artifact.

Every decision reads only the context's derived fields (``tenant_id``,
``namespace_id``, ``operation``): what kura acts on. The Lua original also
looked at the raw query string, which a request could fill with a second
``namespace_id`` or a ``project_handle`` the route ignores.

Principals and allows are cached 60 s, denies 3 s. Differences from the Lua
original, each deliberate:

* authenticate results are cached per credentials only, so denies that
  depend on the *request* (tenant routing, a missing tenant, an account
  target without introspection, a valid JWT whose grants do not cover the
  target) are returned with ``ttl_seconds=0`` here; cached, they would
  refuse the same token's next, valid request. authorize repeats the tenant
  checks and caches them per tenant and namespace;
* a malformed ``Authorization`` value (not ``Bearer <token>``, non-ASCII) is
  a 401 without calling the Tuist server;
* a Tuist server that cannot be reached is a 503 ``Authentication backend
  unavailable`` (upstream: a hook error, hence 401).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from kura.auth import Allow, Deny, ExtensionHost, HookContext, HostError, Principal

#: The id of both the JWT verifier and the HTTP client.
TUIST = "tuist"
INTROSPECT_CLIENT_ID = "KURA_EXTENSION_TUIST_INTROSPECT_CLIENT_ID"
INTROSPECT_CLIENT_SECRET = "KURA_EXTENSION_TUIST_INTROSPECT_CLIENT_SECRET"

ALLOW_TTL = 60
DENY_TTL = 3

Grants = dict[str, dict[str, list[str]]]


@attrs.frozen
class Target:
    """What a request addresses: an account, or a project of that account."""

    scope: str  # "account" or "project"
    identifier: str  # "tenant" or "tenant/namespace"


def _handles(values: object) -> list[str]:
    """Lower-cased non-empty strings of a JSON list (anything else: none)."""
    if not isinstance(values, list):
        return []
    return [value.lower() for value in values if isinstance(value, str) and value]


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def cache_grants(body: object) -> Grants:
    """The ``cache_grants`` of a JWT or introspection body, normalised."""
    grants = body.get("cache_grants") if isinstance(body, dict) else None
    grants = grants if isinstance(grants, dict) else {}
    normalised: Grants = {}
    for scope in ("account", "project"):
        bucket = grants.get(scope)
        bucket = bucket if isinstance(bucket, dict) else {}
        normalised[scope] = {
            "read": _handles(bucket.get("read")),
            "write": _handles(bucket.get("write")),
        }
    return normalised


def grants_present(grants: Grants) -> bool:
    return any(grants[scope][action] for scope in grants for action in ("read", "write"))


def grant_allows(grants: Any, scope: str, action: str, identifier: str) -> bool:
    """Whether ``grants`` allow ``action`` on ``identifier``; write implies read."""
    bucket = grants.get(scope) if isinstance(grants, dict) else None
    if not isinstance(bucket, dict):
        return False
    actions = ("read", "write") if action == "read" else (action,)
    return any(identifier in (bucket.get(a) or ()) for a in actions)


def _text(value: object, default: str) -> str:
    if value is None or value == "":
        return default
    return str(value)


def principal_from_grants(subject: object, kind: object, grants: Grants) -> Principal:
    return Principal(
        _text(subject, TUIST),
        _text(kind, "subject"),
        {
            "cache_grants": grants,
            "accounts": _unique(grants["account"]["read"] + grants["account"]["write"]),
            "projects": _unique(grants["project"]["read"] + grants["project"]["write"]),
        },
        ttl_seconds=ALLOW_TTL,
    )


def principal_from_projects(subject: object, kind: object, projects: list[str]) -> Principal:
    """A principal proven by project handles only (legacy JWTs, /api/cache/access)."""
    return Principal(
        _text(subject, TUIST),
        _text(kind, "subject"),
        {"accounts": [], "projects": projects},
        ttl_seconds=ALLOW_TTL,
    )


def project_handles(body: object) -> list[str]:
    """``projects`` of an ``/api/cache/access`` body: names or ``{full_name}``."""
    projects = body.get("projects") if isinstance(body, dict) else None
    names = []
    for project in projects if isinstance(projects, list) else ():
        name = project.get("full_name") if isinstance(project, dict) else project
        if isinstance(name, str) and name:
            names.append(name.lower())
    return names


def _first(*values: str | None) -> str | None:
    return next((value.lower() for value in values if value), None)


def request_target(ctx: HookContext) -> Target | Deny:
    """The account or project the request acts on, or why it cannot go on.

    Only the context's derived fields are read (``tenant_id``,
    ``namespace_id``): they are what kura then acts on, whatever else the
    query string holds.
    """
    tenant = _first(ctx.server_tenant_id)
    if tenant is None:
        return Deny(503, "Server tenant is unavailable", ttl_seconds=DENY_TTL)
    requested = _first(ctx.tenant_id)
    if requested is not None and requested != tenant:
        return Deny(
            403,
            f"Forbidden: tenant '{requested}' is routed to server for '{tenant}'",
            ttl_seconds=DENY_TTL,
        )
    if requested is None and ctx.transport != "grpc":
        return Deny(400, "Missing tenant_id/account_handle", ttl_seconds=DENY_TTL)
    namespace = _first(ctx.namespace_id)
    if namespace is None:
        return Target("account", tenant)
    return Target("project", f"{tenant}/{namespace}")


def request_action(ctx: HookContext) -> str:
    """``read`` or ``write``, from the operation, else from the method."""
    operation = (ctx.operation or "").lower()
    if operation.endswith((".read", ".inspect")):
        return "read"
    if operation.endswith((".write", ".delete")):
        return "write"
    return "read" if ctx.method.upper() in ("GET", "HEAD") else "write"


def _unavailable(ttl: float = DENY_TTL) -> Deny:
    return Deny(503, "Authentication backend unavailable", ttl_seconds=ttl)


def _invalid_token() -> Deny:
    return Deny(401, "Invalid or expired token", ttl_seconds=DENY_TTL)


class TuistPolicy:
    """The hooks; built by :func:`setup` with the kura host."""

    def __init__(self, host: ExtensionHost) -> None:
        self._host = host

    def _introspection_credentials(self) -> tuple[str, str] | None:
        client_id = self._host.env(INTROSPECT_CLIENT_ID)
        secret = self._host.env(INTROSPECT_CLIENT_SECRET)
        return (client_id, secret) if client_id and secret else None

    def _claims(self, token: str) -> dict[str, Any] | None:
        try:
            return self._host.jwt_verify(TUIST, token)
        except HostError:  # not a JWT, bad signature, expired, no verifier
            return None

    async def authenticate(self, ctx: HookContext) -> Principal | Deny:
        authorization = ctx.header("authorization")
        if not authorization:
            return Deny(401, "Missing Authorization header", ttl_seconds=DENY_TTL)
        target = request_target(ctx)
        if isinstance(target, Deny):
            return attrs.evolve(target, ttl_seconds=0)
        token = ctx.bearer_token()
        if token is None:
            return _invalid_token()

        claims = self._claims(token)
        if claims is not None:
            grants = cache_grants(claims)
            action = request_action(ctx)
            if grants_present(grants) and grant_allows(
                grants, target.scope, action, target.identifier
            ):
                return principal_from_grants(claims.get("sub"), claims.get("type"), grants)
            if claims.get("scopes") is None and target.scope == "project":
                projects = _handles(claims.get("projects"))
                if target.identifier in projects:
                    return principal_from_projects(claims.get("sub"), claims.get("type"), projects)

        result = await self._ask_tuist(token, authorization, target)
        if claims is not None and isinstance(result, Deny):
            # A valid JWT that does not grant *this* target: the deny is about
            # the request, so it must not be cached for the token's next one.
            return attrs.evolve(result, ttl_seconds=0)
        return result

    async def _ask_tuist(self, token: str, authorization: str, target: Target) -> Principal | Deny:
        credentials = self._introspection_credentials()
        if credentials is not None:
            return await self._introspect(token, *credentials)
        if target.scope == "project":
            return await self._cache_access(authorization)
        return _unavailable(ttl=0)

    async def _introspect(self, token: str, client_id: str, secret: str) -> Principal | Deny:
        try:
            response = await self._host.http_json(
                TUIST,
                "/oauth2/introspect",
                method="POST",
                body={"client_id": client_id, "client_secret": secret, "token": token},
            )
        except HostError:
            return _unavailable()
        body = response.body
        if response.status != 200 or not isinstance(body, dict):
            return _unavailable()
        if body.get("active") is not True:
            return _invalid_token()
        return principal_from_grants(
            body.get("sub"), body.get("principal_kind"), cache_grants(body)
        )

    async def _cache_access(self, authorization: str) -> Principal | Deny:
        try:
            response = await self._host.http_json(
                TUIST, "/api/cache/access", headers={"authorization": authorization}
            )
        except HostError:
            return _unavailable()
        if response.status == 200 and isinstance(response.body, dict):
            return principal_from_projects(TUIST, "subject", project_handles(response.body))
        if response.status == 401:
            return _invalid_token()
        return _unavailable()

    def authorize(self, ctx: HookContext, principal: Principal | None) -> Allow | Deny:
        if principal is None:
            return Deny(401, "Unauthorized", ttl_seconds=DENY_TTL)
        target = request_target(ctx)
        if isinstance(target, Deny):
            return target
        action = request_action(ctx)
        # Grants are per account or project, never per artifact: the decision
        # holds for every key of the namespace (with everything else equal).
        grants = principal.attributes.get("cache_grants")
        if grants is not None and grant_allows(grants, target.scope, action, target.identifier):
            return Allow(ttl_seconds=ALLOW_TTL, scope="namespace")
        projects = principal.attributes.get("projects") or ()
        if grants is None and target.scope == "project" and target.identifier in projects:
            return Allow(ttl_seconds=ALLOW_TTL, scope="namespace")
        return Deny(
            403,
            f"Forbidden: {target.scope} '{target.identifier}' is not granted to this "
            f"principal for {action}",
            ttl_seconds=DENY_TTL,
            scope="namespace",
        )


def setup(host: ExtensionHost) -> TuistPolicy:
    """Called once by kura at start-up."""
    return TuistPolicy(host)

"""CI OIDC ID tokens as cache credentials, as an extension.

The built-in ``KURA_AUTH_OIDC_*`` mode covers the common case (one issuer,
claim rules for read and write); this example shows the same with the host's
JWKS verifier, for policies the built-in rules cannot express (here: a
namespace per repository). Configure:

* ``KURA_EXTENSION_SCRIPT_PATH=examples/extensions/ci_oidc.py``
* ``KURA_EXTENSION_JWT_VERIFIER_CI_JWKS_URL=https://token.actions.githubusercontent.com/.well-known/jwks``
* ``KURA_EXTENSION_JWT_VERIFIER_CI_ISSUER=https://token.actions.githubusercontent.com``
* ``KURA_EXTENSION_JWT_VERIFIER_CI_AUDIENCES=<your cache's URL>``
* ``KURA_EXTENSION_CI_OWNER=<your GitHub organisation>``

A token of the organisation may read every namespace and write the
namespace named after its repository (``acme/app`` writes ``app``) from the
default branch.
"""

from __future__ import annotations

from typing import Any

from kura.auth import Allow, Deny, HookContext, Principal, TokenInvalid


class CiOidc:
    def __init__(self, host: Any) -> None:
        self.host = host
        self.owner = host.env("KURA_EXTENSION_CI_OWNER")

    async def authenticate(self, ctx: HookContext) -> Principal | Deny:
        token = ctx.bearer_token()
        if token is None:
            return Deny(401, "Missing bearer token")
        try:
            # The awaitable form: the keys may have to be fetched first.
            claims = await self.host.jwt_verify_async("ci", token)
        except TokenInvalid:
            return Deny(401, "Invalid token")
        if claims.get("repository_owner") != self.owner:
            return Deny(403, "Forbidden: not a repository of this organisation")
        repository = str(claims.get("repository", ""))
        return Principal(
            str(claims.get("sub")),
            "oidc",
            {
                "repository": repository.partition("/")[2],
                "main": claims.get("ref") == "refs/heads/main",
            },
            # Never beyond the token's own expiry (tokens live minutes).
            ttl_seconds=60,
        )

    def authorize(self, ctx: HookContext, principal: Principal | None) -> Allow | Deny:
        if principal is None:
            return Deny(401, "Missing bearer token")
        if ctx.operation == "artifact.read":
            return Allow(scope="namespace")
        attributes = principal.attributes
        if attributes["main"] and ctx.namespace_id == attributes["repository"]:
            return Allow(scope="namespace")
        return Deny(
            403, "Forbidden: writes need the repository's default branch", scope="namespace"
        )


def setup(host: Any) -> CiOidc:
    return CiOidc(host)

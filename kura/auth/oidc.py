"""The built-in OIDC mode: CI ID tokens as read or write credentials.

With ``KURA_AUTH_OIDC_ISSUER`` set, :class:`OidcAccess` guards the public
port. A presented token (``Authorization: Bearer``, or the password of Basic
credentials, as for static tokens) that is a JWT whose ``iss`` is the
configured issuer is verified with the issuer's public keys
(:class:`~kura.auth.tokens.JwksJwtVerifier`: signature, algorithm
allow-list, ``iss``, ``aud``, ``exp``, ``nbf``, ``iat``); anything else goes
to the static token table (``KURA_AUTH_*_TOKENS``) when one is configured.

==================================================  ==========================================
a verified token                                    answer
==================================================  ==========================================
matches ``KURA_AUTH_OIDC_WRITE_CLAIMS``             reads, writes, cleans and deletes
matches ``KURA_AUTH_OIDC_READ_CLAIMS`` only         reads; anything else 403
matches neither                                     403
==================================================  ==========================================

An invalid token (bad signature, wrong issuer or audience, expired, unknown
key, keys not fetched yet) is a 401 ``Invalid token``. Missing credentials
are handled as with static tokens (``KURA_AUTH_ANONYMOUS_READ`` applies).
A rule matches when every ``claim=value`` pair of it equals a string claim of
the token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent
from zope.interface import implementer

from kura.config.access import AccessConfig, ClaimRule, OidcConfig, Scope
from kura.config.extension import JwtVerifierConfig
from kura.domain.errors import Forbidden, Unauthorized

from .builtin import _READ_OPERATIONS, CHALLENGE, TokenAccess, is_read, presented_token
from .context import HookContext
from .interfaces import IRequestAuthorizer
from .results import ANONYMOUS, Anonymous, Principal
from .tokens import JwksJwtVerifier, TokenInvalid, build_verifier, unverified_issuer


def matches(rule: ClaimRule, claims: dict[str, Any]) -> bool:
    """Whether every pair of ``rule`` equals a string claim (an empty rule never matches)."""
    return bool(rule) and all(claims.get(name) == value for name, value in rule)


@implementer(IRequestAuthorizer)
class OidcAccess:
    """OIDC ID tokens, plus the static tokens if any (see the module docstring).

    Args:
        config: the access rules (``config.oidc`` must be set).
        clock: token times, key refreshes.
        agent: builds the ``IAgent`` the keys are fetched through.
        on_fetched: told the result (``ok``/``error``) of each key fetch.
    """

    mode = "oidc"
    adds_headers = False

    def __init__(
        self,
        config: AccessConfig,
        *,
        clock: IReactorTime,
        agent: Callable[[], IAgent],
        on_fetched: Callable[[str], None] = lambda result: None,
    ) -> None:
        oidc = config.oidc
        assert oidc is not None
        self._oidc: OidcConfig = oidc
        self._anonymous_read = config.anonymous_read
        self._tokens = TokenAccess(config) if config.uses_tokens else None
        verifier = build_verifier(
            "oidc",
            JwtVerifierConfig(
                algorithm=oidc.algorithms[0],
                issuer=oidc.issuer,
                audiences=oidc.audiences,
                jwks_url=oidc.jwks_url,
                jwks_algorithms=oidc.algorithms,
            ),
            clock=clock,
            agent=agent,
            discover_issuer=True,
            on_fetched=on_fetched,
        )
        assert isinstance(verifier, JwksJwtVerifier)
        self.verifier = verifier

    def checks(self, operation: str) -> bool:
        return not (self._anonymous_read and operation in _READ_OPERATIONS)

    async def check(self, ctx: HookContext) -> Principal | Anonymous:
        """The caller's principal; raises the 401 or 403 of the module docstring."""
        token = presented_token(ctx)
        if token is None or unverified_issuer(token) != self._oidc.issuer:
            if token is None and is_read(ctx) and self._anonymous_read:
                return ANONYMOUS
            if self._tokens is not None:
                return self._tokens.decide(ctx)
            if token is None:
                raise Unauthorized(
                    "Authentication required: send Authorization: Bearer <token>",
                    challenge=CHALLENGE,
                )
            raise Unauthorized("Invalid token", challenge=CHALLENGE)
        try:
            claims = await self.verifier.verify_async(token)
        except TokenInvalid:
            raise Unauthorized("Invalid token", challenge=CHALLENGE) from None
        subject = claims.get("sub")
        name = subject if isinstance(subject, str) and subject else "unknown"
        if matches(self._oidc.write_claims, claims):
            scope = Scope.WRITE
        elif matches(self._oidc.read_claims, claims):
            scope = Scope.READ
        else:
            raise Forbidden(f"Forbidden: OIDC token '{name}' matches no read or write rule")
        if scope is not Scope.WRITE and not is_read(ctx):
            raise Forbidden(f"Forbidden: OIDC token '{name}' may only read")
        return Principal(name, "oidc", {"scope": scope.value})

    async def response_headers(
        self, ctx: HookContext, principal: Principal | Anonymous | None
    ) -> list[tuple[bytes, bytes]]:
        return []

    def clear_caches(self) -> int:
        return 0

    def start(self) -> None:
        """Start fetching the issuer's keys (readiness does not wait for them)."""
        self.verifier.keys.start()

    def close(self) -> Deferred[None]:
        self.verifier.keys.stop()
        return succeed(None)

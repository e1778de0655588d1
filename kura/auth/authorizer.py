"""Running an extension for requests: :class:`ExtensionAuthorizer`.

:meth:`ExtensionAuthorizer.check` runs ``authenticate`` then ``authorize``
(each cached, single-flight, under the hook deadline) and either returns who
the request runs as or raises the ``KuraError`` to answer with:

========================================  ===================================
outcome                                   answer
========================================  ===================================
``Deny(status, message)``                 ``status`` with ``message``
authenticate raised/timed out/garbage     401 ``Authentication failed``
authorize raised/timed out/garbage        403 ``Forbidden``
========================================  ===================================

(with ``KURA_EXTENSION_AUTH_FAIL_CLOSED=false`` the last two become
"anonymous" and "allowed"). Hook failures are never cached, so a recovered
backend is used at once.

:meth:`ExtensionAuthorizer.response_headers` runs the third hook for every
response and returns sanitized header bytes, plus the HMAC signature the
hook asked for. It does not raise: a failure yields only
``x-kura-extension-error: response_headers`` (or, with
``KURA_EXTENSION_RESPONSE_HEADERS_FAIL_OPEN=false``, a 503).

:mod:`kura.auth.builtin` has the same interface for nodes without an extension.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kura.config.extension import ExtensionConfig, normalize_id
from kura.domain.errors import Forbidden, ServiceUnavailable, Unauthorized
from kura.telemetry.metrics import KuraMetrics

from .cache import ResultCache
from .context import HookContext
from .headers import EXTENSION_ERROR_HEADER, sanitize
from .hooks import HookFailed, HookRunner
from .interfaces import IRequestAuthorizer
from .keys import authenticate_key, authorize_key, credential_fingerprint
from .loader import LoadedExtension
from .results import (
    ALLOW,
    ANONYMOUS,
    Allow,
    Anonymous,
    AuthenticateResult,
    AuthorizeResult,
    Deny,
    Headers,
    Principal,
)
from .signing import hmac_sha256_base64

log = Logger(namespace="kura.auth")

UNKNOWN_SIGNER = "extension response_headers asked for unknown signer {signer!r}"
RESPONSE_HEADERS_BROKEN = "extension response_headers result could not be applied"

AUTHENTICATION_FAILED = "Authentication failed"
FORBIDDEN = "Forbidden"


class _SigningFailed(Exception):
    pass


@implementer(IRequestAuthorizer)
class ExtensionAuthorizer:
    """Runs one loaded extension (see the module docstring).

    Args:
        extension: the loaded hooks and their fingerprint.
        config: TTLs, capacity, deadline, failure policy, signers.
        clock: every deadline and TTL is measured on it.
        metrics: hook and cache metrics.
        host: the host the extension was set up with (closed by :meth:`close`).
    """

    mode = "extension"
    adds_headers = True

    def __init__(
        self,
        extension: LoadedExtension,
        config: ExtensionConfig,
        *,
        clock: IReactorTime,
        metrics: KuraMetrics,
        host: Any = None,
    ) -> None:
        self._hooks = extension.hooks
        self._fingerprint = extension.fingerprint
        self._config = config
        self._host = host
        self._runner = HookRunner(
            clock=clock, timeout_seconds=config.hook_timeout_ms / 1000, metrics=metrics
        )
        lookups = metrics.extension_cache_lookups
        self._authenticated: ResultCache[AuthenticateResult] = ResultCache(
            clock=clock,
            max_entries=config.cache_max_entries,
            record=lambda outcome: lookups.labels("authenticate", outcome).inc(),
        )
        self._authorized: ResultCache[AuthorizeResult] = ResultCache(
            clock=clock,
            max_entries=config.cache_max_entries,
            record=lambda outcome: lookups.labels("authorize", outcome).inc(),
        )

    # -- check --------------------------------------------------------------------

    def checks(self, operation: str) -> bool:
        # The extension decides on every request.
        return True

    async def check(self, ctx: HookContext) -> Principal | Anonymous:
        """Who the request runs as; raises the ``KuraError`` of a deny.

        Raises:
            Unauthorized: a 401 deny, or authenticate failed (fail-closed).
            Forbidden: a 403 deny, or authorize failed (fail-closed).
            KuraError: a deny with any other status (503, 400 ...).
        """
        credentials = credential_fingerprint(ctx.headers)
        principal = await self._authenticate(ctx, credentials)
        await self._authorize(ctx, credentials, principal)
        return principal

    def _ttl(self, result: AuthenticateResult | AuthorizeResult) -> float:
        if result.ttl_seconds is not None:
            return result.ttl_seconds
        if isinstance(result, Deny):
            return self._config.deny_ttl_seconds
        return self._config.allow_ttl_seconds

    async def _authenticate(self, ctx: HookContext, credentials: str) -> Principal | Anonymous:
        hook = self._hooks.authenticate
        if hook is None:
            return ANONYMOUS

        async def run() -> AuthenticateResult:
            result: AuthenticateResult = await self._runner.run(
                "authenticate", hook, (Principal, Anonymous, Deny), ctx
            )
            return result

        key = authenticate_key(self._fingerprint, credentials)
        try:
            result = await self._authenticated.resolve(key, run, self._ttl)
        except HookFailed:
            if self._config.auth_fail_closed:
                raise Unauthorized(AUTHENTICATION_FAILED) from None
            return ANONYMOUS
        if isinstance(result, Deny):
            raise result.to_error()
        return result

    async def _authorize(
        self, ctx: HookContext, credentials: str, principal: Principal | Anonymous
    ) -> None:
        hook = self._hooks.authorize
        if hook is None:
            return
        who = principal if isinstance(principal, Principal) else None

        async def run() -> AuthorizeResult:
            result: AuthorizeResult = await self._runner.run(
                "authorize", hook, (Allow, Deny), ctx, who
            )
            return result

        key = authorize_key(self._fingerprint, credentials, ctx, principal)
        namespace_key = authorize_key(
            self._fingerprint, credentials, ctx, principal, scope="namespace"
        )
        try:
            result = await self._authorized.resolve(
                key,
                run,
                self._ttl,
                wider=namespace_key,
                stored_under=lambda r: namespace_key if r.scope == "namespace" else key,
            )
        except HookFailed:
            if self._config.auth_fail_closed:
                raise Forbidden(FORBIDDEN) from None
            result = ALLOW
        if isinstance(result, Deny):
            raise result.to_error()

    # -- response headers ---------------------------------------------------------------

    async def response_headers(
        self, ctx: HookContext, principal: Principal | Anonymous | None
    ) -> list[tuple[bytes, bytes]]:
        """Extra response headers for ``ctx`` (which carries ``status_code``).

        Returns:
            Lower-cased ``(name, value)`` byte pairs, safe to add to the
            response head; ``[(b"x-kura-extension-error",
            b"response_headers")]`` when the hook failed.

        Raises:
            ServiceUnavailable: only when the hook failed and
                ``KURA_EXTENSION_RESPONSE_HEADERS_FAIL_OPEN`` is false.
            CancelledError: only when the caller was cancelled.
        """
        hook = self._hooks.response_headers
        if hook is None:
            return []
        who = principal if isinstance(principal, Principal) else None
        try:
            result = await self._runner.run(
                "response_headers", hook, (Headers, type(None)), ctx, who
            )
            return [] if result is None else self._apply(result)
        except CancelledError:
            raise
        except HookFailed:
            pass
        except _SigningFailed:
            pass
        except Exception:
            log.failure(RESPONSE_HEADERS_BROKEN, Failure())
        if not self._config.response_headers_fail_open:
            raise ServiceUnavailable("Extension response headers failed", retry_after=None)
        return [EXTENSION_ERROR_HEADER]

    def _apply(self, result: Headers) -> list[tuple[bytes, bytes]]:
        pairs = sanitize(result.headers.items())
        sign = result.sign
        if sign is not None:
            signer = self._config.signers.get(normalize_id(sign.signer))
            if signer is None:
                log.warn(UNKNOWN_SIGNER, signer=sign.signer)
                raise _SigningFailed(sign.signer)
            pairs += sanitize([(sign.header, hmac_sha256_base64(signer, sign.payload))])
        return pairs

    # -- upkeep ---------------------------------------------------------------------

    def clear_caches(self) -> int:
        """Drop every cached result (critical memory pressure); return the count."""
        return self._authenticated.clear() + self._authorized.clear()

    def start(self) -> None:
        """Start the host's background work (JWKS key fetches)."""
        if self._host is not None:
            self._host.start()

    def close(self) -> Deferred[None]:
        """Close the host's pooled connections."""
        if self._host is None:
            return succeed(None)
        closing: Deferred[None] = self._host.close()
        return closing

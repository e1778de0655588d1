"""The authorizers a node runs without an extension: tokens, or open access.

Which one a node runs (:func:`kura.auth.factory.build_authorizer`):

==============================  ======================================================
configuration                   authorizer
==============================  ======================================================
an extension                    the extension (it replaces everything here)
``KURA_AUTH_OIDC_ISSUER``       :class:`~kura.auth.oidc.OidcAccess` (with any tokens)
tokens (``KURA_AUTH_*``)        :class:`TokenAccess`
none of these                   :class:`OpenAccess` (open mode, warned at start)
==============================  ======================================================

:class:`TokenAccess` answers:

=============================================  ==============================================
request                                        answer
=============================================  ==============================================
read, no token, anonymous reads on             served, anonymous
no token (otherwise)                           401 ``Authentication required`` + challenge
a token no one configured                      401 ``Invalid token``
a write, clean or delete with a read token     403
a configured token, within its scope           served as that token's principal
=============================================  ==============================================

Tokens arrive as ``Authorization: Bearer <token>`` or as the password of
``Authorization: Basic`` (Gradle, Bazel, ccache and sccache send Basic
credentials from a URL or their settings). The presented token is hashed and
compared, in constant time, with every configured digest.

:class:`OpenAccess` serves everyone anonymously, except cleans and deletes,
which it refuses unless ``KURA_ALLOW_ANONYMOUS_DELETE=true``: an open cache
may be filled by anyone, but not wiped by anyone.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from kura.config.access import AccessConfig, AccessToken, Scope, token_digest
from kura.domain.errors import Forbidden, Unauthorized

from .context import HookContext
from .interfaces import IRequestAuthorizer
from .results import ANONYMOUS, Anonymous, Principal

#: What a 401 offers: clients that send credentials only when challenged
#: (Basic from a URL's user info) do so then.
CHALLENGE = 'Bearer realm="kura", Basic realm="kura"'
#: Operations that only read; a ``request`` is a read when its method is.
_READ_OPERATIONS = frozenset({"artifact.read"})
_READ_METHODS = frozenset({"GET", "HEAD", "PROPFIND", "OPTIONS"})
DESTRUCTIVE_OPERATIONS = frozenset({"artifact.delete", "namespace.delete"})
OPEN_DELETE_REFUSED = (
    "Forbidden: this node runs in open mode (no tokens, no extension); cleaning and "
    "deleting need KURA_ALLOW_ANONYMOUS_DELETE=true"
)


def is_read(ctx: HookContext) -> bool:
    """Whether the request only reads (its operation, else its method)."""
    if ctx.operation in _READ_OPERATIONS:
        return True
    return ctx.operation == "request" and ctx.method.upper() in _READ_METHODS


def presented_token(ctx: HookContext) -> str | None:
    """The token of a Bearer header, or the password of a Basic one.

    Malformed credentials are ``None`` (a 401), never an exception.
    """
    bearer = ctx.bearer_token()
    if bearer is not None:
        return bearer
    value = ctx.header("authorization")
    if value is None:
        return None
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon and password else None


class _BuiltIn:
    """What built-in authorizers share: a decision that never waits, no response
    headers, no cache, nothing to close."""

    #: No ``response_headers`` hook runs: callers skip it (and its context).
    adds_headers = False

    def decide(self, ctx: HookContext) -> Principal | Anonymous:
        """:meth:`check`, synchronously (the serving paths call this directly)."""
        raise NotImplementedError

    async def check(self, ctx: HookContext) -> Principal | Anonymous:
        return self.decide(ctx)

    async def response_headers(
        self, ctx: HookContext, principal: Principal | Anonymous | None
    ) -> list[tuple[bytes, bytes]]:
        return []

    def clear_caches(self) -> int:
        return 0

    def start(self) -> None:
        pass

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IRequestAuthorizer)
class TokenAccess(_BuiltIn):
    """Read and write tokens (see the module docstring).

    Args:
        config: the configured tokens and rules.
    """

    mode = "tokens"

    def __init__(self, config: AccessConfig) -> None:
        self._tokens = config.tokens
        self._anonymous_read = config.anonymous_read
        # One principal per token, built once: a check allocates nothing.
        self._principals = {
            token.digest: Principal(token.name, "token", {"scope": token.scope.value})
            for token in config.tokens
        }

    def checks(self, operation: str) -> bool:
        # With anonymous reads, plain reads are not checked at all (as
        # bazel-remote's unauthenticated reads): no context is built for them.
        return not (self._anonymous_read and operation in _READ_OPERATIONS)

    def _find(self, token: str) -> AccessToken | None:
        digest = token_digest(token)
        found = None
        for candidate in self._tokens:
            # Every digest is compared: the time taken says nothing about
            # which token (if any) matched.
            if hmac.compare_digest(candidate.digest, digest) and found is None:
                found = candidate
        return found

    def decide(self, ctx: HookContext) -> Principal | Anonymous:
        """The token's principal; raises the 401 or 403 of the module docstring."""
        read = is_read(ctx)
        token = presented_token(ctx)
        if token is None:
            if read and self._anonymous_read:
                return ANONYMOUS
            raise Unauthorized(
                "Authentication required: send Authorization: Bearer <token>",
                challenge=CHALLENGE,
            )
        found = self._find(token)
        if found is None:
            raise Unauthorized("Invalid token", challenge=CHALLENGE)
        if not read and found.scope is not Scope.WRITE:
            raise Forbidden(f"Forbidden: token '{found.name}' may only read")
        return self._principals[found.digest]


@implementer(IRequestAuthorizer)
class OpenAccess(_BuiltIn):
    """Open mode: everyone may read and write; cleans and deletes only if allowed.

    Args:
        allow_anonymous_delete: ``KURA_ALLOW_ANONYMOUS_DELETE``.
    """

    mode = "open"

    def __init__(self, *, allow_anonymous_delete: bool = False) -> None:
        self._allow_delete = allow_anonymous_delete

    def checks(self, operation: str) -> bool:
        return operation in DESTRUCTIVE_OPERATIONS and not self._allow_delete

    def decide(self, ctx: HookContext) -> Principal | Anonymous:
        if ctx.operation in DESTRUCTIVE_OPERATIONS and not self._allow_delete:
            raise Forbidden(OPEN_DELETE_REFUSED)
        return ANONYMOUS

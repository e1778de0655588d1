"""The seams of the authorization extension.

:class:`IExtension` is what an extension author writes (every method is
optional); :class:`IRequestAuthorizer` is what the HTTP layer calls.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IExtension(Interface):
    """An authorization extension: up to three hooks, each optional.

    Each hook may return its result directly, a ``Deferred`` of it, or a
    coroutine (``async def``). A hook runs on the reactor thread: it must
    not block (use the host's HTTP client, not ``requests``). A missing hook
    means: every request is anonymous (``authenticate``), everything is
    allowed (``authorize``), no extra headers (``response_headers``).

    An object may provide only some of these methods; declare
    ``@implementer(IExtension)`` only when it provides all three.
    """

    def authenticate(ctx: Any) -> Any:
        """Identify the caller from ``ctx`` (a :class:`~kura.auth.HookContext`).

        Returns a ``Principal``, ``Anonymous`` or ``Deny``. Cached per
        credential headers (``authorization``, ``proxy-authorization``,
        ``cookie``, ``x-api-key``) for the result's ``ttl_seconds``: a
        result must depend only on those headers, or use ``ttl_seconds=0``.
        """

    def authorize(ctx: Any, principal: Any) -> Any:
        """Decide whether ``principal`` (``None`` when anonymous) may do
        ``ctx.operation`` on the request's tenant/namespace.

        Returns ``Allow`` or ``Deny``. Cached per credentials, principal,
        tenants, namespace, operation, producer, route and method.
        """

    def response_headers(ctx: Any, principal: Any) -> Any:
        """Extra headers for the response (``ctx.status_code`` is set).

        Returns ``Headers`` or ``None``. Never cached; runs for every
        response that passed ``check``.
        """


class IRequestAuthorizer(Interface):
    """What the HTTP layer calls, once per public non-probe request.

    Implemented by the extension runner and by the built-in token and open
    authorizers (:mod:`kura.auth.builtin`).
    """

    mode = Attribute(
        "How the public port is guarded: ``extension``, ``oidc``, ``tokens`` or ``open`` (reported "
        "in /status/rollout)."
    )

    adds_headers = Attribute(
        "Whether ``response_headers`` may add anything; when false callers skip it."
    )

    def checks(operation: str) -> bool:
        """Whether requests with this operation must go through ``check``.

        When false the request runs anonymous and callers skip building a
        context at all (the cheap path of open mode and anonymous reads).
        """

    def check(ctx: Any) -> Any:
        """Coroutine: the ``Principal``/``Anonymous`` the request runs as.

        Raises a ``KuraError`` carrying the deny status and message.
        """

    def response_headers(ctx: Any, principal: Any) -> Any:
        """Coroutine: extra ``(name, value)`` byte pairs for the response."""

    def clear_caches() -> int:
        """Drop every cached hook result; return how many were dropped."""

    def start() -> None:
        """Start background work (the OIDC and JWKS key fetches) at node start."""

    def close() -> Any:
        """Release resources (HTTP connections); returns a ``Deferred``."""

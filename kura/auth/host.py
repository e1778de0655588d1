"""The ``kura`` host object: what kura offers an extension's code.

An extension receives it through ``setup(host)`` (see
:mod:`kura.auth.loader`). It mirrors upstream's Lua ``kura`` table:

* :meth:`ExtensionHost.jwt_verify` — HS256/384/512 JWTs with issuer and
  audience checks (``KURA_EXTENSION_JWT_VERIFIER_<ID>_*``), and
  :meth:`ExtensionHost.jwt_verify_async`, its coroutine form, which also
  verifies RS*/PS*/ES*/EdDSA tokens with keys from a JWKS URL;
* :meth:`ExtensionHost.http_json` — JSON over HTTP with deadlines and one
  retry (``KURA_EXTENSION_HTTP_CLIENT_<ID>_*``);
* :meth:`ExtensionHost.sign_hmac_base64` — HMAC-SHA256, base64
  (``KURA_EXTENSION_SIGNER_<ID>_*``);
* :meth:`ExtensionHost.env` — the node's environment;

plus :meth:`ExtensionHost.constant_time_equals` for comparing secrets, a
``log`` and the ``clock``. Ids are case-insensitive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from kura.config.extension import ExtensionConfig, HttpClientConfig, normalize_id
from kura.telemetry.metrics import KuraMetrics

from .errors import UnknownResource
from .http_client import JsonHttpClient, JsonResponse
from .signing import constant_time_equals, hmac_sha256_base64
from .tokens import JwksJwtVerifier, JwtVerifier, build_verifier

AgentFactory = Callable[[HttpClientConfig], IAgent]


def _fetch_counter(metrics: KuraMetrics, verifier: str) -> Callable[[str], None]:
    """Counts one verifier's key fetches in ``kura_jwks_fetches_total``."""

    def count(result: str) -> None:
        metrics.jwks_fetches.labels(verifier, result).inc()

    return count


class ExtensionHost:
    """See the module docstring.

    Args:
        config: the extension configuration (resources and environment).
        reactor: the reactor: time, and (as IReactorTCP) the HTTP clients'
            connections.
        metrics: the node's metrics.
        agent_for: builds the ``IAgent`` of one HTTP client; by default a
            treq-compatible ``Agent`` on ``reactor`` with the client's
            connect timeout and a shared persistent connection pool.
    """

    #: For extensions' own log events (namespace ``kura.extension``).
    log = Logger(namespace="kura.extension")

    def __init__(
        self,
        config: ExtensionConfig,
        *,
        reactor: IReactorTime,
        metrics: KuraMetrics,
        agent_for: AgentFactory | None = None,
    ) -> None:
        self.clock: IReactorTime = reactor
        self._environ = config.environ
        self._pool: HTTPConnectionPool | None = None
        if agent_for is None:
            pool = self._pool = HTTPConnectionPool(reactor, persistent=True)

            def agent_for(client: HttpClientConfig) -> IAgent:
                return Agent(reactor, connectTimeout=client.connect_timeout_ms / 1000, pool=pool)

        def jwks_agent(url: str | None) -> Callable[[], IAgent]:
            # The JWKS travels through the same agent factory as the clients.
            client = HttpClientConfig(
                base_url=url or "", connect_timeout_ms=5_000, request_timeout_ms=10_000
            )
            return lambda: agent_for(client)

        self._verifiers: dict[str, JwtVerifier | JwksJwtVerifier] = {
            rid: build_verifier(
                f"extension:{rid}",
                verifier,
                clock=reactor,
                agent=jwks_agent(verifier.jwks_url),
                on_fetched=_fetch_counter(metrics, f"extension:{rid}"),
            )
            for rid, verifier in config.jwt_verifiers.items()
        }
        self._clients = {
            rid: JsonHttpClient(
                rid, client, agent=agent_for(client), clock=reactor, metrics=metrics
            )
            for rid, client in config.http_clients.items()
        }
        self._signers = dict(config.signers)

    def _verifier(self, verifier_id: str) -> JwtVerifier | JwksJwtVerifier:
        verifier = self._verifiers.get(normalize_id(verifier_id))
        if verifier is None:
            raise UnknownResource(f"unknown JWT verifier {verifier_id!r}")
        return verifier

    def jwt_verify(self, verifier_id: str, token: str | bytes) -> dict[str, Any]:
        """The claims of ``token``, checked by HS* verifier ``verifier_id``.

        Raises:
            UnknownResource: no such verifier is configured.
            TokenInvalid: bad signature, algorithm, issuer, audience, expiry,
                or malformed/non-ASCII input.
            AwaitRequired: the verifier uses a JWKS URL (its keys may have to
                be fetched): use :meth:`jwt_verify_async`.
        """
        return self._verifier(verifier_id).verify(token)

    async def jwt_verify_async(self, verifier_id: str, token: str | bytes) -> dict[str, Any]:
        """The claims of ``token``, checked by verifier ``verifier_id`` (a coroutine).

        Works for every verifier: HS* ones answer at once; JWKS ones answer
        at once when they hold the token's key, and otherwise wait for one
        refresh of the key set (at most one per 30 s, shared by concurrent
        callers; see :mod:`kura.auth.jwks`).

        Raises:
            UnknownResource: no such verifier is configured.
            TokenInvalid: as :meth:`jwt_verify`, plus an unknown key id or no
                keys fetched yet (fail closed).
        """
        return await self._verifier(verifier_id).verify_async(token)

    def start(self) -> None:
        """Start fetching the JWKS verifiers' keys (at node start)."""
        for verifier in self._verifiers.values():
            if isinstance(verifier, JwksJwtVerifier):
                verifier.keys.start()

    async def http_json(
        self,
        client_id: str,
        path: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> JsonResponse:
        """Send a request through HTTP client ``client_id`` (a coroutine).

        Args:
            path: appended to the client's base URL.
            method: the HTTP method.
            headers: request headers.
            query: query parameters.
            body: sent as JSON unless ``None``.

        Returns:
            The status, headers and parsed JSON body (``None`` if not JSON).
            Every status is returned; only transport failures raise.

        Raises:
            UnknownResource: no such client is configured.
            HttpClientError: network failure after one retry, or a deadline.
        """
        client = self._clients.get(normalize_id(client_id))
        if client is None:
            raise UnknownResource(f"unknown HTTP client {client_id!r}")
        return await client.request(path, method=method, headers=headers, query=query, body=body)

    def has_http_client(self, client_id: str) -> bool:
        """Whether HTTP client ``client_id`` is configured."""
        return normalize_id(client_id) in self._clients

    def sign_hmac_base64(self, signer_id: str, payload: str | bytes) -> str:
        """The base64 HMAC-SHA256 of ``payload`` with signer ``signer_id``'s key.

        Raises:
            UnknownResource: no such signer is configured.
        """
        signer = self._signers.get(normalize_id(signer_id))
        if signer is None:
            raise UnknownResource(f"unknown signer {signer_id!r}")
        return hmac_sha256_base64(signer, payload)

    def env(self, name: str) -> str | None:
        """The node's environment variable ``name``, or ``None``."""
        return self._environ.get(name)

    @staticmethod
    def constant_time_equals(given: str | bytes, expected: str | bytes) -> bool:
        """Compare secrets without leaking where they differ (see :mod:`.signing`)."""
        return constant_time_equals(given, expected)

    def close(self) -> Deferred[None]:
        """Stop refreshing keys and close pooled HTTP connections (at node shutdown)."""
        for verifier in self._verifiers.values():
            if isinstance(verifier, JwksJwtVerifier):
                verifier.keys.stop()
        if self._pool is None:
            return succeed(None)
        closing: Deferred[None] = self._pool.closeCachedConnections()
        return closing

"""The probes on the public port: ``/up``, ``/ready``, ``/status/rollout`` and ``/metrics``.

Probes skip authorization, draining and public accounting
(``RouteSpec.probe``). ``/status/rollout`` and ``/metrics`` may each require
their own bearer token (``KURA_STATUS_TOKEN``, ``KURA_METRICS_TOKEN``).
"""

from __future__ import annotations

import hmac

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from kura.config.access import AccessConfig, token_digest
from kura.domain.errors import Unauthorized
from kura.lifecycle import NodeState
from kura.telemetry.metrics import KuraMetrics
from kura.web.request import KuraRequest

from .handling import header, json_response
from .table import Route, route


def require_bearer(request: KuraRequest, digest: bytes | None) -> None:
    """Refuse a probe-like route unless it carries the configured bearer token.

    Raises:
        Unauthorized: a token is configured and the request lacks it.
    """
    if digest is None:
        return
    value = header(request, b"authorization") or ""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), digest):
        raise Unauthorized("This endpoint needs its bearer token", challenge='Bearer realm="kura"')


class Probes:
    """The probe routes (see the module docstring).

    Args:
        access: the probes' bearer tokens.
        state: the node's view reported by ``/up``, ``/ready`` and the rollout status.
        metrics: the registry ``/metrics`` renders.
    """

    def __init__(self, *, access: AccessConfig, state: NodeState, metrics: KuraMetrics) -> None:
        self._access = access
        self._state = state
        self._metrics = metrics

    def routes(self) -> tuple[Route, ...]:
        """The probes' rows of the route table."""
        return (
            route("up", "/up", "GET", self.up, probe=True),
            route("ready", "/ready", "GET", self.ready, probe=True),
            route("rollout", "/status/rollout", "GET", self.rollout, probe=True),
            route("metrics", "/metrics", "GET", self.metrics, probe=True),
        )

    async def up(self, request: KuraRequest) -> bytes:
        return json_response(request, 200, self._state.up_report())

    async def ready(self, request: KuraRequest) -> bytes:
        report = self._state.ready_report()
        return json_response(request, 200 if report["ready"] else 503, report)

    async def rollout(self, request: KuraRequest) -> bytes:
        require_bearer(request, self._access.status_token)
        return json_response(request, 200, self._state.rollout_report())

    async def metrics(self, request: KuraRequest) -> bytes:
        require_bearer(request, self._access.metrics_token)
        # Rendered inline from the injected registry: it is CPU-only and small,
        # and prometheus_client's Twisted resource would run it on the global
        # reactor's thread pool (never answering on an injected reactor).
        # Gauges of the store's state are read at collection (set_function).
        body = generate_latest(self._metrics.registry)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE_PLAIN_0_0_4.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

"""The accelerator's metrics, with their labelled children looked up once.

``metric.labels(...)`` validates and looks up its arguments on every call;
the accelerator serves tens of thousands of small responses a second, so it
keeps the children it uses. The gauges are read at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kura.telemetry.metrics import Children, KuraMetrics

from .handles import HandleCache

if TYPE_CHECKING:
    from .accelerator import Permits


class AcceleratorMeters:
    """The metrics an accelerated request updates (see the module docstring).

    Args:
        metrics: the node's metrics.
        mode: the serving-path label of accelerated responses.
        permits: published as ``kura_accelerator_permits_in_use``.
        handles: published as ``kura_accelerator_cached_descriptors``.
    """

    def __init__(
        self, metrics: KuraMetrics, *, mode: str, permits: Permits, handles: HandleCache
    ) -> None:
        # The unlabelled histogram's one child (its observe() looks it up each time).
        self.duration = metrics.http_request_duration.labels()
        self.served = metrics.serving_paths.labels(mode)
        self._fallbacks = Children(metrics.accelerator_fallbacks)
        self._requests = metrics.http_requests
        self._request_children: dict[tuple[str, int], Any] = {}
        metrics.accelerator_permits_in_use.set_function(lambda: float(permits.in_use))
        metrics.accelerator_cached_descriptors.set_function(lambda: float(len(handles)))

    def fallback(self, reason: str) -> None:
        """Count a request (or connection) handed to twisted.web for ``reason``."""
        self._fallbacks(reason).inc()

    def request(self, route: str, status: int) -> Any:
        """The ``kura_http_requests_total`` child of ``route`` and ``status``."""
        child = self._request_children.get((route, status))
        if child is None:
            child = self._request_children[route, status] = self._requests.labels(
                route, str(status)
            )
        return child

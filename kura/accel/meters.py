"""The accelerator's metrics, with their labelled children looked up once.

``metric.labels(...)`` validates and looks up its arguments on every call;
the accelerator serves tens of thousands of small responses a second, so it
keeps the children it uses. The gauges are read at scrape time.

A whole response sent in one step (:meth:`.protocol.SamePortProtocol._serve_now`)
is counted by :meth:`RouteMeters.count_whole`: the same metrics, with the
same values, as a response counted piece by piece (request counter, serving
path, duration, egress, time to first byte), in one call that updates the
children's plain numbers directly (:mod:`kura.telemetry.metering`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from kura.telemetry.metrics import Children, KuraMetrics
from kura.telemetry.traffic import PublicTraffic
from kura.web.accounting import Egress, producer_label
from kura.web.routing import RouteSpec

from .handles import HandleCache
from .interfaces import OK

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
        self,
        metrics: KuraMetrics,
        *,
        mode: str,
        permits: Permits,
        handles: HandleCache,
        egress: Egress,
        traffic: PublicTraffic,
    ) -> None:
        # The unlabelled histogram's one child (its observe() looks it up each time).
        self.duration = metrics.http_request_duration.labels()
        self.served = metrics.serving_paths.labels(mode)
        #: Bodies kept in the database, sent from memory with the head.
        self.served_from_memory = metrics.serving_paths.labels("memory")
        self._fallbacks = Children(metrics.accelerator_fallbacks)
        self._requests = metrics.http_requests
        self._request_children: dict[tuple[str, int], Any] = {}
        self._egress = egress
        self._traffic = traffic
        self._routes: dict[str, RouteMeters] = {}
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

    def route(self, spec: RouteSpec) -> RouteMeters:
        """The :class:`RouteMeters` of ``spec`` (made once per route)."""
        meters = self._routes.get(spec.endpoint)
        if meters is None:
            meters = self._routes[spec.endpoint] = RouteMeters(
                self, spec, egress=self._egress, traffic=self._traffic
            )
        return meters


class RouteMeters:
    """Every metric child one whole ``200`` response of a route updates.

    Args:
        meters: the accelerator's metrics.
        spec: the route.
        egress: the node's egress metrics.
        traffic: public traffic (time to first byte, requests begun).
    """

    __slots__ = (
        "_bytes",
        "_completions",
        "_duration",
        "_egress_duration",
        "_latency",
        "_read_bytes",
        "_reads",
        "_requests",
        "_served",
        "_served_from_memory",
        "_throughput",
        "_traffic",
    )

    def __init__(
        self, meters: AcceleratorMeters, spec: RouteSpec, *, egress: Egress, traffic: PublicTraffic
    ) -> None:
        children = egress.children(producer_label(spec), OK)
        self._requests = meters.request(spec.template, 200)
        self._served = meters.served
        self._served_from_memory = meters.served_from_memory
        self._reads = children.reads
        self._read_bytes = children.read_bytes
        self._completions = children.completions
        self._bytes = children.egress_bytes
        self._throughput = children.throughput
        self._traffic = traffic
        self._duration = meters.duration
        self._egress_duration = children.egress_duration
        self._latency = traffic.latency_child("http", spec.template)
        # The three durations share one bisect, so they must share bounds.
        bounds = self._duration.bounds
        if self._egress_duration.bounds != bounds or self._latency.bounds != bounds:
            raise ValueError("duration histograms with different buckets")

    def count_whole(
        self, sent: int, seconds: float, now: float, *, from_memory: bool = False
    ) -> None:
        """Count a ``200`` response whose head and ``sent`` body bytes (all of
        it) left at ``now``, ``seconds`` after its head began arriving
        (``from_memory``: a body kept in the database, sent with its head).

        Its duration, egress duration and time to first byte are all
        ``seconds``; the request counts as public traffic begun (but never
        in flight: it was over within one reactor step).
        """
        seconds = max(seconds, 1e-9)
        self._requests.value += 1
        (self._served_from_memory if from_memory else self._served).value += 1
        self._reads.value += 1
        self._completions.value += 1
        self._read_bytes.value += sent
        self._bytes.value += sent
        index = bisect_left(self._duration.bounds, seconds)
        for histogram in (self._duration, self._egress_duration, self._latency):
            histogram.counts[index] += 1
            histogram.sum += seconds
            histogram.count += 1
        throughput = self._throughput
        rate = sent / seconds
        throughput.counts[bisect_left(throughput.bounds, rate)] += 1
        throughput.sum += rate
        throughput.count += 1
        traffic = self._traffic
        traffic.started += 1
        traffic.smooth_first_byte(seconds, now)

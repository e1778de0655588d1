"""Counters and histograms cheap enough for the accelerated hot path.

prometheus_client's metrics take a lock, validate and wrap every update;
an accelerated 4 KiB response updates about fifteen of them, which cost a
quarter of its CPU. kura updates its metrics only on the reactor thread, so
these versions keep plain numbers and hand them to the registry when it is
scraped. The API is the subset kura uses (``labels()``, ``inc()``,
``observe()``), the exposition is the same (counters gain ``_total``,
histograms ``_bucket``/``_sum``/``_count``), and they register on an
injected :class:`~prometheus_client.CollectorRegistry` like any metric.

Contract: update them from the reactor thread only. A counter child's
``value`` is a plain float that the hottest paths may add a non-negative
amount to directly, sparing the call to ``inc()``. Likewise a histogram
child exposes ``bounds``, ``counts``, ``sum`` and ``count``: observing ``v``
is ``counts[bisect_left(bounds, v)] += 1``, ``sum += v``, ``count += 1``, and
children with the same bounds observing the same value may share the bisect
(:class:`kura.accel.meters.RouteMeters` does).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


def _bound(value: float) -> str:
    """A bucket bound as Prometheus writes ``le`` (Go's float formatting)."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _HistogramChild:
    """One labelled histogram (see the module docstring for direct updates).

    Attributes:
        bounds: the upper bucket bounds, ascending, without ``+Inf``.
        counts: observations per bucket, not cumulative; the last is ``+Inf``'s.
        sum: of every observed value.
        count: observations.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class _Metric(Collector):
    """Shared label handling; subclasses make children and families."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)
        if not self._labelnames:
            self._child(())  # exported as zero before the first update, as usual

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError

    def _child(self, values: tuple[str, ...]) -> object:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self) -> object:
        raise NotImplementedError


class Counter(_Metric):
    """A counter (declare its name without ``_total``)."""

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def labels(self, *values: str) -> _CounterChild:
        child = self._child(tuple(map(str, values)))
        assert isinstance(child, _CounterChild)
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            assert isinstance(child, _CounterChild)
            family.add_metric(list(values), child.value)
        yield family


class Histogram(_Metric):
    """A histogram with fixed upper bucket bounds (``+Inf`` is implied)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def labels(self, *values: str) -> _HistogramChild:
        child = self._child(tuple(map(str, values)))
        assert isinstance(child, _HistogramChild)
        return child

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            assert isinstance(child, _HistogramChild)
            cumulative = 0
            buckets = []
            for bound, count in zip(self._bounds, child.counts, strict=False):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            buckets.append(("+Inf", child.count))
            family.add_metric(list(values), buckets, child.sum)
        yield family

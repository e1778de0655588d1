"""Counting a download once it is over, the same way on both serving paths.

Every artifact body that leaves the node, through the accelerator or
twisted.web, ends with one call to :meth:`Egress.record`: the read counter
and bytes (``kura_artifact_reads_total``), the egress completion, bytes,
duration and (when it completed) throughput, all labelled by producer and
result (``ok``, ``client_aborted``, ``write_timeout``, ``incomplete``,
``error``). The labelled children are looked up once per kind, since the
accelerator serves tens of thousands of small bodies a second.
"""

from __future__ import annotations

from typing import Any

import attrs

from kura.telemetry.metrics import KuraMetrics
from kura.web.routing import RouteSpec

_PRODUCER_LABELS: dict[str, str] = {}


def producer_label(spec: RouteSpec) -> str:
    """The egress metrics' ``producer`` label of a route.

    Memoized by endpoint (the spec's key): reading an enum member's value
    is slow, and a frozen attrs spec hashes every field when it is a key.
    """
    label = _PRODUCER_LABELS.get(spec.endpoint)
    if label is None:
        producer = spec.producer
        label = _PRODUCER_LABELS[spec.endpoint] = (
            producer.value if producer is not None else "unknown"
        )
    return label


@attrs.frozen
class _EgressMeters:
    reads: Any
    read_bytes: Any
    completions: Any
    egress_bytes: Any
    egress_duration: Any
    throughput: Any


class Egress:
    """The egress metrics of one node (see the module docstring)."""

    def __init__(self, metrics: KuraMetrics) -> None:
        self._metrics = metrics
        self._children: dict[tuple[str, str], _EgressMeters] = {}

    def _new_meters(self, producer: str, result: str) -> _EgressMeters:
        """The children of ``producer`` and ``result``, looked up once and kept."""
        m = self._metrics
        meters = self._children[producer, result] = _EgressMeters(
            reads=m.artifact_reads.labels(producer, result),
            read_bytes=m.artifact_read_bytes.labels(producer, result),
            completions=m.egress_completions.labels(producer, result),
            egress_bytes=m.egress_bytes.labels(producer, result),
            egress_duration=m.egress_duration.labels(producer),
            throughput=m.egress_throughput.labels(producer),
        )
        return meters

    def children(self, producer: str, result: str) -> _EgressMeters:
        """The metric children one transfer of ``producer`` ending with ``result`` updates.

        For a caller that keeps them and updates them directly, as
        :meth:`record` does (:class:`kura.accel.meters.RouteMeters`).
        """
        meters = self._children.get((producer, result))
        if meters is None:
            meters = self._new_meters(producer, result)
        return meters

    def record(self, producer: str, result: str, sent: int, elapsed: float) -> None:
        """Count one finished body transfer of ``sent`` bytes that took ``elapsed`` seconds."""
        meters = self.children(producer, result)
        elapsed = max(elapsed, 1e-9)
        # The counters' plain values, added to directly (sent >= 0; see
        # kura.telemetry.metering): four inc() calls cost as much as the rest.
        meters.reads.value += 1
        meters.read_bytes.value += sent
        meters.completions.value += 1
        meters.egress_bytes.value += sent
        meters.egress_duration.observe(elapsed)
        if result == "ok":
            meters.throughput.observe(sent / elapsed)

"""The adaptive replication bandwidth limiter: one reservation clock per node.

Every peer body byte (outbox uploads, replication ingest, catch-up bodies
served and fetched) reserves time on one clock. The rate is the configured
ceiling divided by how busy public traffic is::

    divisor   = max(public_inflight + 1, latency_divisor)
    effective = max(1, configured / divisor)            bytes per second

where ``latency_divisor`` is ``ceil(ttfb_ewma / target)`` capped at 64 (1
with no target or no sample in the last 30 s; see :mod:`kura.telemetry.traffic`).
A reservation of ``n`` bytes takes::

    start          = max(next_available, now)
    next_available = start + n / effective

and the caller waits until ``start`` (waits under a millisecond are skipped;
their debt stays on the clock). The first chunk after an idle period goes at
once; there is no burst credit. Public traffic is never paced: it only feeds the
divisor. A ceiling of 0 disables the limiter (every wait is 0).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic

#: The effective rate never drops below one byte per second.
FLOOR_BYTES_PER_SECOND = 1.0
#: Shorter waits are not worth a timer: the caller goes at once, and the
#: debt stays on the clock (the next reservation starts after it), so the
#: average rate is unchanged.
MIN_WAIT_SECONDS = 0.001


class BandwidthLimiter:
    """Paces peer body traffic against public load (see the module docstring).

    Implements the ``Pacer`` protocol of :mod:`kura.api.gate` (``reserve``), so
    the internal plane can pace ingest by pausing the transport.

    Args:
        clock: the time source (and where waits are scheduled).
        traffic: the public in-flight count and TTFB EWMA.
        configured_bytes_per_second: the ceiling; 0 disables pacing.
        latency_target_ms: the public TTFB target; 0 disables the latency term.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        traffic: PublicTraffic,
        configured_bytes_per_second: int,
        latency_target_ms: int,
    ) -> None:
        self._clock = clock
        self._traffic = traffic
        self.configured = max(0, configured_bytes_per_second)
        self.latency_target_ms = max(0, latency_target_ms)
        self._next_available = 0.0

    @property
    def enabled(self) -> bool:
        return self.configured > 0

    def divisor(self) -> int:
        """``max(public in flight + 1, latency divisor)``."""
        latency = self._traffic.latency_divisor(self.latency_target_ms)
        return max(self._traffic.inflight + 1, latency)

    def effective(self) -> float:
        """The current rate in bytes per second (0.0 when disabled: unlimited)."""
        if not self.enabled:
            return 0.0
        return max(FLOOR_BYTES_PER_SECOND, self.configured / self.divisor())

    def reserve(self, size: int) -> float:
        """Reserve ``size`` bytes on the clock; return the seconds to wait first."""
        if not self.enabled or size <= 0:
            return 0.0
        now = self._clock.seconds()
        start = max(self._next_available, now)
        self._next_available = start + size / self.effective()
        delay = start - now
        return delay if delay >= MIN_WAIT_SECONDS else 0.0

    def wait(self, size: int) -> Deferred[None]:
        """Reserve ``size`` bytes and fire when the caller may send them."""
        delay = self.reserve(size)
        if delay <= 0:
            return succeed(None)
        return deferLater(self._clock, delay, lambda: None)

    def publish(self, metrics: KuraMetrics) -> None:
        """Refresh the bandwidth gauges (called every second)."""
        metrics.replication_bandwidth_configured.set(self.configured)
        metrics.replication_bandwidth_effective.set(self.effective())
        metrics.replication_latency_target_ms.set(self.latency_target_ms)
        ewma = self._traffic.latency_ewma_ms
        metrics.public_latency_ewma_ms.set(0.0 if ewma is None else ewma)

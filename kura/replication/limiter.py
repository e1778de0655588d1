"""The adaptive replication bandwidth limiter: one reservation clock per node.

Every peer body byte (outbox uploads, replication ingest, catch-up bodies
served and fetched) reserves time on one clock. The rate is the configured
ceiling times the **share** the CPU leaves to replication, divided by how
busy public traffic is, never below the floor::

    divisor   = max(public_inflight + 1, latency_divisor)
    effective = max(floor, configured * share / divisor)      bytes per second

where ``latency_divisor`` is ``ceil(ttfb_ewma / target)`` capped at 64 (1
with no target or no sample in the last 30 s; see :mod:`kura.telemetry.traffic`)
and ``floor`` is ``KURA_REPLICATION_MIN_BYTES_PER_SECOND`` (at most the
ceiling).

**The share** answers what the divisor cannot see: a node that is CPU-bound
serving short requests keeps in-flight at its clients' concurrency and TTFB
far below the target while replication ingest takes half its CPU. Every
0.1 s the load sampler (:mod:`kura.telemetry.load`) reports the reactor's
utilisation (the share of wall time it was not waiting in its poll: busy,
or waiting for a core or the GIL) and whether public requests arrived;
then (multiplicative decrease, multiplicative recovery)::

    public requests and utilisation >= busy         ->  share = max(floor / configured, share / 2)
    no public request, or utilisation < busy - 0.15 ->  share = min(1, share * 2)
    otherwise                                  ->  share unchanged

``busy`` is ``KURA_REPLICATION_BUSY_CPU_PERCENT`` / 100. From full speed the
share reaches the floor in ``log2(configured / floor)`` intervals (0.6 s
with the defaults) and comes back as fast once public load goes, so a
backlog drains at the full rate from then on. Under steady saturating
public load replication runs at the floor; under moderate load it takes
what the CPU has spare, hovering at the busy mark.

A reservation of ``n`` bytes takes::

    start          = max(next_available, now)
    next_available = start + n / effective

and the caller waits until ``start`` (waits under a millisecond are skipped;
their debt stays on the clock). The first chunk after an idle period goes at
once; there is no burst credit. Public traffic is never paced: it only feeds the
divisor and the share. A ceiling of 0 disables the limiter (every wait is 0).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from kura.telemetry.load import LoadSample
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic

#: The share grows again once utilisation is this far below the busy mark
#: (a band, so the share does not flap on every sample).
CALM_BAND = 0.15
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
        floor_bytes_per_second: the rate replication keeps under any load
            (capped at the ceiling; at least one byte per second).
        busy_utilisation: reactor utilisation (0-1) at which the share halves;
            0 disables the CPU term (the share stays 1).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        traffic: PublicTraffic,
        configured_bytes_per_second: int,
        latency_target_ms: int,
        floor_bytes_per_second: int = 0,
        busy_utilisation: float = 0.0,
    ) -> None:
        self._clock = clock
        self._traffic = traffic
        self.configured = max(0, configured_bytes_per_second)
        self.latency_target_ms = max(0, latency_target_ms)
        self.floor = float(max(1, min(floor_bytes_per_second, self.configured)))
        self.busy_utilisation = max(0.0, busy_utilisation)
        self._min_share = self.floor / self.configured if self.configured else 1.0
        #: The CPU's share for replication, 1.0 (all of the ceiling) down to
        #: floor / ceiling; see :meth:`observe`.
        self.share = 1.0
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
        return max(self.floor, self.configured * self.share / self.divisor())

    def observe(self, load: LoadSample) -> None:
        """Adjust the share to one CPU sample (see the module docstring)."""
        if self.busy_utilisation <= 0:
            return
        if load.public_requests and load.utilisation >= self.busy_utilisation:
            self.share = max(self._min_share, self.share / 2)
        elif not load.public_requests or load.utilisation < self.busy_utilisation - CALM_BAND:
            self.share = min(1.0, self.share * 2)

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
        metrics.replication_bandwidth_floor.set(self.floor if self.enabled else 0)
        metrics.replication_bandwidth_share.set(self.share)
        metrics.replication_latency_target_ms.set(self.latency_target_ms)
        ewma = self._traffic.latency_ewma_ms
        metrics.public_latency_ewma_ms.set(0.0 if ewma is None else ewma)

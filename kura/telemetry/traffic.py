"""Public-traffic accounting that replication backs off against.

Two signals describe how busy the public side is:

* **in flight**: public requests whose last body byte has not been written
  yet. A download holds its slot for the whole transfer on both serving
  paths, so long healthy downloads count as load;
* **time to first byte**: sampled when a response head is written, smoothed
  with an EWMA of weight 1/8. Sampling the head, not the end, keeps big
  healthy downloads from looking like latency.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from kura.telemetry.metrics import Children, KuraMetrics

#: Samples older than this no longer say anything about current latency.
SAMPLE_MAX_AGE_SECONDS = 30.0
#: The latency term never divides the replication ceiling by more than this.
MAX_LATENCY_DIVISOR = 64


class InflightSlot:
    """One public request's in-flight slot; :meth:`release` is idempotent."""

    __slots__ = ("_released", "_traffic")

    def __init__(self, traffic: PublicTraffic) -> None:
        self._traffic = traffic
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._traffic._release()


class PublicTraffic:
    """In-flight count and TTFB EWMA for public requests (reactor thread only)."""

    def __init__(self, clock: IReactorTime, metrics: KuraMetrics) -> None:
        self._clock = clock
        self._metrics = metrics
        self._latency = Children(metrics.public_request_latency)
        self.inflight = 0
        #: Public requests ever begun (the load sampler counts them per interval).
        self.started = 0
        # Read at scrape time: a request pays nothing for the gauge. (The
        # EWMA gauge is published every second by the replication limiter.)
        metrics.public_http_inflight.set_function(lambda: float(self.inflight))
        self._idle_waiters: list[Deferred[None]] = []
        self._ewma_us: float | None = None
        self._last_sample_at: float | None = None

    def begin(self) -> InflightSlot:
        """Count a public request in flight until the slot is released."""
        self.inflight += 1
        self.started += 1
        return InflightSlot(self)

    def _release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no public request is in flight (at once if none is)."""
        if self.inflight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def record_first_byte(self, seconds: float, *, transport: str, route: str) -> None:
        """Sample a time to first byte (the response head was just written)."""
        self._latency(transport, route).observe(seconds)
        self.smooth_first_byte(seconds, self._clock.seconds())

    def latency_child(self, transport: str, route: str) -> Any:
        """The time-to-first-byte histogram child of ``transport`` and ``route``.

        For a caller that observes it directly and then calls
        :meth:`smooth_first_byte` (the accelerator's one-step path).
        """
        return self._latency(transport, route)

    def smooth_first_byte(self, seconds: float, now: float) -> None:
        """Fold a time to first byte, sampled at ``now``, into the EWMA only
        (its histogram is the caller's, see :meth:`latency_child`)."""
        sample_us = seconds * 1_000_000
        ewma = self._ewma_us
        self._ewma_us = sample_us if ewma is None else (ewma * 7 + sample_us) / 8
        self._last_sample_at = now

    @property
    def latency_ewma_ms(self) -> float | None:
        """The current EWMA in ms, or ``None`` with no recent sample."""
        if self._ewma_us is None or self._last_sample_at is None:
            return None
        if self._clock.seconds() - self._last_sample_at > SAMPLE_MAX_AGE_SECONDS:
            return None
        return self._ewma_us / 1000

    def latency_divisor(self, target_ms: int) -> int:
        """``ceil(ewma / target)`` capped at 64; 1 with no target or no recent sample."""
        ewma = self.latency_ewma_ms
        if target_ms <= 0 or ewma is None:
            return 1
        return max(1, min(MAX_LATENCY_DIVISOR, math.ceil(ewma / target_ms)))

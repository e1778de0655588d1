"""How busy the reactor is, and whether public requests are asking for it.

Replication must yield when public traffic needs the machine. The public
in-flight count and the time-to-first-byte average (:mod:`.traffic`) do not
see a node that is CPU-bound serving ~1 ms requests: in flight stays at the
clients' concurrency and TTFB stays far below any fixed target while
throughput halves. What does see it is the reactor's **utilisation**: the
share of wall time it spent *not* waiting in its poll for something to do.
Everything Python does for a request happens on the reactor thread, so near
1.0 it cannot take more work, whatever keeps it: running requests, waiting
for a core (storage threads writing and fsyncing replication ingest, other
processes), or waiting for the GIL (hashing threads) -- waits that CPU
counters of the thread alone do not show.

:func:`poll_timer` measures it by timing the reactor's ``epoll.poll`` (two
clock reads per reactor iteration). :class:`LoadSampler` reads the
cumulative idle time every :data:`SAMPLE_SECONDS`, with how many public
requests began in the interval, and tells its listeners (the replication
limiter). A reactor without an epoll poller falls back to the thread's CPU
time, which misses the waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from kura.telemetry.traffic import PublicTraffic

#: How often utilisation is sampled. Short enough for the limiter to react within
#: a few tenths of a second, long enough that one sample is not noise.
SAMPLE_SECONDS = 0.1


class _TimedPoller:
    """An ``epoll`` whose ``poll`` adds the time it waited to :attr:`idle`."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.idle = 0.0

    def poll(self, timeout: float = -1, maxevents: int = -1) -> Any:
        started = time.monotonic()
        try:
            return self._poller.poll(timeout, maxevents)
        finally:
            self.idle += time.monotonic() - started

    def __getattr__(self, name: str) -> Any:
        # register, modify, unregister, close, fileno: the epoll's own.
        return getattr(self._poller, name)


def poll_timer(reactor: Any) -> Callable[[], float]:
    """Seconds of work (wall time *not* spent waiting in the poll) of ``reactor``'s
    thread so far: a counter whose growth over an interval is its busy time.

    For Twisted's epoll reactor the poller is wrapped once (its private
    ``_poller``, pinned by ``tests/test_load.py``); for any
    other reactor the calling thread's CPU time stands in.
    """
    poller = getattr(reactor, "_poller", None)
    if poller is None or not hasattr(poller, "poll"):
        return time.thread_time
    if not isinstance(poller, _TimedPoller):
        poller = reactor._poller = _TimedPoller(poller)
    timed = poller
    origin = time.monotonic()
    idle_at_origin = timed.idle
    return lambda: (time.monotonic() - origin) - (timed.idle - idle_at_origin)


@attrs.frozen
class LoadSample:
    """One interval's reading.

    Attributes:
        utilisation: the share of the interval the reactor was busy (not
            waiting in its poll), 0.0-1.0.
        public_requests: public requests that began in the interval.
        seconds: the interval's wall time.
    """

    utilisation: float
    public_requests: int
    seconds: float


class LoadSampler:
    """Samples the reactor's utilisation (see the module docstring).

    Args:
        clock: drives the sampling (and its wall time).
        traffic: counts public requests as they begin.
        demand: the reactor's busy seconds so far (:func:`poll_timer`;
            injected by tests).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        traffic: PublicTraffic,
        demand: Callable[[], float] = time.thread_time,
    ) -> None:
        self._clock = clock
        self._traffic = traffic
        self._demand = demand
        self.listeners: list[Callable[[LoadSample], None]] = []
        self.last: LoadSample | None = None
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock
        self._mark()

    def _mark(self) -> None:
        self._at = self._clock.seconds()
        self._demand_at = self._demand()
        self._started_at = self._traffic.started

    def start(self) -> None:
        if not self._loop.running:
            self._mark()
            self._loop.start(SAMPLE_SECONDS, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> LoadSample | None:
        """Close the current interval and tell the listeners (``None``: no time passed)."""
        now = self._clock.seconds()
        wall = now - self._at
        if wall <= 0:
            return None
        busy = self._demand() - self._demand_at
        reading = LoadSample(
            min(1.0, max(0.0, busy / wall)), self._traffic.started - self._started_at, wall
        )
        self._mark()
        self.last = reading
        for listener in self.listeners:
            listener(reading)
        return reading

"""How much the reactor thread wants the CPU, and whether public requests are asking.

Replication must yield when public traffic needs the machine. The public
in-flight count and the time-to-first-byte average (:mod:`.traffic`) do not
see a node that is CPU-bound serving ~1 ms requests: in flight stays at the
clients' concurrency and TTFB stays far below any fixed target while
throughput halves. What does see it is the reactor thread's **demand**: the
time it ran plus the time it was runnable but waited for a core (Linux
``/proc/thread-self/schedstat``), over wall time. Everything Python does for
a request happens on that thread, so:

* near 1.0 it cannot take more work, whether it is busy itself or waiting
  while storage threads (replication ingest's writes, fsyncs), transfer
  threads or other processes hold the cores it may run on;
* an idle reactor reads near 0 however busy the disk is.

:class:`LoadSampler` reads it every :data:`SAMPLE_SECONDS`, with how many
public requests began in the interval, and tells its listeners (the
replication limiter). Cost: one small ``/proc`` read per interval while public
requests arrive, none while the node is idle. Without
schedstat (not Linux, or a kernel without it) the thread's CPU time alone is
used, which misses waiting for a core.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from kura.telemetry.traffic import PublicTraffic

#: How often demand is sampled. Short enough for the limiter to react within
#: a few tenths of a second, long enough that one sample is not noise.
SAMPLE_SECONDS = 0.1
SCHEDSTAT = "/proc/thread-self/schedstat"


def thread_demand_seconds(path: str = SCHEDSTAT) -> float:
    """The calling thread's run time plus run-queue wait, in seconds.

    Falls back to its CPU time when ``path`` cannot be read.
    """
    try:
        with open(path, "rb") as handle:
            ran, waited = handle.read().split()[:2]
        return (int(ran) + int(waited)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


@attrs.frozen
class LoadSample:
    """One interval's reading.

    Attributes:
        utilisation: the reactor thread's demand over the interval, 0.0-1.0
            (clamped: a sample can exceed 1.0 by clock granularity).
        public_requests: public requests that began in the interval.
        seconds: the interval's wall time.
    """

    utilisation: float
    public_requests: int
    seconds: float


class LoadSampler:
    """Samples the reactor thread's demand (see the module docstring).

    Args:
        clock: drives the sampling (and its wall time).
        traffic: counts public requests as they begin.
        demand: the calling thread's demand in seconds; called only on the
            reactor thread, so it reads the reactor's (injected by tests).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        traffic: PublicTraffic,
        demand: Callable[[], float] = thread_demand_seconds,
    ) -> None:
        self._clock = clock
        self._traffic = traffic
        self._demand = demand
        self.listeners: list[Callable[[LoadSample], None]] = []
        self.last: LoadSample | None = None
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock
        self._mark()

    def _mark(self, *, read_demand: bool = True) -> None:
        self._at = self._clock.seconds()
        self._demand_at = self._demand() if read_demand else None
        self._started_at = self._traffic.started

    def start(self) -> None:
        if not self._loop.running:
            self._mark()
            self._loop.start(SAMPLE_SECONDS, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> LoadSample | None:
        """Close the current interval and tell the listeners (``None``: no time passed).

        An interval in which no public request began reads nothing (its
        demand is reported as 0: with no public request the limiter does not
        need it), so an idle node makes no system call every 0.1 s; the
        interval after one starts the reading again, and the next is measured.
        """
        now = self._clock.seconds()
        wall = now - self._at
        if wall <= 0:
            return None
        public = self._traffic.started - self._started_at
        if public and self._demand_at is not None:
            utilisation = min(1.0, max(0.0, (self._demand() - self._demand_at) / wall))
            self._mark()
        else:
            # Idle, or the first busy interval after idling (no baseline yet).
            utilisation = 0.0
            self._mark(read_demand=bool(public))
        reading = LoadSample(utilisation, public, wall)
        self.last = reading
        for listener in self.listeners:
            listener(reading)
        return reading

"""The reactor utilisation sampler: what it reads, what it reports, when."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import epollreactor
from twisted.internet.task import Clock

from kura.telemetry.load import SAMPLE_SECONDS, LoadSample, LoadSampler, poll_timer
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic


class FakeBusy:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def sampler() -> tuple[LoadSampler, Clock, FakeBusy, PublicTraffic, list[LoadSample]]:
    clock = Clock()
    traffic = PublicTraffic(clock, KuraMetrics(CollectorRegistry()))
    busy = FakeBusy()
    load = LoadSampler(clock=clock, traffic=traffic, demand=busy)
    seen: list[LoadSample] = []
    load.listeners.append(seen.append)
    return load, clock, busy, traffic, seen


def test_every_interval_reports_busy_time_over_wall_time_and_public_requests() -> None:
    load, clock, busy, traffic, seen = sampler()
    load.start()
    busy.seconds += 0.09
    for _ in range(3):
        traffic.begin().release()
    clock.advance(SAMPLE_SECONDS)
    assert len(seen) == 1
    assert seen[0].utilisation == pytest.approx(0.9)
    assert seen[0].public_requests == 3
    clock.advance(SAMPLE_SECONDS)  # an idle interval
    assert (seen[1].utilisation, seen[1].public_requests) == (0.0, 0)
    assert load.last == seen[1]
    load.stop()
    clock.advance(1)
    assert len(seen) == 2


def test_utilisation_is_clamped_to_one() -> None:
    load, clock, busy, _, seen = sampler()
    load.start()
    busy.seconds += 0.2
    clock.advance(SAMPLE_SECONDS)
    assert seen[0].utilisation == 1.0


class FakePoller:
    """An epoll stand-in whose poll 'waits' a set time."""

    def __init__(self) -> None:
        self.wait = 0.0
        self.registered: list[int] = []

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[Any]:
        time.sleep(self.wait)
        return []

    def register(self, fd: int, flags: int) -> None:
        self.registered.append(fd)


class FakeReactor:
    def __init__(self) -> None:
        self._poller = FakePoller()


def test_the_poll_timer_counts_time_outside_the_poll_as_busy() -> None:
    """Waiting in poll is idle; everything between polls (work, GIL, a core) is busy.
    The wrapped poller still registers descriptors."""
    reactor = FakeReactor()
    busy = poll_timer(reactor)
    assert busy() == pytest.approx(0.0, abs=0.01)
    poller: Any = reactor._poller
    poller._poller.wait = 0.05
    poller.poll(1)  # 50 ms idle
    idle_part = busy()
    time.sleep(0.05)  # 50 ms "working"
    assert busy() - idle_part == pytest.approx(0.05, abs=0.03)
    assert idle_part < 0.03
    poller.register(7, 1)
    assert poller._poller.registered == [7]
    assert poll_timer(reactor) is not None and reactor._poller is poller  # wrapped once


def test_the_real_epoll_reactor_is_timed() -> None:
    """Pins the private name used: Twisted's EPollReactor polls through ``_poller``."""
    reactor = epollreactor.EPollReactor()
    try:
        busy = poll_timer(reactor)
        reactor.doIteration(0.05)  # nothing to do: ~50 ms idle in the poll
        assert busy() < 0.03
    finally:
        reactor._poller.close()  # type: ignore[attr-defined]


def test_a_reactor_without_epoll_falls_back_to_thread_time() -> None:
    assert poll_timer(Clock()) is time.thread_time

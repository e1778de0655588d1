"""The reactor's CPU demand sampler: what it reads, what it reports, when."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.telemetry.load import SAMPLE_SECONDS, LoadSample, LoadSampler, thread_demand_seconds
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic


class FakeDemand:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.seconds


def sampler() -> tuple[LoadSampler, Clock, FakeDemand, PublicTraffic, list[LoadSample]]:
    clock = Clock()
    traffic = PublicTraffic(clock, KuraMetrics(CollectorRegistry()))
    demand = FakeDemand()
    load = LoadSampler(clock=clock, traffic=traffic, demand=demand)
    seen: list[LoadSample] = []
    load.listeners.append(seen.append)
    return load, clock, demand, traffic, seen


def test_every_interval_reports_demand_over_wall_time_and_public_requests() -> None:
    load, clock, demand, traffic, seen = sampler()
    load.start()
    demand.seconds += 0.09
    for _ in range(3):
        traffic.begin().release()
    clock.advance(SAMPLE_SECONDS)
    assert len(seen) == 1
    assert seen[0].utilisation == pytest.approx(0.9)
    assert seen[0].public_requests == 3
    clock.advance(SAMPLE_SECONDS)  # an idle interval
    assert seen[1] == LoadSample(0.0, 0, SAMPLE_SECONDS)
    assert load.last == seen[1]
    load.stop()
    clock.advance(1)
    assert len(seen) == 2


def test_demand_above_wall_time_is_clamped() -> None:
    """Run time plus run-queue wait can exceed the interval by clock granularity."""
    load, clock, demand, traffic, seen = sampler()
    load.start()
    demand.seconds += 0.2
    traffic.begin().release()
    clock.advance(SAMPLE_SECONDS)
    assert seen[0].utilisation == 1.0


def test_an_idle_node_reads_nothing_and_the_next_busy_interval_starts_over() -> None:
    """No public request: no /proc read (an idle node makes no system calls); the first
    busy interval after idling has no baseline (reported 0, read), the next is measured."""
    load, clock, demand, traffic, seen = sampler()
    load.start()
    reads = demand.reads
    clock.advance(SAMPLE_SECONDS)
    clock.advance(SAMPLE_SECONDS)
    assert demand.reads == reads
    assert [s.utilisation for s in seen] == [0.0, 0.0]
    traffic.begin().release()
    demand.seconds += 0.05
    clock.advance(SAMPLE_SECONDS)
    assert (seen[-1].utilisation, seen[-1].public_requests) == (0.0, 1)
    traffic.begin().release()
    demand.seconds += 0.09
    clock.advance(SAMPLE_SECONDS)
    assert seen[-1].utilisation == pytest.approx(0.9)


def test_a_busy_thread_reads_near_its_run_time() -> None:
    """The real schedstat reading grows with the calling thread's work, not another's."""
    before = thread_demand_seconds()
    total = 0
    for n in range(2_000_000):
        total += n
    spent = thread_demand_seconds() - before
    assert spent > 0.01

    other_before = thread_demand_seconds()
    worker = threading.Thread(target=lambda: sum(range(2_000_000)))
    worker.start()
    worker.join()
    # Joining waits (sleeps) without running: far less than the worker ran.
    assert thread_demand_seconds() - other_before < spent / 2

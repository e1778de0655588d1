"""The adaptive bandwidth limiter: its arithmetic and its reservation clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.replication.limiter import BandwidthLimiter
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic

MiB = 1024 * 1024


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def metrics() -> KuraMetrics:
    return KuraMetrics(CollectorRegistry())


@pytest.fixture
def traffic(clock: Clock, metrics: KuraMetrics) -> PublicTraffic:
    return PublicTraffic(clock, metrics)


def limiter_for(
    clock: Clock, traffic: PublicTraffic, configured: int = 512 * MiB, target_ms: int = 100
) -> BandwidthLimiter:
    return BandwidthLimiter(
        clock=clock,
        traffic=traffic,
        configured_bytes_per_second=configured,
        latency_target_ms=target_ms,
    )


def test_idle_public_side_leaves_the_full_ceiling(clock: Clock, traffic: PublicTraffic) -> None:
    """With no public request in flight and no latency sample the divisor is 1."""
    limiter = limiter_for(clock, traffic)
    assert limiter.divisor() == 1
    assert limiter.effective() == 512 * MiB


def test_latency_ewma_of_250ms_against_100ms_target_divides_by_3(
    clock: Clock, traffic: PublicTraffic
) -> None:
    """A TTFB EWMA of 250 ms over a 100 ms target divides the ceiling by ceil(2.5) = 3."""
    traffic.record_first_byte(0.250, transport="http", route="/r")
    limiter = limiter_for(clock, traffic)
    assert limiter.divisor() == 3
    assert limiter.effective() == pytest.approx(512 * MiB / 3)


def test_seven_public_requests_in_flight_divide_by_8(clock: Clock, traffic: PublicTraffic) -> None:
    """Seven public requests in flight divide the ceiling by 7 + 1."""
    slots = [traffic.begin() for _ in range(7)]
    limiter = limiter_for(clock, traffic)
    assert limiter.divisor() == 8
    assert limiter.effective() == 64 * MiB
    for slot in slots:
        slot.release()
    assert limiter.effective() == 512 * MiB


def test_larger_of_the_two_terms_wins(clock: Clock, traffic: PublicTraffic) -> None:
    """The divisor is the larger of in-flight + 1 and the latency divisor."""
    traffic.record_first_byte(0.450, transport="http", route="/r")  # divisor 5
    slot = traffic.begin()
    limiter = limiter_for(clock, traffic)
    assert limiter.divisor() == 5
    more = [traffic.begin() for _ in range(6)]
    assert limiter.divisor() == 8
    for s in [slot, *more]:
        s.release()


def test_old_latency_samples_are_ignored(clock: Clock, traffic: PublicTraffic) -> None:
    """A latency sample older than 30 s no longer slows replication down."""
    traffic.record_first_byte(1.0, transport="http", route="/r")
    limiter = limiter_for(clock, traffic)
    assert limiter.divisor() == 10
    clock.advance(31)
    assert limiter.divisor() == 1


def test_zero_latency_target_disables_the_latency_term(
    clock: Clock, traffic: PublicTraffic
) -> None:
    """A latency target of 0 ignores latency entirely."""
    traffic.record_first_byte(5.0, transport="http", route="/r")
    assert limiter_for(clock, traffic, target_ms=0).divisor() == 1


def test_zero_ceiling_disables_pacing(clock: Clock, traffic: PublicTraffic) -> None:
    """A ceiling of 0 never makes anyone wait and reports 0 (unlimited)."""
    limiter = limiter_for(clock, traffic, configured=0)
    assert not limiter.enabled
    assert limiter.effective() == 0.0
    assert [limiter.reserve(10 * MiB) for _ in range(5)] == [0.0] * 5


def test_effective_rate_never_drops_below_one_byte_per_second(
    clock: Clock, traffic: PublicTraffic
) -> None:
    """A tiny ceiling divided by heavy load is floored at 1 B/s."""
    slots = [traffic.begin() for _ in range(99)]
    limiter = limiter_for(clock, traffic, configured=10)
    assert limiter.effective() == 1.0
    assert limiter.reserve(1) == 0.0
    assert limiter.reserve(1) == pytest.approx(1.0)
    for slot in slots:
        slot.release()


def test_reservations_queue_on_one_clock(clock: Clock, traffic: PublicTraffic) -> None:
    """Each reservation starts where the previous one ends: start = max(next, now)."""
    limiter = limiter_for(clock, traffic, configured=1000)
    assert limiter.reserve(500) == 0.0
    assert limiter.reserve(500) == pytest.approx(0.5)
    assert limiter.reserve(1000) == pytest.approx(1.0)
    clock.advance(0.25)
    assert limiter.reserve(250) == pytest.approx(1.75)


def test_idle_time_gives_no_burst_credit(clock: Clock, traffic: PublicTraffic) -> None:
    """After an idle period the next chunk goes at once, and the one after waits again."""
    limiter = limiter_for(clock, traffic, configured=1000)
    limiter.reserve(1000)
    clock.advance(60)
    assert limiter.reserve(1000) == 0.0
    assert limiter.reserve(100) == pytest.approx(1.0)


def test_rate_is_read_at_reservation_time(clock: Clock, traffic: PublicTraffic) -> None:
    """A reservation made under public load takes proportionally longer."""
    limiter = limiter_for(clock, traffic, configured=1000)
    limiter.reserve(1000)  # next_available = now + 1 s
    slot = traffic.begin()  # divisor 2 from here on
    assert limiter.reserve(1000) == pytest.approx(1.0)
    assert limiter.reserve(10) == pytest.approx(3.0)
    slot.release()


def test_wait_fires_when_the_reservation_starts(clock: Clock, traffic: PublicTraffic) -> None:
    """``wait`` returns a Deferred that fires once the clock reaches the reserved start."""
    limiter = limiter_for(clock, traffic, configured=100)
    first = limiter.wait(100)
    assert first.called
    second = limiter.wait(100)
    assert not second.called
    clock.advance(0.99)
    assert not second.called
    clock.advance(0.02)
    assert second.called


def test_publish_refreshes_the_gauges(
    clock: Clock, traffic: PublicTraffic, metrics: KuraMetrics
) -> None:
    """The bandwidth gauges and the latency EWMA follow the limiter's inputs."""
    limiter = limiter_for(clock, traffic, configured=800, target_ms=100)
    slot = traffic.begin()
    traffic.record_first_byte(0.05, transport="http", route="/r")
    limiter.publish(metrics)
    registry = metrics.registry
    value = registry.get_sample_value
    assert value("kura_replication_bandwidth_configured_limit_bytes_per_second") == 800
    assert value("kura_replication_bandwidth_effective_limit_bytes_per_second") == 400
    assert value("kura_replication_bandwidth_public_latency_target_ms") == 100
    assert value("kura_public_request_latency_ewma_ms") == pytest.approx(50)
    slot.release()
    clock.advance(31)
    limiter.publish(metrics)
    assert value("kura_replication_bandwidth_effective_limit_bytes_per_second") == 800
    assert value("kura_public_request_latency_ewma_ms") == 0

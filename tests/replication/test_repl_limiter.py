"""The adaptive bandwidth limiter: its arithmetic and its reservation clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.replication.limiter import BandwidthLimiter
from kura.telemetry.load import LoadSample
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


# -- the CPU share ------------------------------------------------------------------------


def shared_limiter(
    clock: Clock, traffic: PublicTraffic, floor: int = 8 * MiB, busy: float = 0.85
) -> BandwidthLimiter:
    return BandwidthLimiter(
        clock=clock,
        traffic=traffic,
        configured_bytes_per_second=512 * MiB,
        latency_target_ms=100,
        floor_bytes_per_second=floor,
        busy_utilisation=busy,
    )


def busy(public: int = 10, demand: float = 0.95) -> LoadSample:
    return LoadSample(utilisation=demand, public_requests=public, seconds=0.1)


def test_a_busy_cpu_serving_public_requests_halves_the_share_down_to_the_floor(
    clock: Clock, traffic: PublicTraffic
) -> None:
    """512 MiB/s to the 8 MiB/s floor in log2(64) = 6 samples, and no lower."""
    limiter = shared_limiter(clock, traffic)
    rates = []
    for _ in range(8):
        limiter.observe(busy())
        rates.append(limiter.effective() / MiB)
    assert rates == [256, 128, 64, 32, 16, 8, 8, 8]
    assert limiter.share == 1 / 64


def test_the_floor_holds_under_every_divisor(clock: Clock, traffic: PublicTraffic) -> None:
    """Heavy in-flight load on top of a floored share still leaves the floor."""
    limiter = shared_limiter(clock, traffic)
    slots = [traffic.begin() for _ in range(63)]
    for _ in range(10):
        limiter.observe(busy())
    assert limiter.effective() == 8 * MiB
    assert limiter.reserve(8 * MiB) == 0.0
    assert limiter.reserve(1) == pytest.approx(1.0)  # the first 8 MiB took a second
    for slot in slots:
        slot.release()


def test_the_share_recovers_once_public_requests_stop(clock: Clock, traffic: PublicTraffic) -> None:
    """No public request in a sample doubles the share, however busy the CPU (ingest)."""
    limiter = shared_limiter(clock, traffic)
    for _ in range(6):
        limiter.observe(busy())
    for _ in range(6):
        limiter.observe(busy(public=0, demand=1.0))
    assert limiter.share == 1.0
    assert limiter.effective() == 512 * MiB


def test_a_calm_cpu_lets_the_share_grow_and_the_band_holds_it(
    clock: Clock, traffic: PublicTraffic
) -> None:
    """Below busy - 0.15 the share doubles; between the two it stays where it is."""
    limiter = shared_limiter(clock, traffic)
    for _ in range(3):
        limiter.observe(busy())
    assert limiter.share == 1 / 8
    limiter.observe(busy(demand=0.80))  # inside the band
    assert limiter.share == 1 / 8
    limiter.observe(busy(demand=0.69))
    assert limiter.share == 1 / 4


def test_public_requests_on_an_idle_cpu_take_nothing(clock: Clock, traffic: PublicTraffic) -> None:
    limiter = shared_limiter(clock, traffic)
    for _ in range(5):
        limiter.observe(busy(public=1000, demand=0.3))
    assert limiter.share == 1.0


def test_zero_busy_mark_disables_the_cpu_term(clock: Clock, traffic: PublicTraffic) -> None:
    limiter = shared_limiter(clock, traffic, busy=0.0)
    limiter.observe(busy(demand=1.0))
    assert limiter.share == 1.0


def test_a_floor_above_the_ceiling_is_the_ceiling(clock: Clock, traffic: PublicTraffic) -> None:
    limiter = BandwidthLimiter(
        clock=clock,
        traffic=traffic,
        configured_bytes_per_second=MiB,
        latency_target_ms=100,
        floor_bytes_per_second=8 * MiB,
        busy_utilisation=0.85,
    )
    limiter.observe(busy())
    assert limiter.effective() == MiB


def test_publish_reports_the_floor_and_the_share(
    clock: Clock, traffic: PublicTraffic, metrics: KuraMetrics
) -> None:
    limiter = shared_limiter(clock, traffic)
    limiter.observe(busy())
    limiter.publish(metrics)
    value = metrics.registry.get_sample_value
    assert value("kura_replication_bandwidth_floor_bytes_per_second") == 8 * MiB
    assert value("kura_replication_bandwidth_cpu_share") == 0.5
    assert value("kura_replication_bandwidth_effective_limit_bytes_per_second") == 256 * MiB

"""Peer body plumbing: the paced file producer, the staging sink, the stall watchdog."""

from __future__ import annotations

import os
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from kura.domain.errors import BadFraming
from kura.domain.failpoints import Failpoints
from kura.replication.bodies import PacedFileBody, StagingSink, StallWatchdog
from kura.replication.limiter import BandwidthLimiter
from kura.storage.reading import IncompleteBody
from kura.storage.runner import ImmediateRunner
from kura.storage.staging import StagingFile, TmpBudget
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic
from kura.testing import ControlledRunner, failed, succeeded


class Consumer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(clock: Clock, rate: int) -> BandwidthLimiter:
    traffic = PublicTraffic(clock, KuraMetrics(CollectorRegistry()))
    return BandwidthLimiter(
        clock=clock, traffic=traffic, configured_bytes_per_second=rate, latency_target_ms=100
    )


def open_file(tmp_path: Any, data: bytes) -> int:
    path = f"{tmp_path}/blob"
    with open(path, "wb") as handle:
        handle.write(data)
    return os.open(path, os.O_RDONLY)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_file_body_streams_every_byte_paced_by_the_limiter(tmp_path: Any, clock: Clock) -> None:
    """Chunks leave as the reservation clock allows; the Deferred fires at the end."""
    data = os.urandom(1000)
    fd = open_file(tmp_path, data)
    body = PacedFileBody(
        fd=fd,
        length=1000,
        runner=ImmediateRunner(),
        clock=clock,
        limiter=limiter(clock, 1000),
        chunk_bytes=400,
    )
    consumer = Consumer()
    done = body.startProducing(consumer)
    assert consumer.chunks == [data[:400]]
    clock.advance(0.39)
    assert len(consumer.chunks) == 1
    clock.advance(0.02)
    assert len(consumer.chunks) == 2
    clock.advance(0.4)
    assert b"".join(consumer.chunks) == data
    assert succeeded(done) is None
    assert not fd_is_open(fd)
    assert body.sent == 1000


def test_file_body_honours_pause_and_resume(tmp_path: Any, clock: Clock) -> None:
    """A paused producer writes nothing until resumed (transport back-pressure)."""
    fd = open_file(tmp_path, b"abcdef")
    body = PacedFileBody(
        fd=fd,
        length=6,
        runner=ControlledRunner(),
        clock=clock,
        limiter=limiter(clock, 0),
        chunk_bytes=2,
    )
    consumer = Consumer()
    body.pauseProducing()
    done = body.startProducing(consumer)
    assert consumer.chunks == []
    body.resumeProducing()
    assert b"".join(consumer.chunks) == b"abcdef"
    assert succeeded(done) is None


def test_short_file_fails_instead_of_pretending(tmp_path: Any, clock: Clock) -> None:
    """A file shorter than its manifest fails the body with IncompleteBody."""
    fd = open_file(tmp_path, b"abc")
    body = PacedFileBody(
        fd=fd, length=10, runner=ImmediateRunner(), clock=clock, limiter=limiter(clock, 0)
    )
    assert isinstance(failed(body.startProducing(Consumer())), IncompleteBody)
    assert not fd_is_open(fd)


def test_stop_producing_never_fires_and_waits_for_the_read(tmp_path: Any, clock: Clock) -> None:
    """Stopping mid-read closes the file only after the read returns; nothing more is written."""
    fd = open_file(tmp_path, b"x" * 100)
    runner = ControlledRunner()
    runner.hold = lambda f: f is os.pread
    body = PacedFileBody(fd=fd, length=100, runner=runner, clock=clock, limiter=limiter(clock, 0))
    consumer = Consumer()
    done = body.startProducing(consumer)
    body.stopProducing()
    assert fd_is_open(fd)  # the read in flight still uses it
    runner.release()
    assert not fd_is_open(fd)
    assert consumer.chunks == []
    assert not done.called


def test_close_before_start_releases_the_file(tmp_path: Any, clock: Clock) -> None:
    """A body whose request never started (connection refused) still closes its file."""
    fd = open_file(tmp_path, b"x")
    body = PacedFileBody(
        fd=fd, length=1, runner=ImmediateRunner(), clock=clock, limiter=limiter(clock, 0)
    )
    body.close()
    body.close()
    assert not fd_is_open(fd)


def test_watchdog_fires_only_without_progress(clock: Clock) -> None:
    """The watchdog measures time since the last progress, not total time."""
    progress = [0.0]
    stalls: list[float] = []
    watchdog = StallWatchdog(clock, 10, lambda: progress[0], lambda: stalls.append(clock.seconds()))
    watchdog.start()
    for _ in range(5):
        clock.advance(6)
        progress[0] = clock.seconds()
    assert stalls == []
    clock.advance(10)
    assert stalls == [40.0]
    assert watchdog.stalled


def test_waiting_on_the_limiter_is_not_a_stall(clock: Clock) -> None:
    """Progress stamped in the future (a limiter wait) postpones the stall."""
    stalls: list[float] = []
    watchdog = StallWatchdog(clock, 5, lambda: 30.0, lambda: stalls.append(clock.seconds()))
    watchdog.start()
    clock.advance(34)
    assert stalls == []
    clock.advance(1)
    assert stalls == [35.0]
    watchdog.stop()


def sink_for(
    tmp_path: Any, clock: Clock, expected: int, rate: int = 0
) -> tuple[StagingSink, StagingFile, StringTransport]:
    sink = StagingSink(limiter=limiter(clock, rate), clock=clock, expected=expected)
    staging = StagingFile(
        path=f"{tmp_path}/staged",
        runner=ImmediateRunner(),
        budget=TmpBudget(1 << 20),
        failpoints=Failpoints(),
        limit=expected,
        expected_length=expected,
        on_pressure=sink.pressure,
    )
    sink.staging = staging
    transport = StringTransport()
    sink.makeConnection(transport)
    return sink, staging, transport


def test_sink_stages_a_complete_body(tmp_path: Any, clock: Clock) -> None:
    """A body that ends cleanly fires with its length and can be finished."""
    sink, staging, _ = sink_for(tmp_path, clock, 6)
    sink.dataReceived(b"abc")
    sink.dataReceived(b"def")
    sink.connectionLost(Failure(ResponseDone()))
    assert succeeded(sink.done) == 6
    staged = succeeded(Deferred.fromCoroutine(staging.finish()))
    assert staged.size == 6
    with open(staged.path, "rb") as handle:
        assert handle.read() == b"abcdef"


def test_sink_pauses_the_transport_while_paced(tmp_path: Any, clock: Clock) -> None:
    """The limiter pauses the response transport instead of buffering."""
    sink, _, transport = sink_for(tmp_path, clock, 2000, rate=1000)
    sink.dataReceived(b"a" * 1000)
    assert transport.producerState == "producing"
    sink.dataReceived(b"b" * 500)
    assert transport.producerState == "paused"
    clock.advance(1.0)
    assert transport.producerState == "producing"


def test_sink_refuses_a_body_longer_than_announced(tmp_path: Any, clock: Clock) -> None:
    """More bytes than the manifest's size fail the sink and stop the transport."""
    sink, _, transport = sink_for(tmp_path, clock, 3)
    sink.dataReceived(b"abcd")
    assert isinstance(failed(sink.done), BadFraming)
    assert transport.producerState == "stopped"


def test_sink_reports_a_broken_connection(tmp_path: Any, clock: Clock) -> None:
    """A body cut short by the network fails with the transport's reason."""
    sink, _, _ = sink_for(tmp_path, clock, 10)
    sink.dataReceived(b"abc")
    sink.connectionLost(Failure(ConnectionLost()))
    assert isinstance(failed(sink.done), ConnectionLost)

"""BodyIngest: a request body's phases, held bytes, pauses and refusals (on a Clock)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from kura.domain.errors import PayloadTooLarge
from kura.web.ingest import ADMISSION, DISK, PACING, STAGED_READ_BYTES, BodyIngest, Phase


class Source:
    """A pausable source that records its state (a transport, an HTTP/2 stream)."""

    def __init__(self, on_resume: Any = None) -> None:
        self.paused = False
        self.calls: list[str] = []
        self._on_resume = on_resume

    def pauseProducing(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.calls.append("resume")
        if self._on_resume is not None:
            self._on_resume()


class Staging:
    """A staging file stand-in: takes bytes up to a limit."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.data = bytearray()
        self.limit = limit
        self.aborted = False

    def write(self, data: bytes) -> None:
        if len(self.data) + len(data) > self.limit:
            raise PayloadTooLarge("Request body exceeded allowed size")
        self.data += data

    def abort(self) -> None:
        self.aborted = True


class Pacer:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.reserved = 0

    def reserve(self, size: int) -> float:
        self.reserved += size
        return self.delay


def ingest(source: Source | None = None, clock: Clock | None = None) -> BodyIngest:
    src = source or Source()
    return BodyIngest(lambda: src, clock or Clock())


def test_bytes_arriving_during_admission_are_held_then_replayed_in_order() -> None:
    """While the head is admitted the source is paused; held bytes go first into the sink."""
    source = Source()
    body = ingest(source)
    body.hold()
    assert source.paused
    body.receive(b"one ")
    body.receive(b"two ")
    staging = Staging()
    body.stage(staging, too_large="too big", pacer=None)  # type: ignore[arg-type]
    body.admitted()
    body.receive(b"three")
    assert bytes(staging.data) == b"one two three"
    assert not source.paused
    assert body.phase is Phase.STAGING


def test_the_sink_is_ready_before_the_source_resumes() -> None:
    """An HTTP/2 stream hands over what it held inside resume: the sink must exist by then."""
    body: BodyIngest
    staging = Staging()
    source = Source(on_resume=lambda: body.receive(b"held by the stream"))
    body = ingest(source)
    body.hold()
    body.stage(staging, too_large="too big", pacer=None)  # type: ignore[arg-type]
    body.admitted()
    assert bytes(staging.data) == b"held by the stream"


def test_a_refused_body_is_dropped() -> None:
    """Discarding drops held bytes and whatever still arrives."""
    body = ingest()
    body.hold()
    body.receive(b"held")
    body.discard()
    body.admitted()
    body.receive(b"late")
    assert body.phase is Phase.DISCARDING
    assert body.memory.getvalue() == b""


def test_memory_bodies_stop_at_the_routes_limit_with_its_wording() -> None:
    """A small body over its limit is refused with the route's own message."""
    body = ingest()
    body.keep_in_memory(limit=5, too_large="Part exceeds 10MB limit")
    body.receive(b"12345")
    with pytest.raises(PayloadTooLarge, match="Part exceeds 10MB limit"):
        body.receive(b"6")
    assert body.memory.getvalue() == b"12345"


def test_staging_refusals_use_the_routes_wording_and_abort_releases_the_file() -> None:
    """The staging file's own 413 becomes the route's; abort gives the file back."""
    staging = Staging(limit=3)
    body = ingest()
    body.stage(staging, too_large="Request body exceeded allowed size (module part)", pacer=None)  # type: ignore[arg-type]
    with pytest.raises(PayloadTooLarge, match="module part"):
        body.receive(b"1234")
    body.abort()
    assert staging.aborted and body.phase is Phase.DISCARDING


def test_the_source_resumes_only_when_no_reason_is_left() -> None:
    """Disk pressure and admission pause together; the source resumes after both lift."""
    source = Source()
    body = ingest(source)
    body.hold()
    body.on_disk_pressure(True)
    body.stage(Staging(), too_large="x", pacer=None)  # type: ignore[arg-type]
    body.admitted()
    assert source.paused and body.paused_for(DISK) and not body.paused_for(ADMISSION)
    body.on_disk_pressure(False)
    assert not source.paused
    assert source.calls == ["pause", "resume"]


def test_paced_bodies_wait_for_their_reservation() -> None:
    """A pacer's delay pauses the source until the clock reaches it."""
    clock = Clock()
    source = Source()
    body = ingest(source, clock)
    pacer = Pacer(delay=0.5)
    body.stage(Staging(), too_large="x", pacer=pacer)  # type: ignore[arg-type]
    body.receive(b"x" * 100)
    assert source.paused and body.paused_for(PACING) and pacer.reserved == 100
    clock.advance(0.5)
    assert not source.paused


def test_a_finished_request_has_no_source_to_pause() -> None:
    """Once the request is gone, pauses and resumes touch nothing."""
    body = BodyIngest(lambda: None, Clock())
    body.pause(DISK)
    body.resume(DISK)
    body.finished()
    assert body.phase is Phase.FINISHED


def test_a_staged_body_is_read_in_large_chunks() -> None:
    """A connection whose body goes to a staging file reads up to 1 MiB at a time
    (twisted's 64 KiB costs the reactor ~20 % more per byte ingested)."""
    tcp = Source()
    tcp.bufferSize = 65536  # type: ignore[attr-defined]
    body = ingest(tcp)
    body.stage(Staging(), too_large="too large", pacer=None)  # type: ignore[arg-type]
    assert tcp.bufferSize == STAGED_READ_BYTES == 1024 * 1024  # type: ignore[attr-defined]
    body.finished()
    assert tcp.bufferSize == 65536  # type: ignore[attr-defined]


def test_a_source_without_a_read_size_is_left_alone() -> None:
    """An HTTP/2 stream has no ``bufferSize``; staging does not give it one."""
    stream = Source()
    ingest(stream).stage(Staging(), too_large="too large", pacer=None)  # type: ignore[arg-type]
    assert not hasattr(stream, "bufferSize")

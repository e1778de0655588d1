"""Moving peer bodies: a paced file producer, a paced staging sink, a stall watchdog.

:class:`PacedFileBody` streams a blob file chunk by chunk, reserving each
chunk on the bandwidth limiter before reading it; it is the request body of
outbox uploads (an ``IBodyProducer`` for treq) and the response body of the
catch-up artifact route (a push producer registered on the request). It
never holds more than one chunk in memory, and reads through the same
:class:`~kura.storage.reading.BlobRange` as the download fallback.

:class:`StagingSink` receives a fetched catch-up body into a
:class:`~kura.storage.staging.StagingFile`, pausing the response transport
while the limiter (or the disk) asks it to.

:class:`StallWatchdog` aborts a transfer that makes no byte progress for a
while; waiting on the limiter counts as progress, so a throttled transfer
is never mistaken for a stalled peer. There is no total deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from kura.domain.errors import BadFraming, KuraError
from kura.storage.interfaces import IBlockingRunner
from kura.storage.reading import BlobRange, IncompleteBody
from kura.storage.staging import StagingFile

from .limiter import BandwidthLimiter

#: Bytes read (and reserved on the limiter) per step.
CHUNK_BYTES = 256 * 1024


class Stalled(Exception):
    """A transfer made no progress for the stall limit."""


@implementer(IBodyProducer)
class PacedFileBody:
    """Streams ``length`` bytes of ``fd`` from offset 0, paced by the limiter.

    The producer owns ``fd`` (through a :class:`~kura.storage.reading.BlobRange`);
    :meth:`close` (idempotent) releases it and is always called by the owner
    once the transfer is over, whether or not it ever started.

    Attributes:
        length: the body length (``IBodyProducer``).
        sent: bytes handed to the consumer so far.
        last_progress: when the last chunk was handed over (clock seconds),
            or when the current limiter wait ends.
    """

    def __init__(
        self,
        *,
        fd: int,
        length: int,
        runner: IBlockingRunner,
        clock: IReactorTime,
        limiter: BandwidthLimiter,
        chunk_bytes: int = CHUNK_BYTES,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.length = length
        self._range = BlobRange(fd, offset=0, length=length, runner=runner)
        self._clock = clock
        self._limiter = limiter
        self._chunk_bytes = chunk_bytes
        self._on_bytes = on_bytes
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._paused = False
        self._waiting: IDelayedCall | None = None
        self.sent = 0
        self.last_progress = clock.seconds()

    # -- IBodyProducer / IPushProducer -------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        done: Deferred[None] = Deferred()
        self._done = done
        self.last_progress = self._clock.seconds()
        self._step()
        return done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._step()

    def stopProducing(self) -> None:
        """Stop for good; the Deferred from :meth:`startProducing` never fires."""
        self._done = None
        self.close()

    # -- the loop -------------------------------------------------------------------

    def _step(self) -> None:
        if self._paused or self._busy or self._done is None or self._range.closed:
            return
        if self._range.remaining == 0:
            self._end(None)
            return
        size = min(self._chunk_bytes, self._range.remaining)
        delay = self._limiter.reserve(size)
        if delay > 0:
            self.last_progress = self._clock.seconds() + delay
            self._waiting = self._clock.callLater(delay, self._read, size)
        else:
            self._read(size)

    @property
    def _busy(self) -> bool:
        return self._range.reading or self._waiting is not None

    def _read(self, size: int) -> None:
        self._waiting = None
        if not self._range.closed:
            self._range.read(size).addCallbacks(self._got, self._read_failed)

    def _got(self, data: bytes) -> None:
        self.sent += len(data)
        self.last_progress = self._clock.seconds()
        assert self._consumer is not None
        self._consumer.write(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        self._step()

    def _read_failed(self, failure: Failure) -> None:
        error = failure.value
        self._end(error if isinstance(error, Exception) else IncompleteBody(str(error)))

    def _end(self, error: Exception | None) -> None:
        done, self._done = self._done, None
        self.close()
        if done is None:
            return
        if error is None:
            done.callback(None)
        else:
            done.errback(error)

    def close(self) -> None:
        """Release the file (after any read in flight); idempotent."""
        if self._waiting is not None:
            if self._waiting.active():
                self._waiting.cancel()
            self._waiting = None
        self._range.close()


class StallWatchdog:
    """Calls ``on_stall`` once ``progress()`` is older than ``limit`` seconds.

    Args:
        clock: the time source.
        limit: seconds without progress that count as a stall.
        progress: returns the clock time of the latest progress (a time in
            the future means "waiting on purpose until then").
        on_stall: called once, at the stall.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: float,
        progress: Callable[[], float],
        on_stall: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._progress = progress
        self._on_stall = on_stall
        self._call: IDelayedCall | None = None
        self.stalled = False

    def start(self) -> StallWatchdog:
        self._call = self._clock.callLater(self._limit, self._check)
        return self

    def _check(self) -> None:
        idle = self._clock.seconds() - self._progress()
        if idle >= self._limit:
            self._call = None
            self.stalled = True
            self._on_stall()
        else:
            self._call = self._clock.callLater(self._limit - idle, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class StagingSink(Protocol):
    """Receives a response body into a staging file, paced by the limiter.

    :attr:`done` fires with the byte count when the body ended cleanly, or
    fails: :class:`BadFraming` when it exceeds ``expected`` bytes, the
    staging error (budget, disk) as raised, the transport's reason when the
    connection broke. The caller finishes or aborts the staging file.
    """

    def __init__(
        self,
        *,
        limiter: BandwidthLimiter,
        clock: IReactorTime,
        expected: int,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.done: Deferred[int] = Deferred()
        self.staging: StagingFile | None = None
        self.received = 0
        self._limiter = limiter
        self._clock = clock
        self._expected = expected
        self._on_bytes = on_bytes
        self._pauses: set[str] = set()
        self._resume_call: IDelayedCall | None = None
        self._failed = False
        self.last_progress = clock.seconds()

    def pressure(self, paused: bool) -> None:
        """The staging file's back-pressure callback."""
        if paused:
            self._pause("disk")
        else:
            self._resume("disk")

    def _pause(self, reason: str) -> None:
        transport: Any = self.transport
        if not self._pauses and transport is not None:
            transport.pauseProducing()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        transport: Any = self.transport
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and transport is not None and not self._failed:
                transport.resumeProducing()

    def _resume_pacing(self) -> None:
        self._resume_call = None
        self._resume("pacing")

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self.received += len(data)
        self.last_progress = self._clock.seconds()
        if self.received > self._expected:
            self.fail(BadFraming(f"body longer than the {self._expected} bytes announced"))
            return
        try:
            assert self.staging is not None
            self.staging.write(data)
        except KuraError as error:
            self.fail(error)
            return
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        delay = self._limiter.reserve(len(data))
        if delay > 0 and self._resume_call is None:
            self.last_progress = self._clock.seconds() + delay
            self._pause("pacing")
            self._resume_call = self._clock.callLater(delay, self._resume_pacing)

    def fail(self, error: Exception) -> None:
        """Give up on the body: stop the transport and fail :attr:`done`."""
        if self._failed:
            return
        self._failed = True
        self._cancel_resume()
        if not self.done.called:
            self.done.errback(error)
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def _cancel_resume(self) -> None:
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_resume()
        if self._failed or self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(self.received)
        else:
            self.done.errback(reason)


@implementer(IBodyProducer)
class BytesBody:
    """A small in-memory request body (inline artifacts), written in one go.

    Unlike twisted's ``FileBodyProducer`` it needs no cooperator, so it works
    the same on a real reactor and on a test clock.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)
        self.last_progress = 0.0

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def close(self) -> None:
        pass

"""Artifact responses: one head for both serving paths, and the fallback body producer.

:func:`artifact_head` decides status and headers for an artifact GET; the
accelerator serializes exactly those headers and twisted.web sets them on its
``Request``, so the two paths answer identically.

:class:`FileBodyProducer` moves a body through twisted.web (TLS, HTTP/2, and
everything the accelerator declines): it reads fixed chunks of the blob on a
storage thread (:class:`kura.storage.reading.BlobRange`) and writes them to
the request, pausing when the transport's
buffer is full. It aborts a transfer that makes no write progress for the
send timeout (twisted.web disables its own timeout once a request is in).

:class:`SmallFileBody` sends a body of at most :data:`SMALL_BODY_BYTES` with
one ``pread`` on the reactor thread and one write: for a few KiB in the page
cache that is far cheaper than a storage-thread round trip and a registered
producer (the transport buffers it; its send deadline is the connection's).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from kura.domain.artifacts import Manifest, safe_content_type
from kura.storage.interfaces import IBlockingRunner
from kura.storage.reading import BlobRange, IncompleteBody, read_small

from .ranges import BodySlice, resolve_range

#: Bytes per read on the fallback path.
CHUNK_BYTES = 512 * 1024
#: Bytes per read for an HTTP/2 response: a stream queues at most its
#: high-water mark plus one chunk (kura.web.h2), a hundred streams a connection.
H2_CHUNK_BYTES = 128 * 1024
#: Bodies up to this size are read on the reactor thread (:class:`SmallFileBody`).
#: Measured here: open+fstat+pread+close of a page-cached file costs 4.6 µs at
#: 4 KiB, 6.3 µs at 64 KiB and 14 µs at 256 KiB, where a storage-thread round
#: trip costs tens of µs of CPU; 64 KiB keeps a cold read on the reactor short.
SMALL_BODY_BYTES = 64 * 1024


@attrs.frozen
class ArtifactHead:
    """Status, headers and byte range of an artifact response."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: BodySlice


def artifact_head(
    manifest: Manifest, range_header: str | None, if_range: str | None
) -> ArtifactHead:
    """The response head for a GET of ``manifest``.

    Raises:
        RangeNotSatisfiable: a single range starts past the end.
    """
    if range_header is None:
        return _whole(manifest)
    return _artifact_head(manifest, range_header, if_range)


@functools.lru_cache(maxsize=4096)
def _whole(manifest: Manifest) -> ArtifactHead:
    # The common case, a whole artifact, depends on the manifest alone.
    return _artifact_head(manifest, None, None)


def _artifact_head(
    manifest: Manifest, range_header: str | None, if_range: str | None
) -> ArtifactHead:
    body = resolve_range(range_header, if_range, manifest.size, manifest.etag)
    headers = [
        (b"Content-Type", safe_content_type(manifest.content_type).encode("ascii")),
        (b"Content-Length", b"%d" % body.length),
        (b"Accept-Ranges", b"bytes"),
        (b"ETag", manifest.etag.encode("ascii")),
    ]
    if body.content_range is not None:
        headers.append((b"Content-Range", body.content_range.encode("ascii")))
    return ArtifactHead(body.status, tuple(headers), body)


class TransferFailed(Exception):
    """A body transfer ended early.

    Attributes:
        result: the egress metric label: ``client_aborted``,
            ``write_timeout``, ``incomplete`` or ``error``.
        sent: bytes delivered before the failure.
    """

    def __init__(self, result: str, sent: int) -> None:
        super().__init__(result)
        self.result = result
        self.sent = sent


class SmallFileBody:
    """Sends ``length`` (at most :data:`SMALL_BODY_BYTES`) bytes of ``fd`` from
    ``offset`` with one read on the reactor thread and one write.

    Like :class:`FileBodyProducer` it owns ``fd`` and closes it, and
    :attr:`sent` counts what was written; having nothing to wait for, it
    sends at once (:meth:`send`) instead of firing a Deferred.
    """

    def __init__(self, *, request: Any, fd: int, offset: int, length: int) -> None:
        assert length <= SMALL_BODY_BYTES, "a large body goes through FileBodyProducer"
        self._request = request
        self._fd = fd
        self._offset = offset
        self._length = length
        self.sent = 0

    def send(self) -> int:
        """Read and write the body; returns its length.

        Raises:
            TransferFailed: ``client_aborted`` (the client is gone),
                ``incomplete`` (the file is shorter than promised) or
                ``error`` (the read failed); nothing was written.
        """
        try:
            if getattr(self._request, "_disconnected", False):
                raise TransferFailed("client_aborted", 0)
            try:
                data = read_small(self._fd, self._offset, self._length) if self._length else b""
            except IncompleteBody:
                raise TransferFailed("incomplete", 0) from None
            except OSError:
                raise TransferFailed("error", 0) from None
        finally:
            os.close(self._fd)
        if data:
            self._request.write(data)
        self.sent = len(data)
        return self.sent


@implementer(IPushProducer)
class FileBodyProducer:
    """Streams ``length`` bytes of ``fd`` from ``offset`` into a request.

    The producer owns ``fd`` (through a :class:`~kura.storage.reading.BlobRange`)
    and closes it when the transfer ends. :meth:`start` returns a Deferred
    that fires with the byte count once the last byte was written, or fails
    with :class:`TransferFailed`. It reads and writes ``chunk_bytes`` at a
    time.
    """

    def __init__(
        self,
        *,
        request: Any,
        fd: int,
        offset: int,
        length: int,
        runner: IBlockingRunner,
        clock: IReactorTime,
        send_timeout: float,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self._request = request
        self._range = BlobRange(fd, offset=offset, length=length, runner=runner)
        self._clock = clock
        self._send_timeout = send_timeout
        self._chunk_bytes = chunk_bytes
        self._paused = False
        self._done: Deferred[int] = Deferred()
        self._watchdog: IDelayedCall | None = None
        self.sent = 0

    def start(self) -> Deferred[int]:
        self._request.registerProducer(self, True)
        self._read_next()
        return self._done

    def _read_next(self) -> None:
        if self._paused or self._range.reading or self._range.closed:
            return
        if self._range.remaining == 0:
            self._finish(None)
            return
        self._range.read(self._chunk_bytes).addCallbacks(self._got, self._read_failed)

    def _got(self, data: bytes) -> None:
        self.sent += len(data)
        self._request.write(data)
        self._read_next()

    def _read_failed(self, failure: Failure) -> None:
        # A file shorter than its manifest: never pretend success.
        result = "incomplete" if failure.check(IncompleteBody) else "error"
        self._finish(TransferFailed(result, self.sent))

    def _finish(self, error: TransferFailed | None) -> None:
        self._close()
        self._request.unregisterProducer()
        if error is None:
            self._done.callback(self.sent)
        else:
            self._done.errback(error)

    def _close(self) -> None:
        self._cancel_watchdog()
        self._range.close()

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _stalled(self) -> None:
        self._watchdog = None
        if not self._range.closed:
            self._finish(TransferFailed("write_timeout", self.sent))

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True
        if self._watchdog is None:
            self._watchdog = self._clock.callLater(self._send_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_watchdog()
        self._read_next()

    def stopProducing(self) -> None:
        """The consumer went away: close the file and fail the transfer.

        A transport stops its producer *before* the protocol hears that the
        connection was lost. Failing the transfer at once would let the
        handler return and the request be finished as if it had been
        answered (counted as a success, and finished with this producer
        still registered). So the failure waits for the request to see the
        loss, unless it already has.
        """
        if self._range.closed:
            return
        self._close()
        failure = TransferFailed("client_aborted", self.sent)
        if getattr(self._request, "_disconnected", False):
            self._done.errback(failure)
        else:
            self._request.notifyFinish().addBoth(lambda _: self._done.errback(failure))

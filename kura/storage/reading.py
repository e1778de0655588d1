"""Reading a byte range of an open blob: off the reactor thread, or at once when small.

:class:`BlobRange` is the one place that reads a stored file for a producer:
the download fallback (:class:`kura.web.download.FileBodyProducer`) and peer
bodies (:class:`kura.replication.bodies.PacedFileBody`) both use it. It owns
the descriptor, reads with ``pread`` on the blocking runner (so the reactor
never waits on the disk), and closes the descriptor only once no read can
still be using it: closing under a running ``pread`` would let the number be
reused while a storage thread still reads through it.

:func:`read_small` is the exception, for small bodies only (the fallback's
``SMALL_BODY_BYTES``): one ``pread`` on the caller's thread. Reading a few
KiB from the page cache costs a few microseconds; handing it to a storage
thread and back costs far more (two wake-ups and GIL hand-offs per request).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .interfaces import IBlockingRunner


class IncompleteBody(Exception):
    """The file ended before the length its manifest promised."""


def read_small(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes of ``fd`` from ``offset``, read now on the caller's thread.

    Only for small ranges (the reactor thread may call it; it never waits for
    a large read).

    Raises:
        IncompleteBody: the file ends before ``offset + length``.
        OSError: the read failed.
    """
    data = os.pread(fd, length, offset)
    while len(data) < length:
        # A regular file returns less than asked only at its end (or when
        # interrupted): read on until the range is complete or the file ends.
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise IncompleteBody(
                f"file ended at offset {offset + len(data)}, {length - len(data)} bytes short"
            )
        data += more
    return data


class BlobRange:
    """``length`` bytes of ``fd`` from ``offset``, read a chunk at a time.

    At most one read is in flight. :meth:`read` fires with the next bytes
    (never empty), or fails with :class:`IncompleteBody` when the file is
    shorter than promised, or with the ``OSError`` of the read. After
    :meth:`close` a read in flight never fires: its owner has moved on.

    Attributes:
        remaining: bytes of the range not read yet.
        reading: a read is in flight.
    """

    def __init__(self, fd: int, *, offset: int, length: int, runner: IBlockingRunner) -> None:
        self._fd: int | None = fd
        self._offset = offset
        self._runner = runner
        self._closing = False
        self.remaining = length
        self.reading = False

    @property
    def closed(self) -> bool:
        """:meth:`close` was called (the descriptor may wait for a read)."""
        return self._closing

    def read(self, size: int) -> Deferred[bytes]:
        """Read the next ``min(size, remaining)`` bytes (``remaining`` > 0)."""
        assert self._fd is not None and not self._closing, "read after close"
        assert not self.reading, "one read at a time"
        assert self.remaining > 0, "read past the range"
        size = min(size, self.remaining)
        self.reading = True
        result: Deferred[bytes] = Deferred()
        done = self._runner.run(os.pread, self._fd, size, self._offset)
        done.addCallbacks(self._got, self._failed, callbackArgs=(result,), errbackArgs=(result,))
        return result

    def _got(self, data: bytes, result: Deferred[bytes]) -> None:
        self.reading = False
        if self._closing:
            self._release()
        elif not data:
            result.errback(
                IncompleteBody(f"file ended at offset {self._offset}, {self.remaining} bytes short")
            )
        else:
            self._offset += len(data)
            self.remaining -= len(data)
            result.callback(data)

    def _failed(self, failure: Failure, result: Deferred[bytes]) -> None:
        self.reading = False
        if self._closing:
            self._release()
        else:
            result.errback(failure)

    def close(self) -> None:
        """Release the descriptor, after the read in flight if any; idempotent."""
        self._closing = True
        if not self.reading:
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

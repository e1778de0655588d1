"""A deterministic stand-in for the accelerator's transfer engine (for tests).

:class:`FakeTransferEngine` provides :class:`~.interfaces.ITransferEngine`
without sockets, threads or splice: each transfer is recorded with the head
it was given and the body bytes the kernel would send (read from the file
when it starts), and "sent" by writing them to the connection's transport, so
a ``StringTransport`` shows the complete responses. By default a transfer
completes inside :meth:`~FakeTransferEngine.start`, like a small body on the
reactor; with ``hold`` set it waits until the test completes, fails or
stops it, like a large body on a worker thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from zope.interface import implementer

from .interfaces import CLIENT_ABORTED, INCOMPLETE, OK, ITransfer, ITransferEngine

__all__ = ["FakeTransfer", "FakeTransferEngine"]


@implementer(ITransfer)
class FakeTransfer:
    """One transfer the fake engine was asked to make.

    Attributes:
        head: the response head to send.
        body: the body bytes the kernel would send (shorter than ``length``
            when the file was: the transfer then ends ``incomplete``).
        length: the body length the response head announced.
        result: the outcome once over, ``None`` while held.
        sent: body bytes written to the transport so far.
        head_sent: whether the head was written to the transport.
        stopped: whether the connection asked the transfer to stop.
    """

    def __init__(
        self,
        transport: Any,
        head: bytes,
        body: bytes,
        length: int,
        done: Callable[[Any], None],
    ) -> None:
        self.head = head
        self.body = body
        self.length = length
        self.result: str | None = None
        self.sent = 0
        self.head_sent = False
        self.stopped = False
        self._transport = transport
        self._done = done

    def stop(self) -> None:
        if self.result is None:
            self.stopped = True

    def send_head(self) -> None:
        """Write the head now (the body is still to come)."""
        if not self.head_sent:
            self.head_sent = True
            self._transport.write(self.head)

    def complete(self) -> None:
        """Send the rest and end (``ok``, or ``incomplete`` for a short file)."""
        self._end(OK if len(self.body) == self.length else INCOMPLETE, len(self.body))
        self._done(self)

    def fail(self, result: str = CLIENT_ABORTED, *, sent: int = 0) -> None:
        """End with ``result`` after ``sent`` body bytes (the head goes out first)."""
        self._end(result, sent)
        self._done(self)

    def _end(self, result: str, sent: int) -> None:
        assert self.result is None, "the transfer is already over"
        self.send_head()
        self._transport.write(self.body[self.sent : sent])
        self.sent = sent
        self.result = result


@implementer(ITransferEngine)
class FakeTransferEngine:
    """Records transfers instead of making them (see the module docstring).

    Args:
        hold: transfers wait for the test instead of completing in ``start``.
        mode: the serving-path label.

    Attributes:
        transfers: every transfer started, in order.
        reserved: reservations taken and neither started nor released (a
            leak when nonzero after the requests are over).
        refuse: ``reserve`` fails as if out of descriptors.
        closed: :meth:`close` was called.
    """

    def __init__(self, *, hold: bool = False, mode: str = "splice") -> None:
        self.mode = mode
        self.hold = hold
        self.transfers: list[FakeTransfer] = []
        self.reserved = 0
        self.refuse = False
        self.closed = False

    @property
    def held(self) -> list[FakeTransfer]:
        """Transfers still waiting for the test."""
        return [transfer for transfer in self.transfers if transfer.result is None]

    def reserve(self, length: int) -> object:
        if self.refuse:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        self.reserved += 1
        return self

    def release(self, reservation: object) -> None:
        assert reservation is self and self.reserved > 0
        self.reserved -= 1

    def start(
        self,
        reservation: object,
        transport: Any,
        head: bytes,
        file_fd: int,
        offset: int,
        length: int,
        done: Callable[[Any], None],
    ) -> FakeTransfer:
        self.release(reservation)
        body = os.pread(file_fd, length, offset) if length else b""
        transfer = FakeTransfer(transport, head, body, length, done)
        self.transfers.append(transfer)
        if not self.hold:
            transfer._end(OK if len(body) == length else INCOMPLETE, len(body))
        return transfer

    def send(
        self, transport: Any, head: bytes, file_fd: int, length: int, done: Callable[[Any], None]
    ) -> FakeTransfer | None:
        """As :meth:`start` of the whole file without a reservation; a transfer
        that completed is recorded in :attr:`transfers` but not returned
        (``None``), as the kernel engine makes none."""
        self.reserved += 1
        transfer = self.start(self, transport, head, file_fd, 0, length, done)
        return None if transfer.result == OK else transfer

    def close(self) -> None:
        self.closed = True

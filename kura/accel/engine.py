"""The kernel transfer engine: splice/sendfile inline on the reactor, then a worker thread.

A response starts on the reactor thread (:func:`~.transfer.pump`): a small
body leaves in two or three syscalls inside ``dataReceived``, with no thread
hop (a thread hop per request costs more than serving a whole 4 KiB
response). When the socket pushes back (EAGAIN) or the body used the
inline budget, the rest runs on the accelerator's bounded thread pool
(:func:`~.transfer.run_blocking`) on a ``dup`` of the socket, while the
connection reads nothing; at most ``max_concurrent`` transfers exist at once
(the connection's permits), so the pool never queues behind itself.

In splice mode each transfer borrows a pipe from a :class:`~.pipes.PipePool`
(reserved before authorization, so running out of descriptors can still
fall back); a pipe goes back to the pool only when its transfer completed,
since a failed one may have left bytes in it. A body of at most
:data:`SENDFILE_MAX_BYTES` goes out with ``sendfile`` in either mode: through
a pipe it costs two syscalls instead of one, and a profile of 4 KiB downloads
had the splice step at a fifth of the reactor's time. No pipe is reserved for
a file that small (taking and returning one cost ~3 µs per 4 KiB response);
a small range of a larger file returns its unused pipe at once. The
serving-path label stays the mode's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .interfaces import ERROR, OK, ITransferEngine
from .pipes import Pipe, PipePool, discard
from .transfer import BLOCKED, YIELDED, BodyTransfer, pump, run_blocking

if TYPE_CHECKING:
    from .accelerator import AcceleratorSettings

#: Bodies up to this size are sent with ``sendfile`` in splice mode too.
SENDFILE_MAX_BYTES = 64 * 1024


@implementer(ITransferEngine)
class KernelTransferEngine:
    """Moves responses with ``splice`` or ``sendfile`` (see the module docstring).

    Args:
        mode: ``splice`` or ``sendfile``.
        chunk_bytes: most body bytes per syscall (and a pipe's capacity).
        inline_bytes: most body bytes sent on the reactor thread before the
            rest moves to a worker (0: every body goes to a worker).
        send_timeout: seconds a worker waits without progress before it
            gives up with ``write_timeout``.
        max_concurrent: transfers at once (spare pipes kept).
        reactor: runs the workers' results on the reactor thread.
        pool: the workers.
    """

    def __init__(
        self,
        *,
        mode: str,
        chunk_bytes: int,
        inline_bytes: int,
        send_timeout: float,
        max_concurrent: int,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
    ) -> None:
        self.mode = mode
        self._chunk_bytes = chunk_bytes
        self._inline_bytes = inline_bytes
        self._send_timeout = send_timeout
        self._reactor = reactor
        self._pool = pool
        self.pipes = PipePool(chunk_bytes, keep=max_concurrent) if mode == "splice" else None

    @classmethod
    def from_settings(
        cls, settings: AcceleratorSettings, *, reactor: IReactorFromThreads, pool: ThreadPool
    ) -> KernelTransferEngine:
        """The engine the operator configured, running its workers on ``pool``."""
        config = settings.config
        return cls(
            mode=config.mode,
            chunk_bytes=config.chunk_bytes,
            inline_bytes=config.inline_bytes,
            send_timeout=settings.send_timeout,
            max_concurrent=config.max_concurrent,
            reactor=reactor,
            pool=pool,
        )

    def reserve(self, length: int) -> Pipe | None:
        # A small body goes out with sendfile: no pipe to take and give back.
        if self.pipes is None or length <= SENDFILE_MAX_BYTES:
            return None
        return self.pipes.take()

    def release(self, reservation: object) -> None:
        if reservation is not None and self.pipes is not None:
            self.pipes.give_back(reservation)  # type: ignore[arg-type]

    def start(
        self,
        reservation: object,
        transport: Any,
        head: bytes,
        file_fd: int,
        offset: int,
        length: int,
        done: Callable[[Any], None],
    ) -> BodyTransfer:
        if reservation is not None and length <= SENDFILE_MAX_BYTES:
            # A small range of a large file: the pipe is unused, so clean.
            self.release(reservation)
            reservation = None
        transfer = BodyTransfer(
            transport.socket,
            file_fd,
            offset,
            length,
            head,
            self._chunk_bytes,
            reservation,  # type: ignore[arg-type]
        )
        self._run(transfer, done)
        return transfer

    def send(
        self, transport: Any, head: bytes, file_fd: int, length: int, done: Callable[[Any], None]
    ) -> BodyTransfer | None:
        sock = transport.socket
        written = sent = 0
        if length <= self._inline_bytes:
            # Two syscalls and no object: the whole point of this method.
            try:
                written = sock.send(head, socket.MSG_MORE if length else 0)
                if written == len(head) and length:
                    sent = os.sendfile(sock.fileno(), file_fd, 0, length)
            except OSError:
                pass  # pump() meets it again below and tells what it means
            if written == len(head) and sent == length:
                return None
        # Pushed back, short or failed: the general machinery takes it from here.
        transfer = BodyTransfer(
            sock, file_fd, sent, length - sent, head[written:], self._chunk_bytes
        )
        transfer.sent = sent
        self._run(transfer, done)
        return transfer

    def close(self) -> None:
        if self.pipes is not None:
            self.pipes.close()

    def _run(self, transfer: BodyTransfer, done: Callable[[BodyTransfer], None]) -> None:
        """Go on with ``transfer`` on the reactor within the inline budget, then on a worker."""
        inline = self._inline_bytes
        result = pump(transfer, budget=inline) if inline else YIELDED
        if result in (BLOCKED, YIELDED):
            self._continue_in_thread(transfer, done)
        else:
            self._over(transfer, result)

    def _continue_in_thread(
        self, transfer: BodyTransfer, done: Callable[[BodyTransfer], None]
    ) -> None:
        # The worker owns every descriptor it touches (see kura.accel.transfer).
        transfer.sock = socket.socket(fileno=os.dup(transfer.sock.fileno()))
        work: Deferred[str] = deferToThreadPool(
            self._reactor, self._pool, run_blocking, transfer, self._send_timeout
        )

        def finished(result: str | Failure) -> None:
            transfer.sock.close()
            self._over(transfer, result if isinstance(result, str) else ERROR)
            done(transfer)

        work.addBoth(finished)

    def _over(self, transfer: BodyTransfer, result: str) -> None:
        transfer.result = result
        pipe = transfer.pipe
        if pipe is not None:
            if result == OK and self.pipes is not None:
                self.pipes.give_back(pipe)
            else:
                discard(pipe)  # bytes may be left in it: never reuse it

"""Moving an artifact body from a file to a socket inside the kernel.

One :class:`BodyTransfer` describes a response in flight: the unsent part of
its head, the file range still to send and, in splice mode, the bytes parked
in its pipe. :func:`pump` advances it without ever blocking; the reactor calls
it first, so a small body leaves in two or three syscalls on the reactor
thread with no thread hop. When the socket pushes back (EAGAIN) or the body is
large, :func:`run_blocking` finishes the transfer on a worker thread, waiting
for writability with ``poll`` (the shared socket stays non-blocking).

Descriptors: the worker only uses descriptors the transfer owns (a ``dup`` of
the connection's socket, the artifact file, its own pipe), which the reactor
closes after the worker returns, so the worker can never touch a descriptor
number the reactor closed and reused. To stop a worker early, the reactor
calls :meth:`BodyTransfer.stop`, which sets :attr:`BodyTransfer.stopped` and
shuts the duplicated socket down.

A :class:`BodyTransfer` is the :class:`~.interfaces.ITransfer` the kernel
engine (:mod:`.engine`) hands the connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import time

from zope.interface import implementer

from .interfaces import CLIENT_ABORTED, ERROR, INCOMPLETE, OK, WRITE_TIMEOUT, ITransfer

__all__ = [
    "BLOCKED",
    "CLIENT_ABORTED",
    "ERROR",
    "INCOMPLETE",
    "OK",
    "WRITE_TIMEOUT",
    "YIELDED",
    "BodyTransfer",
    "pump",
    "run_blocking",
]

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

#: pump() stopped without finishing: the socket would block.
BLOCKED = "blocked"
#: pump() stopped without finishing: it used its byte budget.
YIELDED = "yielded"

_CLIENT_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN})


@implementer(ITransfer)
class BodyTransfer:
    """The state of one response being sent (see the module docstring).

    (A plain class with slots: one is made per response.)

    Attributes:
        sock: the socket to write to (the transport's, then a ``dup`` once a
            worker takes over).
        file_fd: the artifact (the caller's, open until the transfer is over).
        offset: next file offset to send.
        remaining: body bytes still to send from the file.
        head: response head bytes not yet sent.
        pipe: ``(read, write)`` in splice mode, else ``None``.
        in_pipe: bytes read from the file into the pipe but not yet sent.
        sent: body bytes delivered to the socket so far.
        stopped: set by the reactor thread to make a worker give up; a plain
            attribute (reads and writes of it are atomic under the GIL).
        result: the outcome once over (set on the reactor thread).
    """

    __slots__ = (
        "chunk_bytes",
        "file_fd",
        "head",
        "in_pipe",
        "offset",
        "pipe",
        "remaining",
        "result",
        "sent",
        "sock",
        "stopped",
    )

    def __init__(
        self,
        sock: socket.socket,
        file_fd: int,
        offset: int,
        remaining: int,
        head: bytes,
        chunk_bytes: int,
        pipe: tuple[int, int] | None = None,
    ) -> None:
        self.sock = sock
        self.file_fd = file_fd
        self.offset = offset
        self.remaining = remaining
        self.head = head
        self.chunk_bytes = chunk_bytes
        self.pipe = pipe
        self.in_pipe = 0
        self.sent = 0
        self.stopped = False
        self.result: str | None = None

    def __repr__(self) -> str:
        return (
            f"<BodyTransfer offset={self.offset} remaining={self.remaining} "
            f"head={len(self.head)} sent={self.sent} result={self.result}>"
        )

    @property
    def finished(self) -> bool:
        return not self.head and self.remaining == 0 and self.in_pipe == 0

    @property
    def head_sent(self) -> bool:
        return not self.head

    def stop(self) -> None:
        """Make a worker give up (see the module docstring); idempotent."""
        if self.result is None and not self.stopped:
            self.stopped = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def _sendfile_step(t: BodyTransfer) -> str | None:
    try:
        written = os.sendfile(t.sock.fileno(), t.file_fd, t.offset, min(t.chunk_bytes, t.remaining))
    except BlockingIOError:
        return BLOCKED
    if written == 0:
        return INCOMPLETE  # the file is shorter than its manifest
    t.offset += written
    t.remaining -= written
    t.sent += written
    return None


def _splice_step(t: BodyTransfer) -> str | None:
    assert t.pipe is not None
    read_end, write_end = t.pipe
    if t.in_pipe == 0:
        moved = os.splice(
            t.file_fd,
            write_end,
            min(t.chunk_bytes, t.remaining),
            offset_src=t.offset,
            flags=SPLICE_FLAGS,
        )
        if moved == 0:
            return INCOMPLETE
        t.offset += moved
        t.remaining -= moved
        t.in_pipe = moved
    try:
        written = os.splice(read_end, t.sock.fileno(), t.in_pipe, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return BLOCKED
    t.in_pipe -= written
    t.sent += written
    return None


def pump(t: BodyTransfer, budget: int) -> str:
    """Send without blocking until done, blocked, or ``budget`` body bytes went out.

    Returns:
        ``OK`` when the whole response was sent; ``BLOCKED`` or ``YIELDED``
        when it should continue later; or a failure result.
    """
    step = _splice_step if t.pipe is not None else _sendfile_step
    start = t.sent
    try:
        head = t.head
        if head:
            # _send_head, inlined: every response starts here.
            try:
                written = t.sock.send(head, socket.MSG_MORE if t.remaining else 0)
            except BlockingIOError:
                return BLOCKED
            if written < len(head):
                t.head = head[written:]
                return BLOCKED
            t.head = b""
        while t.remaining or t.in_pipe:
            if t.stopped:
                return CLIENT_ABORTED
            if t.sent - start >= budget:
                return YIELDED
            result = step(t)
            if result is not None:
                return result
    except OSError as error:
        return CLIENT_ABORTED if error.errno in _CLIENT_GONE else ERROR
    return OK


def run_blocking(t: BodyTransfer, no_progress_timeout: float) -> str:
    """Finish ``t`` on a worker thread; returns a terminal result.

    Waits for writability with ``poll`` in slices so a stop request is seen
    within a second; gives up with ``WRITE_TIMEOUT`` when no byte could be
    written for ``no_progress_timeout`` seconds.
    """
    poller = select.poll()
    poller.register(t.sock.fileno(), select.POLLOUT)
    last_progress = time.monotonic()
    while True:
        before = (t.sent, len(t.head))
        result = pump(t, budget=t.chunk_bytes * 64)
        if result not in (BLOCKED, YIELDED):
            return result
        if (t.sent, len(t.head)) != before:
            last_progress = time.monotonic()
        if result == YIELDED:
            continue
        while True:
            if t.stopped:
                return CLIENT_ABORTED
            waited = time.monotonic() - last_progress
            if waited >= no_progress_timeout:
                return WRITE_TIMEOUT
            events = poller.poll(min(1000, int((no_progress_timeout - waited) * 1000) + 1))
            if events:
                if events[0][1] & (select.POLLERR | select.POLLHUP):
                    return CLIENT_ABORTED
                break

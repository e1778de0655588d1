"""The transfer engine seam: the kernel engine and the fake, against one interface.

The kernel engine runs here on a socket pair and a thread pool whose work the
test runs when it chooses, so both the inline path and the worker path are
exercised without a reactor.
"""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from kura.accel.accelerator import Accelerator
from kura.accel.engine import SENDFILE_MAX_BYTES, KernelTransferEngine
from kura.accel.interfaces import (
    CLIENT_ABORTED,
    INCOMPLETE,
    OK,
    ITransfer,
    ITransferEngine,
)
from kura.accel.testing import FakeTransfer, FakeTransferEngine
from kura.accel.transfer import BodyTransfer
from kura.service import KuraNode

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"


class QueuedThreads:
    """A thread pool and reactor stand-in: work waits until :meth:`run` runs it here."""

    def __init__(self) -> None:
        self.queued: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any
    ) -> None:
        def work() -> None:
            try:
                result = f(*args)
            except BaseException as error:
                on_result(False, error)
                return
            on_result(True, result)

        self.queued.append(work)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def run(self) -> None:
        while self.queued:
            self.queued.pop(0)()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def body_file(tmp_path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    body = os.urandom(200_000)
    path = tmp_path / "blob"
    path.write_bytes(body)
    fd = os.open(path, os.O_RDONLY)
    yield fd, body
    os.close(fd)


def engine(threads: QueuedThreads, *, mode: str = "splice", inline: int = 1 << 20) -> Any:
    return KernelTransferEngine(
        mode=mode,
        chunk_bytes=64 * 1024,
        inline_bytes=inline,
        send_timeout=5.0,
        max_concurrent=4,
        reactor=threads,  # type: ignore[arg-type]
        pool=threads,  # type: ignore[arg-type]
    )


def receive(client: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def transport_of(server: socket.socket) -> Any:
    return type("Transport", (), {"socket": server})()


def test_a_node_moves_its_bodies_with_the_configured_kernel_engine(node: KuraNode) -> None:
    """The composition root gives the accelerator a kernel engine in the configured mode."""
    engine = node.accelerator.engine
    assert isinstance(engine, KernelTransferEngine) and verifyObject(ITransferEngine, engine)
    assert engine.mode == node.config.accelerator.mode == "splice"


def test_an_accelerator_refuses_an_engine_that_is_not_one(node: KuraNode) -> None:
    """The engine is checked against ITransferEngine when the accelerator is built."""
    base = node.accelerator
    with pytest.raises(TypeError):
        Accelerator(base.settings, base.collaborators, object())  # type: ignore[arg-type]


def test_both_engines_and_their_transfers_provide_the_interfaces(
    pair: tuple[socket.socket, socket.socket], body_file: tuple[int, bytes]
) -> None:
    """The kernel engine, the fake, and the transfers each returns are verified."""
    server, client = pair
    fd, body = body_file
    kernel = engine(QueuedThreads())
    fake = FakeTransferEngine()
    assert verifyObject(ITransferEngine, kernel)
    assert verifyObject(ITransferEngine, fake)
    head = HEAD % 10
    real = kernel.start(kernel.reserve(len(body)), transport_of(server), head, fd, 0, 10, print)
    assert isinstance(real, BodyTransfer) and verifyObject(ITransfer, real)
    recorded = fake.start(fake.reserve(len(body)), StringTransport(), head, fd, 0, 10, print)
    assert isinstance(recorded, FakeTransfer) and verifyObject(ITransfer, recorded)
    assert receive(client, len(head) + 10) == head + body[:10]


@pytest.mark.parametrize("mode", ["splice", "sendfile"])
def test_a_small_body_leaves_inline_and_its_pipe_is_kept(
    pair: tuple[socket.socket, socket.socket], body_file: tuple[int, bytes], mode: str
) -> None:
    """Within the inline budget the whole response leaves before start() returns."""
    server, client = pair
    fd, body = body_file
    threads = QueuedThreads()
    kernel = engine(threads, mode=mode)
    calls: list[Any] = []
    transfer = kernel.start(
        kernel.reserve(len(body)), transport_of(server), HEAD % 4096, fd, 100, 4096, calls.append
    )
    assert (transfer.result, transfer.sent, transfer.head_sent) == (OK, 4096, True)
    assert calls == [] and threads.queued == []
    assert receive(client, len(HEAD % 4096) + 4096) == HEAD % 4096 + body[100:4196]
    assert len(kernel.pipes or ()) == (1 if mode == "splice" else 0)


@pytest.mark.parametrize("mode", ["splice", "sendfile"])
def test_beyond_the_inline_budget_a_worker_finishes_and_reports_once(
    pair: tuple[socket.socket, socket.socket], body_file: tuple[int, bytes], mode: str
) -> None:
    """With no inline budget the body goes to a worker; done() fires once, after it."""
    server, client = pair
    fd, body = body_file
    threads = QueuedThreads()
    kernel = engine(threads, mode=mode, inline=0)
    calls: list[Any] = []
    transfer = kernel.start(
        kernel.reserve(len(body)), transport_of(server), HEAD % 1000, fd, 0, 1000, calls.append
    )
    assert transfer.result is None and calls == [] and len(threads.queued) == 1
    threads.run()
    assert calls == [transfer] and transfer.result == OK
    assert receive(client, len(HEAD % 1000) + 1000) == HEAD % 1000 + body[:1000]
    assert len(kernel.pipes or ()) == (1 if mode == "splice" else 0)


def test_a_stopped_worker_ends_client_aborted_and_its_pipe_is_not_reused(
    pair: tuple[socket.socket, socket.socket], body_file: tuple[int, bytes]
) -> None:
    """stop() before the worker runs makes it give up; a pipe that may hold bytes is closed."""
    server, _ = pair
    fd, _ = body_file
    threads = QueuedThreads()
    kernel = engine(threads, inline=0)
    calls: list[Any] = []
    transfer = kernel.start(
        kernel.reserve(200_000), transport_of(server), HEAD % 200_000, fd, 0, 200_000, calls.append
    )
    transfer.stop()
    transfer.stop()  # idempotent
    threads.run()
    assert calls == [transfer] and transfer.result == CLIENT_ABORTED
    assert len(kernel.pipes) == 0


def test_a_file_shorter_than_announced_ends_incomplete(
    pair: tuple[socket.socket, socket.socket], body_file: tuple[int, bytes]
) -> None:
    """Reading past the end of the file ends the response short, as ``incomplete``."""
    server, _ = pair
    fd, body = body_file
    kernel = engine(QueuedThreads())
    transfer = kernel.start(
        kernel.reserve(len(body)),
        transport_of(server),
        HEAD % 1000,
        fd,
        len(body) - 10,
        1000,
        print,
    )
    assert (transfer.result, transfer.sent) == (INCOMPLETE, 10)


def test_a_file_small_enough_for_sendfile_reserves_no_pipe(
    pair: tuple[socket.socket, socket.socket], body_file: tuple[int, bytes]
) -> None:
    """In splice mode a file of at most 64 KiB needs no pipe: its body goes out with sendfile."""
    server, client = pair
    fd, body = body_file
    kernel = engine(QueuedThreads())
    reservation = kernel.reserve(SENDFILE_MAX_BYTES)
    assert reservation is None
    transfer = kernel.start(reservation, transport_of(server), HEAD % 4096, fd, 0, 4096, print)
    assert (transfer.result, transfer.sent) == (OK, 4096)
    assert receive(client, len(HEAD % 4096) + 4096) == HEAD % 4096 + body[:4096]
    assert len(kernel.pipes) == 0
    assert kernel.reserve(SENDFILE_MAX_BYTES + 1) is not None


def test_a_reservation_nobody_used_goes_back_to_the_pool() -> None:
    """A pipe reserved for a request that fell back is kept for the next one."""
    kernel = engine(QueuedThreads())
    pipe = kernel.reserve(200_000)
    kernel.release(pipe)
    assert kernel.reserve(200_000) == pipe
    kernel.release(pipe)
    kernel.close()
    assert len(kernel.pipes) == 0


def test_the_fake_records_what_the_kernel_would_send(body_file: tuple[int, bytes]) -> None:
    """The fake writes head and file range to the transport; held transfers wait."""
    fd, body = body_file
    fake = FakeTransferEngine(hold=True)
    transport = StringTransport()
    calls: list[Any] = []
    transfer = fake.start(fake.reserve(len(body)), transport, b"HEAD|", fd, 5, 20, calls.append)
    assert transfer.result is None and fake.held == [transfer] and fake.reserved == 0
    transfer.send_head()
    assert transport.value() == b"HEAD|" and transfer.head_sent
    transfer.complete()
    assert transport.value() == b"HEAD|" + body[5:25]
    assert calls == [transfer] and transfer.result == OK and fake.held == []

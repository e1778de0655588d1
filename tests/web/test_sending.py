"""send_now: bytes go straight into an idle socket, everything else the way Twisted writes.

A real ``tcp.Connection`` around one end of a real socket pair (its reactor a
``MemoryReactor``, so a queued write waits until the test calls ``doWrite``):
what the peer reads, in which order, and what stays queued are all real.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from twisted.internet import main, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from kura.web.sending import direct_socket, send_now


class Pair:
    """A connected transport (``local``) and the peer's socket (``remote``)."""

    def __init__(self) -> None:
        ours, self.remote = socket.socketpair()
        ours.setblocking(False)
        self.remote.settimeout(5)
        self.reactor = MemoryReactor()
        self.local = tcp.Connection(ours, Protocol(), self.reactor)
        self.local.connected = 1

    def received(self, size: int) -> bytes:
        """Exactly ``size`` bytes from the peer's side."""
        data = b""
        while len(data) < size:
            chunk = self.remote.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def nothing_to_read(self) -> bool:
        self.remote.setblocking(False)
        try:
            return self.remote.recv(1) == b""  # closed
        except BlockingIOError:
            return True
        finally:
            self.remote.settimeout(5)

    def fill(self) -> int:
        """Fill the socket's buffers until the kernel takes nothing more."""
        filled = 0
        block = b"f" * 65536
        while True:
            try:
                filled += self.local.socket.send(block)
            except BlockingIOError:
                return filled

    @property
    def queued(self) -> bytes:
        local = self.local
        return bytes(local.dataBuffer[local.offset :]) + b"".join(local._tempDataBuffer)


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.local.socket.close()
    made.remote.close()


def test_an_idle_connection_gets_the_bytes_without_a_reactor_turn(pair: Pair) -> None:
    """Nothing queued: the socket takes the bytes now and no write interest is registered."""
    assert send_now(pair.local, b"HTTP/1.1 200 OK\r\n\r\nbody") == 23
    assert pair.received(23) == b"HTTP/1.1 200 OK\r\n\r\nbody"
    assert pair.queued == b""
    assert pair.reactor.writers == set()


def test_bytes_never_overtake_what_is_queued(pair: Pair) -> None:
    """With a write pending, the new bytes queue behind it and leave in order."""
    pair.local.write(b"first ")
    assert send_now(pair.local, b"second") == 0
    assert pair.nothing_to_read()
    assert pair.queued == b"first second"
    pair.local.doWrite()
    assert pair.received(12) == b"first second"


def test_a_short_send_queues_the_rest_in_order(pair: Pair) -> None:
    """The socket takes part of a large write: the rest is queued and follows it exactly."""
    data = bytes(range(256)) * 40_000  # far more than a socket pair buffers
    sent = send_now(pair.local, data)
    assert 0 < sent < len(data)
    assert pair.queued == data[sent:]
    assert pair.local in pair.reactor.writers
    received = b""
    while len(received) < len(data):
        received += pair.remote.recv(1 << 20)
        pair.local.doWrite()
    assert received == data


def test_a_full_socket_queues_everything(pair: Pair) -> None:
    """EAGAIN on the first send: nothing is lost, all of it waits for writability."""
    filled = pair.fill()
    assert send_now(pair.local, b"late") == 0
    assert pair.queued == b"late"
    assert pair.received(filled) == b"f" * filled
    pair.local.doWrite()
    assert pair.received(4) == b"late"


def test_a_dead_peer_leaves_the_error_to_twisteds_write_path(pair: Pair) -> None:
    """A reset or closed peer: the bytes are queued and Twisted's next write reports the loss."""
    pair.remote.close()
    assert send_now(pair.local, b"x" * 100_000) == 0
    assert pair.queued == b"x" * 100_000
    assert pair.local.doWrite() is main.CONNECTION_LOST


@pytest.mark.parametrize(
    "state",
    ["tls", "disconnecting", "half-closed", "not connected", "pull producer", "paused"],
)
def test_connections_in_other_states_are_written_the_twisted_way(pair: Pair, state: str) -> None:
    """TLS, a closing or half-closed connection, a pull producer: queued, never sent directly."""
    local = pair.local
    encrypted: list[bytes] = []
    if state == "tls":
        # The TLS layer (started on this connection) encrypts what is written.
        local.TLS = True
        local.protocol = SimpleNamespace(write=encrypted.append)
    elif state == "disconnecting":
        local.disconnecting = True
    elif state == "half-closed":
        local._writeDisconnected = True
    elif state == "not connected":
        local.connected = 0
    elif state == "pull producer":
        local.producer = object()
        local.streamingProducer = False
    else:
        local.write(b"queued ")
    assert direct_socket(local) is None
    assert send_now(local, b"data") == 0
    assert pair.nothing_to_read()
    assert encrypted == ([b"data"] if state == "tls" else [])


def test_a_streaming_producer_does_not_stop_a_direct_send(pair: Pair) -> None:
    """A registered push producer is only paused by a full buffer, which a direct send avoids."""
    pair.local.producer = object()
    pair.local.streamingProducer = True
    assert send_now(pair.local, b"data") == 4
    assert pair.received(4) == b"data"


def test_transports_that_are_not_tcp_connections_just_get_written() -> None:
    """Anything else (TLS protocols, test transports) gets ``transport.write``."""
    transport = StringTransport()
    assert direct_socket(transport) is None
    assert send_now(transport, b"data") == 0
    assert transport.value() == b"data"

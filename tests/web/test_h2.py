"""HTTP/2 limits, driven deterministically: kura's connection against an h2 client.

Each test runs a complete in-memory node (Klein app, real files, storage
inline) and talks HTTP/2 to a :class:`~kura.web.h2.KuraH2Connection` over a
``StringTransport`` that pushes back like a socket, with the ``h2`` library
as the client and the node's ``MemoryReactorClock`` as the only clock.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, globalLogPublisher

from kura.service import KuraNode
from kura.storage.staging import HIGH_WATER as STAGING_HIGH_WATER
from kura.testing import ControlledRunner, request, sample
from kura.web.download import H2_CHUNK_BYTES
from kura.web.h2 import (
    GOAWAY_GRACE_SECONDS,
    MAX_CONCURRENT_STREAMS,
    RAPID_RESET,
    RESET_BURST,
    RESET_RATE,
    STREAM_HIGH_WATER,
    KuraH2Connection,
    ResetBudget,
    build_h2_connection,
)
from tests.support.h2client import H2Requests

CAS = "/api/cache/cas/{}?tenant_id=default"
MiB = 1024 * 1024
#: What one stream may hold: the high-water mark plus the chunk that crossed it.
STREAM_BOUND = STREAM_HIGH_WATER + H2_CHUNK_BYTES
HUGE_WINDOW = 2**31 - 1
PEER = IPv4Address("TCP", "127.0.0.1", 50000)


class SocketTransport(StringTransport):
    """A ``StringTransport`` that pushes back like a socket.

    Its producer (the HTTP/2 connection) is paused once more than ``limit``
    bytes wait to be read, and resumed when the client reads them all.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(peerAddress=PEER)
        self.limit = limit
        self.blocked = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.blocked and self.producer is not None and len(self.value()) > self.limit:
            self.blocked = True
            self.producer.pauseProducing()

    def block(self) -> None:
        """The socket stops accepting bytes (a client that does not read)."""
        if not self.blocked:
            self.blocked = True
            self.producer.pauseProducing()

    def take(self) -> bytes:
        """The client reads everything written so far; the socket accepts more."""
        data = self.value()
        self.clear()
        if self.blocked and not self.disconnecting:
            self.blocked = False
            self.producer.resumeProducing()
        return data

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        """As a TCP transport (the same-port listener sets it)."""


class Client(H2Requests):
    """The client end of one HTTP/2 connection, written with the h2 library.

    Args:
        window: the flow-control window the client advertises, for every
            stream and for the connection.
        acknowledge: return the window for every DATA byte read (a client
            that keeps reading); otherwise the window is only ever spent.
    """

    def __init__(self, *, window: int = 65_535, acknowledge: bool = True) -> None:
        super().__init__(window)
        self.acknowledge = acknowledge
        #: Streams whose window the client never returns (the connection's it does).
        self.starved: set[int] = set()
        self.statuses: dict[int, int] = {}
        self.bodies: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.settings: dict[int, int] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None

    def data(self, stream_id: int, body: bytes, *, end: bool = True) -> None:
        """Send ``body`` on ``stream_id`` in frames of the largest allowed size."""
        size = self.h2.max_outbound_frame_size
        pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        for index, piece in enumerate(pieces):
            self.h2.send_data(stream_id, piece, end_stream=end and index == len(pieces) - 1)

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    def pending(self) -> bytes:
        return self.h2.data_to_send()

    def receive(self, data: bytes) -> None:
        if self.terminated is not None:
            return  # h2 accepts nothing after a GOAWAY
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.statuses[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                if event.stream_id in self.starved:
                    self.h2.increment_flow_control_window(event.flow_controlled_length)
                elif self.acknowledge:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                for code, change in event.changed_settings.items():
                    self.settings[int(code)] = change.new_value
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event


class Session:
    """A client and a server connection joined by a ``SocketTransport``.

    Args:
        node: the in-memory node whose site the connection serves.
        connection: the server end, not yet connected.
        client: the client end.
        socket_buffer: bytes the "socket" holds before pushing back.
    """

    def __init__(
        self,
        node: KuraNode,
        connection: KuraH2Connection,
        client: Client,
        socket_buffer: int = 64 * 1024,
    ) -> None:
        self.node = node
        self.clock: MemoryReactorClock = node.reactor
        self.connection = connection
        self.client = client
        self.transport = SocketTransport(socket_buffer)
        connection.makeConnection(self.transport)
        self.transport.registerProducer(connection, True)
        self.send()

    def send(self) -> None:
        """Deliver what the client wrote, then run what is due."""
        data = self.client.pending()
        if data and not self.transport.disconnecting:
            self.connection.dataReceived(data)
        self.clock.advance(0)

    def read(self) -> None:
        """The client reads all the server wrote (the socket accepts more again)."""
        self.client.receive(self.transport.take())
        self.send()

    def exchange_until(self, done: Any, rounds: int = 20_000) -> None:
        """Read and answer in rounds until ``done()``; fails after ``rounds``."""
        for _ in range(rounds):
            if done():
                return
            self.read()
        raise AssertionError("the exchange never finished")


@pytest.fixture
def node(nodes: Any) -> KuraNode:
    """An in-memory node holding a 4 MiB artifact ``big`` and a 300 KiB one ``small``."""
    node: KuraNode = nodes.start()
    for key, size in (("big", 4 * MiB), ("small", 300 * 1024)):
        assert request(node, "POST", CAS.format(key), os.urandom(size)).status == 204
    return node


def body_of(node: KuraNode, key: str) -> bytes:
    return request(node, "GET", CAS.format(key)).body


def session(node: KuraNode, client: Client, socket_buffer: int = 64 * 1024) -> Session:
    connection = build_h2_connection(node.site, reactor=node.reactor, metrics=node.metrics)
    return Session(node, connection, client, socket_buffer)


# -- bounded buffers ------------------------------------------------------------------


def test_huge_window_and_a_blocked_socket_queue_a_bounded_amount_per_stream(
    node: KuraNode,
) -> None:
    """A client with a 2**31-1 window that never reads gets at most the stream bound queued."""
    s = session(node, Client(window=HUGE_WINDOW, acknowledge=False))
    s.read()  # the settings exchange
    s.transport.block()
    streams = [s.client.get(CAS.format("big")) for _ in range(3)]
    s.send()
    for _ in range(5):
        s.clock.advance(1)  # well inside the send timeout
    queued = [s.connection.queued(stream_id) for stream_id in streams]
    # Stock Twisted queued all 3 x 4 MiB here; each producer is paused instead.
    assert all(STREAM_HIGH_WATER <= q <= STREAM_BOUND for q in queued), queued
    assert len(s.transport.value()) < 1 * MiB


def test_a_paused_stream_resumes_when_drained_and_delivers_its_body(node: KuraNode) -> None:
    """Once the socket drains, paused streams resume below low water and finish byte-exact."""
    s = session(node, Client(window=HUGE_WINDOW, acknowledge=False))
    s.read()
    s.transport.block()
    streams = [s.client.get(CAS.format("big")) for _ in range(2)]
    s.send()
    assert all(s.connection.queued(stream_id) > 0 for stream_id in streams)
    most = 0

    def done() -> bool:
        nonlocal most
        most = max(most, *(s.connection.queued(stream_id) for stream_id in streams))
        return s.client.ended >= set(streams)

    s.exchange_until(done)
    big = body_of(node, "big")
    assert all(s.client.bodies[stream_id] == big for stream_id in streams)
    assert all(s.client.statuses[stream_id] == 200 for stream_id in streams)
    assert most <= STREAM_BOUND


def test_a_small_window_still_delivers_byte_exact(node: KuraNode) -> None:
    """With the default 64 KiB window, flow control paces the stream and the body arrives whole."""
    s = session(node, Client())
    stream_id = s.client.get(CAS.format("big"))
    s.send()
    most = 0

    def done() -> bool:
        nonlocal most
        most = max(most, s.connection.queued(stream_id))
        return stream_id in s.client.ended

    s.exchange_until(done)
    assert s.client.bodies[stream_id] == body_of(node, "big")
    assert most <= STREAM_BOUND


def test_a_reset_stream_stops_its_producer_at_once(node: KuraNode) -> None:
    """A stream reset while its producer is paused closes the file now, not at the send timeout."""
    s = session(node, Client(window=HUGE_WINDOW, acknowledge=False))
    s.read()
    s.transport.block()
    stream_id = s.client.get(CAS.format("big"))
    s.send()
    assert s.connection.queued(stream_id) > 0
    s.client.reset(stream_id)
    s.send()
    aborted = sample(
        node, "kura_artifact_egress_completions_total", producer="xcode", result="client_aborted"
    )
    assert aborted == 1
    assert s.connection.queued(stream_id) == 0


def test_a_stream_stalled_past_the_send_timeout_is_reset_alone(nodes: Any) -> None:
    """A stream whose window never reopens is reset at the send timeout; its neighbours go on."""
    node = nodes.start(KURA_SEND_TIMEOUT_MS="2000")
    assert request(node, "POST", CAS.format("big"), os.urandom(4 * MiB)).status == 204
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        s = session(node, Client())
        stalled = s.client.get(CAS.format("big"))
        s.client.starved.add(stalled)
        s.send()
        s.exchange_until(lambda: len(s.client.bodies[stalled]) == 65_535)
        s.clock.advance(2)
        s.read()
        assert stalled in s.client.resets
        timeouts = sample(
            node, "kura_artifact_egress_completions_total", producer="xcode", result="write_timeout"
        )
        assert timeouts == 1
        after = s.client.get(CAS.format("big"))
        s.send()
        s.exchange_until(lambda: after in s.client.ended)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert s.client.bodies[after] == body_of(node, "big")
    assert not [e for e in logged if e.get("log_failure") or e.get("isError")]


# -- the stream limit -----------------------------------------------------------------


def test_the_stream_limit_is_advertised_and_the_stream_over_it_refused(node: KuraNode) -> None:
    """MAX_CONCURRENT_STREAMS is in the first SETTINGS; stream 101 is refused, the others served."""
    s = session(node, Client())
    # Before reading the server's SETTINGS a client may open any number of
    # streams (RFC 9113 §6.5.2: unlimited until told otherwise).
    streams = [s.client.get(CAS.format("missing")) for _ in range(MAX_CONCURRENT_STREAMS + 1)]
    s.send()
    s.exchange_until(lambda: s.client.ended | set(s.client.resets) >= set(streams))
    limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    assert s.client.settings[limit] == MAX_CONCURRENT_STREAMS
    assert s.client.resets == {streams[-1]: h2.errors.ErrorCodes.REFUSED_STREAM}
    assert {s.client.statuses[i] for i in streams[:-1]} == {404}
    assert s.client.terminated is None
    assert sample(node, "kura_http2_refused_streams_total") == 1
    # The connection goes on: a new stream is served.
    again = s.client.get(CAS.format("small"))
    s.send()
    s.exchange_until(lambda: again in s.client.ended)
    assert s.client.bodies[again] == body_of(node, "small")


# -- rapid reset ----------------------------------------------------------------------


def _open_and_reset(s: Session, count: int, key: str = "big") -> None:
    for _ in range(count):
        s.client.reset(s.client.get(CAS.format(key)))
        s.send()


def test_a_burst_of_resets_closes_the_connection_once_counted_and_logged(
    node: KuraNode,
) -> None:
    """One reset past the burst: GOAWAY ENHANCE_YOUR_CALM, close, one metric, one log line."""
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        s = session(node, Client(window=HUGE_WINDOW))
        s.read()
        _open_and_reset(s, RESET_BURST)
        assert not s.transport.disconnecting
        _open_and_reset(s, 5)
        s.read()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert s.transport.disconnecting
    assert s.client.terminated is not None
    assert s.client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    closed = sample(node, "kura_http2_connections_closed_total", reason="rapid_reset")
    assert closed == 1
    assert [e for e in logged if e.get("log_format") == RAPID_RESET] != []
    assert len([e for e in logged if e.get("log_format") == RAPID_RESET]) == 1
    # A client that does not let go is aborted after the grace period.
    assert not s.transport.aborted
    s.clock.advance(GOAWAY_GRACE_SECONDS)
    assert s.transport.aborted


def test_cancelling_requests_at_a_normal_pace_keeps_the_connection(node: KuraNode) -> None:
    """A full burst of cancels, then the sustained rate for five seconds, stays connected."""
    s = session(node, Client(window=HUGE_WINDOW))
    s.read()
    _open_and_reset(s, RESET_BURST)
    for _ in range(5):
        s.clock.advance(1)
        _open_and_reset(s, int(RESET_RATE))
    s.read()
    assert not s.transport.disconnecting
    assert s.client.terminated is None
    assert sample(node, "kura_http2_connections_closed_total", reason="rapid_reset") == 0
    stream_id = s.client.get(CAS.format("small"))
    s.send()
    s.exchange_until(lambda: stream_id in s.client.ended)
    assert s.client.statuses[stream_id] == 200


def test_a_request_reset_in_the_same_read_is_never_started(node: KuraNode) -> None:
    """A stream opened and reset in one read reaches no handler; the connection goes on."""
    s = session(node, Client(window=HUGE_WINDOW))
    s.read()
    s.client.reset(s.client.get(CAS.format("big")))
    s.send()
    assert sample(node, "kura_artifact_serving_paths_total", path="fallback") == 0
    stream_id = s.client.get(CAS.format("small"))
    s.send()
    s.exchange_until(lambda: stream_id in s.client.ended)
    assert sample(node, "kura_artifact_serving_paths_total", path="fallback") == 1
    assert s.client.bodies[stream_id] == body_of(node, "small")


def test_data_of_an_upload_reset_in_the_same_read_returns_the_connection_window(
    node: KuraNode,
) -> None:
    """DATA dropped with its reset stream is still acknowledged: later uploads are not starved."""
    s = session(node, Client())
    s.read()
    first = s.client.post_head(CAS.format("abandoned"), 100_000)
    s.send()
    s.client.data(first, os.urandom(60_000), end=False)
    s.client.reset(first)
    s.send()
    s.read()  # the server's WINDOW_UPDATE
    # Without the window back, 5,535 bytes are left; h2 returns it in halves.
    body = os.urandom(30_000)
    second = s.client.post_head(CAS.format("kept"), len(body))
    s.client.data(second, body)
    s.send()
    s.exchange_until(lambda: second in s.client.ended)
    assert s.client.statuses[second] == 204
    assert body_of(node, "kept") == body


def test_an_upload_faster_than_the_disk_stops_the_clients_window(nodes: Any) -> None:
    """While staging writes wait on the disk, the stream stops returning its window.

    Only the stream is paused (as an HTTP/1.1 upload pauses its socket): the
    client cannot send more than the staging high-water mark plus one window,
    and the rest follows once the disk catches up.
    """
    runner = ControlledRunner()
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "_Writer.append"
    node: KuraNode = nodes.start(runner=runner)
    s = session(node, Client())
    s.read()
    body = os.urandom(8 * MiB)
    stream_id = s.client.post_head(CAS.format("upload"), len(body))
    sent = 0

    def send_what_the_window_allows() -> None:
        nonlocal sent
        while sent < len(body):
            room = min(
                s.client.h2.local_flow_control_window(stream_id),
                s.client.h2.max_outbound_frame_size,
                len(body) - sent,
            )
            if room <= 0:
                return
            s.client.h2.send_data(stream_id, body[sent : sent + room], end_stream=False)
            sent += room
            s.send()
            s.read()

    send_what_the_window_allows()
    assert STAGING_HIGH_WATER < sent < STAGING_HIGH_WATER + MiB  # held back, not buffered
    while runner.held:
        runner.release()
        s.read()
        send_what_the_window_allows()
    s.client.h2.end_stream(stream_id)
    s.send()
    s.exchange_until(lambda: stream_id in s.client.ended)
    assert s.client.statuses[stream_id] == 204
    assert body_of(node, "upload") == body


def test_an_upload_whose_admission_waits_is_staged_whole(nodes: Any) -> None:
    """Body frames that arrive while the head is being admitted are kept, in order, and staged."""
    runner = ControlledRunner()
    node: KuraNode = nodes.start(runner=runner)
    runner.hold = lambda f: True  # the existence lookup (and everything after) waits
    s = session(node, Client())
    s.read()
    body = os.urandom(50_000)
    stream_id = s.client.post_head(CAS.format("waited"), len(body))
    s.client.data(stream_id, body)
    s.send()
    assert runner.held  # admission is still waiting on the store
    while runner.held or stream_id not in s.client.ended:
        if runner.held:
            runner.release()
        s.read()
    assert s.client.statuses[stream_id] == 204
    runner.hold = lambda f: False
    assert body_of(node, "waited") == body


def test_reset_budget_refills_at_its_rate_and_ignores_a_clock_step_back() -> None:
    """The bucket allows a burst, refills at its rate, and a backwards clock drains nothing."""
    budget = ResetBudget(burst=3, rate=2.0, now=100.0)
    assert [budget.spend(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.spend(100.5)  # one token back after half a second
    assert not budget.spend(100.5)
    assert not budget.spend(50.0)  # the wall clock stepped back: nothing refilled
    assert [budget.spend(52.0) for _ in range(4)] == [True, True, True, False]


# -- both entry points ----------------------------------------------------------------


class TLSTransport(SocketTransport):
    """A transport on which ALPN picked ``h2``."""

    negotiatedProtocol = b"h2"


@pytest.mark.parametrize("entry", ["h2c", "alpn"])
def test_both_entry_points_serve_http2_through_kura_connection(node: KuraNode, entry: str) -> None:
    """h2c prior knowledge on the plain port and ALPN h2 on HTTPS both get kura's limits."""
    client = Client(window=HUGE_WINDOW)
    if entry == "h2c":
        protocol: Any = node.public_factory().buildProtocol(PEER)
        transport: SocketTransport = SocketTransport(64 * 1024)
    else:
        protocol = node.site.buildProtocol(PEER)
        transport = TLSTransport(64 * 1024)
    protocol.makeConnection(transport)

    def exchange() -> None:
        protocol.dataReceived(client.pending())
        node.reactor.advance(0)
        client.receive(transport.take())

    stream_id = client.get(CAS.format("small"))
    exchange()
    for _ in range(100):
        if stream_id in client.ended:
            break
        exchange()
    assert client.bodies[stream_id] == body_of(node, "small")
    for _ in range(RESET_BURST + 1):
        client.reset(client.get(CAS.format("small")))
    exchange()
    assert client.terminated is not None
    assert sample(node, "kura_http2_connections_closed_total", reason="rapid_reset") == 1


# -- the private names this relies on -------------------------------------------------

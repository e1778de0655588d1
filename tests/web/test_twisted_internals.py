"""The private Twisted (and h2) names kura relies on, pinned in one place.

Twisted gives no public hook for several things kura must do: admit a request
between its head and its body, drop a body mid-stream, bound HTTP/2's send
queues, quiet the client pool, dispatch epoll events without a log context.
Each use lives in ``kura/web/``; this test fails loudly on a Twisted (or h2)
upgrade that renames one, instead of the serving paths failing in production.
"""

from __future__ import annotations

import inspect

import h2.connection
import hyperframe.frame
from prometheus_client import CollectorRegistry
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import _http2 as twisted_h2
from twisted.web import client, http

from kura.telemetry.metrics import KuraMetrics
from kura.web import h2 as kura_h2
from kura.web.h2 import KuraH2Connection


def test_the_private_twisted_names_kura_uses_still_exist() -> None:
    """kura/web (http, client_pool, h2) uses these; an upgrade that drops one fails here."""
    # kura/web/request.py: the request and channel between head and body.
    assert http._QUEUED_SENTINEL is not None
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: k\r\nContent-Length: 3\r\n\r\n")
    assert (channel._command, channel._path, channel._version) == (b"PUT", b"/x", b"HTTP/1.1")
    assert channel._handlingRequest is False
    assert channel._transferDecoder is not None
    assert callable(channel._respondToBadRequestAndDisconnect)
    # kura/web/request.py (KuraRequest.over) and download.py: a request whose client left.
    assert http.Request(channel)._disconnected is False
    assert "line_mode" in vars(http.HTTPChannel) or hasattr(channel, "line_mode")
    # kura/web/event_dispatch.py: the epoll reactor's poll loop and per-event handler.
    assert EPollReactor.doIteration is EPollReactor.doPoll
    assert "callWithLogger" in inspect.getsource(EPollReactor.doPoll)  # what it leaves out
    assert list(inspect.signature(EPollReactor._doReadOrWrite).parameters) == [
        "self",
        "selectable",
        "fd",
        "event",
    ]
    epoll = EPollReactor()
    assert isinstance(epoll._selectables, dict) and hasattr(epoll._poller, "poll")
    epoll._poller.close()
    epoll.waker.connectionLost(None)
    # kura/web/client_pool.py: the pool's connection factory.
    pool = client.HTTPConnectionPool(MemoryReactorClock(), persistent=True)
    assert pool._factory is client._HTTP11ClientFactory
    # kura/web/h2.py: the HTTP/2 connection and stream internals.
    assert twisted_h2._END_STREAM_SENTINEL is not None
    for name in (
        "_requestReceived",
        "_requestDone",
        "_sendPrioritisedData",
        "writeDataToStream",
        "endRequest",
        "remainingOutboundWindow",
        "_handleWindowUpdate",
        "_resetTokenBurst",
    ):
        assert hasattr(twisted_h2.H2Connection, name), name
    assert "_cancelTimeouts" in inspect.signature(twisted_h2.H2Connection.connectionLost).parameters
    connection = KuraH2Connection(MemoryReactorClock(), metrics=KuraMetrics(CollectorRegistry()))
    assert isinstance(connection._outboundStreamQueues, dict)
    assert connection._sendingDeferred is None
    assert hasattr(connection.priority, "block")
    for name in ("windowUpdated", "flowControlBlocked", "registerProducer"):
        assert hasattr(twisted_h2.H2Stream, name), name
    # Instance attributes, set where Twisted registers a producer.
    registering = inspect.getsource(twisted_h2.H2Stream.registerProducer)
    assert "self.producer = producer" in registering
    assert "self._producerProducing = True" in registering
    # The ALPN switch.
    generic = http._GenericHTTPChannelProtocol(http.HTTPChannel())
    assert generic._negotiatedProtocol is None
    assert isinstance(generic._channel, http.HTTPChannel)
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    assert channel._networkProducer is not None
    assert http.H2_ENABLED
    # h2: the state machine kura subclasses.
    for name in ("_receive_headers_frame", "_begin_new_stream", "DEFAULT_MAX_HEADER_LIST_SIZE"):
        assert hasattr(h2.connection.H2Connection, name), name
    assert h2.connection.AllowedStreamIDs.ODD
    protocol = connection.conn
    dispatch = protocol._frame_dispatch_table[hyperframe.frame.HeadersFrame]
    assert dispatch.__func__ is kura_h2._H2Protocol._receive_headers_frame


def test_a_tcp_connection_reads_up_to_its_buffer_size() -> None:
    """kura/web/ingest.py raises a staged body's ``transport.bufferSize``; the TCP
    transport reads ``recv(self.bufferSize)`` per turn (a real socket pair)."""
    import socket

    from twisted.internet import tcp

    assert tcp.Connection.bufferSize == 65536
    assert "self.bufferSize" in inspect.getsource(tcp.Connection._dataReceived) + inspect.getsource(
        tcp.Connection.doRead
    )
    ours, theirs = socket.socketpair()
    try:
        theirs.setblocking(False)
        sent = theirs.send(b"x" * 300_000)  # what the socket buffers take at once
        assert sent > 65536
        received: list[bytes] = []

        class Protocol:
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        connection = tcp.Connection(ours, Protocol())  # type: ignore[arg-type]
        connection.bufferSize = 1024 * 1024
        connection.doRead()
        assert len(received) == 1 and 65536 < len(received[0]) <= sent
    finally:
        ours.close()
        theirs.close()


def test_a_tcp_connection_queues_writes_in_the_fields_send_now_reads() -> None:
    """kura/web/sending.py sends directly only when these private fields say the
    transport is idle: ``dataBuffer``/``offset`` (being written) and
    ``_tempDataBuffer``/``_tempDataLen`` (queued), ``_writeDisconnected``, and
    the producer fields a pull producer's ``resumeProducing`` depends on."""
    import socket

    from twisted.internet import abstract, tcp
    from twisted.internet.testing import MemoryReactor

    for name, value in (
        ("TLS", False),
        ("_writeDisconnected", False),
        ("disconnecting", 0),
        ("dataBuffer", b""),
        ("offset", 0),
        ("producer", None),
        ("streamingProducer", False),
    ):
        assert getattr(tcp.Connection, name) == value, name
    # A pull producer is asked for more only when doWrite drained the buffer.
    drained = inspect.getsource(abstract.FileDescriptor.doWrite)
    assert "(not self.streamingProducer) or self.producerPaused" in drained
    ours, theirs = socket.socketpair()
    try:
        connection = tcp.Connection(ours, object(), MemoryReactor())  # type: ignore[arg-type]
        connection.connected = 1
        connection.write(b"abc")
        connection.writeSequence([b"de"])
        assert connection._tempDataBuffer == [b"abc", b"de"]
        assert connection._tempDataLen == 5
        assert connection.socket is ours
    finally:
        ours.close()
        theirs.close()


def test_a_request_reaches_its_channel_only_through_write_headers_and_write() -> None:
    """kura/web/channel.py holds the head back in ``writeHeaders`` and sends it with
    the first ``write``/``writeSequence``: twisted.web's ``Request.write`` must
    keep calling exactly those, head first, with a ``Headers`` object."""
    calls: list[tuple[str, object]] = []

    class Channel(http.HTTPChannel):
        def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: object) -> None:
            calls.append(("head", type(headers)))

        def write(self, data: bytes) -> None:
            calls.append(("write", data))

        def writeSequence(self, iovec: object) -> None:
            calls.append(("sequence", b"".join(iovec)))  # type: ignore[arg-type]

    channel = Channel()
    channel.makeConnection(StringTransport())
    request = http.Request(channel)
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.setHeader(b"Content-Length", b"4")
    request.write(b"body")
    assert calls == [("head", http.Headers), ("write", b"body")]

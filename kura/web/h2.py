"""HTTP/2 that one client cannot use to exhaust the node's memory or CPU.

Both HTTP/2 entry points serve through :class:`KuraH2Connection`, a subclass
of Twisted's ``H2Connection``: an h2c prior-knowledge preface on the plain
port (:mod:`kura.accel.protocol`, via :func:`build_h2_connection`) and ALPN
``h2`` on the public HTTPS listener (:class:`NegotiatingChannel`, built by
``KuraSite.buildProtocol``).

What stock Twisted lets one client do, and what kura does instead:

* **Memory.** Twisted pauses a stream's body producer only when the *peer's*
  flow-control window is spent. A client that advertises a 2**31-1 window
  and never reads has every chunk of every response queued in memory while
  the socket is blocked (10 streams of a 120 MB artifact took a node from
  63 MiB to 1.2 GiB). kura also pauses a stream's producer once
  :data:`STREAM_HIGH_WATER` bytes are queued for it, and resumes it when the
  send loop has drained the queue below :data:`STREAM_LOW_WATER` (and the
  window allows). File bodies are written in ``H2_CHUNK_BYTES`` chunks
  (:mod:`kura.web.download`), so a stream holds at most
  ``STREAM_HIGH_WATER + H2_CHUNK_BYTES`` (384 KiB) whatever the artifact
  size or the window, and a connection at most
  :data:`MAX_CONCURRENT_STREAMS` times that.
* **Streams.** At most :data:`MAX_CONCURRENT_STREAMS` streams at once,
  advertised in the server's first SETTINGS frame. h2 answers a stream over
  the limit with a connection error, which would abort every response in
  flight; kura refuses just that stream (``RST_STREAM`` ``REFUSED_STREAM``,
  RFC 9113 §5.1.2, safe for the client to retry).
* **Rapid reset (CVE-2023-44487).** Stock Twisted processed the request of
  every reset stream and never stopped its body producer, which read the
  rest of the artifact for nobody (300 open-and-reset streams of a 120 MB
  artifact kept a core busy for seconds). kura stops the producer of a
  stream that ends early; a stream opened and reset within one read never
  reaches Twisted at all; and a connection whose client resets more than
  :data:`RESET_BURST` streams at once, or more than :data:`RESET_RATE` a
  second sustained, is closed: GOAWAY ``ENHANCE_YOUR_CALM``, close, abort
  after :data:`GOAWAY_GRACE_SECONDS`; counted in
  ``kura_http2_connections_closed_total{reason="rapid_reset"}`` and logged
  once per connection (:data:`RAPID_RESET`). Twisted's own reset budget
  (1,000 at once, 33 a second, closed silently) is switched off so that one
  rule decides.
* **A withheld window.** Twisted's send loop kept a stream whose window was
  spent, with data waiting, in its rotation: a client that read its first
  64 KiB and never sent a WINDOW_UPDATE kept a core at 100 %. kura takes
  the stream out until a WINDOW_UPDATE brings it back; a stream stalled
  past ``KURA_SEND_TIMEOUT_MS`` is reset (:mod:`kura.api.artifacts`).

These limits are constants, not ``KURA_*`` variables: they bound a protocol
detail, not a deployment choice.

This module is the only one that touches Twisted's and h2's private HTTP/2
internals; ``tests/web/test_h2.py::test_private_names_we_rely_on_exist``
fails loudly when an upgrade renames one of them. It needs the optional
``h2`` extra (``twisted[http2]``), so callers import it lazily.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection

from kura.telemetry.metrics import KuraMetrics

log = Logger(namespace="kura.h2")

#: Streams one connection may have open at once (advertised in SETTINGS).
#: h2's and nghttp2's default; upstream Kura allows 128.
MAX_CONCURRENT_STREAMS = 100
#: A stream's producer pauses once this many bytes are queued for it.
STREAM_HIGH_WATER = 256 * 1024
#: ... and resumes once the send loop has drained its queue below this.
STREAM_LOW_WATER = 128 * 1024
#: Stream resets a client may make at once: every stream it may have open,
#: so a client cancelling all of its requests (an interrupted build) is fine.
RESET_BURST = MAX_CONCURRENT_STREAMS
#: Stream resets a second, sustained, refilling the burst: cancelling a full
#: set of streams every two seconds is still fine; an open-and-reset loop
#: (thousands a second) is closed after a tenth of the streams that cost.
RESET_RATE = 50.0
#: How long a connection closed for resets may take to read its GOAWAY
#: before it is aborted (a client that does not read would keep it open).
GOAWAY_GRACE_SECONDS = 2.0

RAPID_RESET = (
    "HTTP/2 client {peer} reset streams faster than {burst} at once or {rate}/s; connection closed"
)


class ResetBudget:
    """A token bucket of stream resets: ``burst`` at once, refilled at ``rate`` a second.

    Args:
        burst: the bucket's size (it starts full).
        rate: tokens added per second.
        now: the clock's current time.
    """

    def __init__(self, *, burst: int, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._updated = now

    def spend(self, now: float) -> bool:
        """Take a token at time ``now``; ``False`` (nothing taken) when none is left."""
        # reactor.seconds() is wall-clock time: a step backwards must not
        # drain the bucket and close a well-behaved client.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class _StreamQueue(deque[Any]):
    """One stream's outbound DATA chunks (and Twisted's end marker), with their size.

    Twisted's send loop only appends, pops from the left and puts a split
    frame's tail back on the left, so those three methods keep
    :attr:`queued` exact; a pop also records the stream in ``popped`` for
    :meth:`KuraH2Connection._sendPrioritisedData` to look at.
    """

    def __init__(self, stream_id: int, popped: set[int]) -> None:
        super().__init__()
        self.queued = 0
        self._stream_id = stream_id
        self._popped = popped

    def append(self, item: Any) -> None:
        if item is not _END_STREAM_SENTINEL:
            self.queued += len(item)
        super().append(item)

    def appendleft(self, item: Any) -> None:
        if item is not _END_STREAM_SENTINEL:
            self.queued += len(item)
        super().appendleft(item)

    def popleft(self) -> Any:
        item = super().popleft()
        if item is not _END_STREAM_SENTINEL:
            self.queued -= len(item)
        self._popped.add(self._stream_id)
        return item


class _H2Protocol(h2.connection.H2Connection):
    """h2's server state machine with kura's stream limit, refusing streams over it.

    Args:
        max_streams: the SETTINGS_MAX_CONCURRENT_STREAMS to advertise and enforce.
        screen: sees every batch of events before Twisted dispatches them,
            and returns the ones to dispatch.
        refused: called once per refused stream.
    """

    def __init__(
        self,
        *,
        max_streams: int,
        screen: Callable[[list[h2.events.Event]], list[h2.events.Event]],
        refused: Callable[[], None],
    ) -> None:
        super().__init__(h2.config.H2Configuration(client_side=False, header_encoding=None))
        # Local settings given as initial values are in force at once and
        # sent in the first SETTINGS frame (initiate_connection, called by
        # Twisted's connectionMade). update_settings() would only take
        # effect once the client acknowledged it.
        self.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        self._screen = screen
        self._refused = refused

    def receive_data(self, data: Any) -> list[h2.events.Event]:
        return self._screen(super().receive_data(data))

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        stream_id: int = frame.stream_id
        if (
            stream_id in self.streams
            or self.open_inbound_streams < self.local_settings.max_concurrent_streams
        ):
            return super()._receive_headers_frame(frame)
        # One stream too many. RFC 9113 §5.1.2 makes that a stream error;
        # h2 raises a connection error, which would cut every response in
        # flight. So the stream is opened first (its header block must still
        # be decoded: HPACK state is the connection's), then refused, and
        # Twisted never hears of it.
        self._begin_new_stream(stream_id, h2.connection.AllowedStreamIDs.ODD)
        frames, events = super()._receive_headers_frame(frame)
        self.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self._refused()
        return frames, [e for e in events if getattr(e, "stream_id", None) != stream_id]


class KuraH2Connection(H2Connection):
    """Twisted's HTTP/2 connection with bounded stream buffers, a stream limit and a reset budget.

    See the module docstring for the rules. Build it with
    :func:`build_h2_connection`.

    Args:
        reactor: the clock for the send loop, the reset budget and the abort
            after GOAWAY.
        metrics: where refused streams and closed connections are counted.
    """

    # Twisted's own reset bucket would close a connection silently, and on
    # other terms; kura's (_screen) is the only one that decides.
    _resetTokenBurst = sys.maxsize

    def __init__(self, reactor: IReactorTime, *, metrics: KuraMetrics) -> None:
        super().__init__(reactor)
        self._clock = reactor
        self._metrics = metrics
        self._popped: set[int] = set()
        self._resets = ResetBudget(burst=RESET_BURST, rate=RESET_RATE, now=reactor.seconds())
        self._flooded = False
        self._goaway_sent = False
        self._abort_call: IDelayedCall | None = None
        # Replaces the state machine Twisted built, before connectionMade
        # sends its SETTINGS.
        self.conn = _H2Protocol(
            max_streams=MAX_CONCURRENT_STREAMS,
            screen=self._screen,
            refused=metrics.http2_refused_streams.inc,
        )

    # -- receiving ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._goaway_sent:
            return
        super().dataReceived(data)
        if self._flooded:
            self._close_for_resets()

    def _screen(self, events: list[h2.events.Event]) -> list[h2.events.Event]:
        """Spend the reset budget, and keep reset streams' earlier events from Twisted.

        h2 parses a whole read before Twisted dispatches its events, so a
        stream reset in this read is already closed in h2 when Twisted would
        start its request: the response's first DATA frame then raises in
        Twisted's send loop and kills it, and the work was for nobody
        anyway. So a stream reset in this read has its earlier events
        dropped (DATA still gives the connection's window back); a stream
        opened in this read too is never seen by Twisted at all. Each reset
        spends a token; where they run out the batch is cut, and the
        connection is closed once Twisted has handled what came before.
        """
        reset = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
        if not reset:
            return events
        now = self._clock.seconds()
        kept: list[h2.events.Event] = []
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            if stream_id not in reset:
                kept.append(event)
            elif isinstance(event, h2.events.StreamReset):
                if not self._resets.spend(now):
                    self._flooded = True
                    return kept
                if stream_id in self.streams:
                    kept.append(event)  # Twisted's stream: it cleans up
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        return kept

    def _close_for_resets(self) -> None:
        """GOAWAY (ENHANCE_YOUR_CALM), close, and abort if the client does not let go."""
        if self._goaway_sent:
            return
        self._goaway_sent = True
        transport: Any = self.transport
        self._metrics.http2_connections_closed.labels("rapid_reset").inc()
        log.warn(RAPID_RESET, peer=str(transport.getPeer()), burst=RESET_BURST, rate=RESET_RATE)
        # (A ProtocolError: the connection already ended, by a GOAWAY either way.)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        # Straight to the transport, ahead of control frames still buffered
        # behind a blocked socket: nothing else will be sent after it.
        transport.write(self.conn.data_to_send())
        transport.loseConnection()
        self._abort_call = self._clock.callLater(GOAWAY_GRACE_SECONDS, transport.abortConnection)
        # Tell every stream now (their producers stop); as Twisted's own
        # teardown, keep the timers until the transport reports the close.
        self.connectionLost(Failure(ConnectionLost("too many stream resets")), False)

    def connectionLost(
        self,
        reason: Failure = connectionDone,
        _cancelTimeouts: bool = True,  # noqa: N803 - Twisted's keyword
    ) -> None:
        if _cancelTimeouts and self._abort_call is not None:
            if self._abort_call.active():
                self._abort_call.cancel()
            self._abort_call = None
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)

    # -- stream lifecycle ------------------------------------------------------------

    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        super()._requestReceived(event)
        stream_id = event.stream_id
        queue = _StreamQueue(stream_id, self._popped)
        for item in self._outboundStreamQueues.get(stream_id, ()):
            queue.append(item)
        self._outboundStreamQueues[stream_id] = queue

    def _requestDone(self, streamID: int) -> None:  # noqa: N803 - Twisted's name
        stream = self.streams.get(streamID)
        producer = None if stream is None else stream.producer
        super()._requestDone(streamID)
        self._popped.discard(streamID)
        if producer is not None:
            # The stream ended (reset, or the connection lost) with its body
            # still being produced. Twisted tells the request but never the
            # producer, which would read the rest of the artifact for nobody.
            producer.stopProducing()

    def writeDataToStream(self, streamID: int, data: bytes) -> None:  # noqa: N803
        if streamID not in self._outboundStreamQueues:
            return  # reset while its response was being written: as on a lost connection
        super().writeDataToStream(streamID, data)

    def endRequest(self, streamID: int) -> None:  # noqa: N803
        if streamID not in self._outboundStreamQueues:
            return  # the stream was reset; its request finishes into nothing
        super().endRequest(streamID)

    # -- sending ---------------------------------------------------------------------

    def queued(self, stream_id: int) -> int:
        """Response bytes written for ``stream_id`` and not yet sent (0 once it is gone)."""
        queue = self._outboundStreamQueues.get(stream_id)
        return 0 if queue is None else int(queue.queued)

    def remainingOutboundWindow(self, streamID: int) -> int:  # noqa: N803
        """How much more ``streamID``'s producer may write before it must pause.

        Twisted pauses a stream's producer when this is ``<= 0`` (after each
        write and each frame sent) and resumes it on a WINDOW_UPDATE when it
        is ``> 0``. Twisted answers with the peer's flow-control window less
        the bytes queued; kura also caps it by the stream's buffer: a
        producing stream may queue up to :data:`STREAM_HIGH_WATER`, a paused
        one resumes only below :data:`STREAM_LOW_WATER`.
        """
        queue = self._outboundStreamQueues[streamID]
        queued: int = queue.queued
        window: int = self.conn.local_flow_control_window(streamID)
        stream = self.streams.get(streamID)
        producing = stream is not None and stream._producerProducing
        mark = STREAM_HIGH_WATER if producing else STREAM_LOW_WATER
        return min(window, mark) - queued

    def _sendPrioritisedData(self, *args: Any) -> None:
        """Send one frame (Twisted's loop), then settle the stream it came from.

        * A stream whose flow-control window is spent while data waits
          leaves the loop until a WINDOW_UPDATE puts it back: Twisted keeps
          it in, and the loop then spins (a ``callLater(0)`` every turn, a
          core at 100 %) for as long as the client withholds its window.
        * Otherwise, a stream paused at its high-water mark resumes once
          the loop has drained it (``windowUpdated`` checks the window and
          the mark); Twisted resumes producers only on a WINDOW_UPDATE.
        """
        super()._sendPrioritisedData(*args)
        if self._popped:
            popped = list(self._popped)
            self._popped.clear()
            for stream_id in popped:
                stream = self.streams.get(stream_id)
                if stream is None:
                    continue
                queue = self._outboundStreamQueues[stream_id]
                if queue.queued and self.conn.local_flow_control_window(stream_id) <= 0:
                    self.priority.block(stream_id)
                else:
                    stream.windowUpdated()

    def _handleWindowUpdate(self, event: h2.events.WindowUpdated) -> None:
        """Unblock what the update lets through, and wake the send loop for it.

        Twisted wakes a waiting send loop only when a stream writes, but a
        stream blocked on its window may have nothing new to write (its
        producer paused at the high-water mark).
        """
        super()._handleWindowUpdate(event)
        waiting = self._sendingDeferred
        if waiting is not None:
            self._sendingDeferred = None
            waiting.callback(event.stream_id)


def build_h2_connection(
    site: server.Site, *, reactor: IReactorTime, metrics: KuraMetrics
) -> KuraH2Connection:
    """A :class:`KuraH2Connection` serving ``site``'s requests, not yet connected."""
    connection = KuraH2Connection(reactor, metrics=metrics)
    wiring: Any = connection  # Twisted declares these as None, set by whoever builds it
    wiring.requestFactory = site.requestFactory
    wiring.site = site
    wiring.factory = site
    wiring.timeOut = site.timeOut
    wiring.callLater = reactor.callLater
    return connection


class NegotiatingChannel(http._GenericHTTPChannelProtocol):
    """The HTTPS listener's protocol: HTTP/1.1, or a :class:`KuraH2Connection` for ALPN ``h2``.

    Twisted's ``_GenericHTTPChannelProtocol`` switches to a stock
    ``H2Connection``; this makes the same switch to the connection
    ``make_h2`` builds.

    Args:
        channel: the HTTP/1.1 channel that serves unless ALPN picked ``h2``.
        make_h2: builds the HTTP/2 connection.
    """

    def __init__(self, channel: http.HTTPChannel, make_h2: Callable[[], KuraH2Connection]) -> None:
        super().__init__(channel)
        self._make_h2 = make_h2

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            transport = self._channel.transport
            if getattr(transport, "negotiatedProtocol", None) == b"h2":
                self._switch_to_h2(transport)
        super().dataReceived(data)

    def _switch_to_h2(self, transport: Any) -> None:
        # Twisted's steps: the HTTP/1.1 channel gives up the transport (as
        # its producer, and its idle timeout) before HTTP/2 takes over.
        proxy: Any = self  # Twisted declares the proxy's private state as None
        network = proxy._channel._networkProducer
        network.unregisterProducer()
        proxy._channel.setTimeout(None)
        connection = self._make_h2()
        proxy._channel = connection
        proxy._negotiatedProtocol = b"h2"
        connection.makeConnection(transport)
        network.registerProducer(connection, True)

"""The HTTP/1.1 channel of every Klein app kura serves: :class:`KuraHTTPChannel`.

It frames requests as twisted.web's ``HTTPChannel`` does, and adds what a
cache facing build fleets needs:

* a deadline on the whole request head (twisted's timeout is an idle timer
  that every trickled byte resets), answered 408;
* one ``Transfer-Encoding``, exactly ``chunked`` (anything else is a 400:
  other parsers would frame it differently);
* admission between head and body (the request's ``head_complete``), and no
  automatic ``100 Continue``;
* dropping a refused body, at once or mid-stream, and lingering briefly
  after answering so the client reads the answer instead of a reset;
* a body timeout between two body reads, and a drain that closes idle
  connections;
* responses written without a reactor turn (:mod:`.sending`), a response's
  head and its first body bytes in one ``send`` (:meth:`KuraHTTPChannel.write_coalesced`).

Its requests are :class:`~.request.KuraRequest` objects (the site's request
factory); it calls their public ``complete``, ``body_skipped``,
``fail_body`` and ``head_complete``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from kura.domain.errors import BadFraming

from .errors import RequestTimeout, render_error_response
from .sending import send_now

log = Logger(namespace="kura.http")

#: How long a refused upload's connection keeps draining unread body bytes,
#: so the client reads our answer instead of a reset.
LINGER_SECONDS = 2.0


class KuraHTTPChannel(http.HTTPChannel):
    """An ``HTTPChannel`` that admits each request between its head and body.

    Attributes:
        header_timeout: seconds a request head may take from its first byte.
        body_timeout: seconds a request body may go without a byte arriving
            (``None``: the idle timeout applies, as in stock twisted.web).
    """

    header_timeout: float  # set by KuraSite.make_channel, the only maker of these channels
    body_timeout: float | None = None
    _idle_period: float | None = None
    _transfer_encoded = False
    reactor: IReactorTime
    _head_deadline: IDelayedCall | None = None
    #: When the first byte of the head being read arrived (``None``: no head is).
    _head_started: float | None = None
    _closed = False
    _lingering: IDelayedCall | None = None
    _host: Any = None
    _secure: bool | None = None
    #: Set while a request writes its head: the head waits for the body's first bytes.
    _coalescing = False
    _held_head: bytes | None = None

    def dataReceived(self, data: bytes) -> None:
        if (
            self._head_started is None
            and self._head_deadline is None
            and not self._handlingRequest
            and self.line_mode
        ):
            self._head_started = self.reactor.seconds()
        super().dataReceived(data)
        if self._head_started is not None and self._head_deadline is None and not self._closed:
            # The head is still incomplete after this read: it gets its deadline,
            # counted from its first byte. Most heads arrive whole in one read
            # and never pay for a timer.
            remaining = self.header_timeout - (self.reactor.seconds() - self._head_started)
            self._head_deadline = self.reactor.callLater(max(0.0, remaining), self._head_timeout)

    def getHost(self) -> Any:
        """The local address, asked of the socket once per connection.

        twisted.web asks for it in every request's constructor, and each ask
        is a ``getsockname`` system call; a connection's address never changes.
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def isSecure(self) -> bool:
        """Whether the connection is TLS, decided once per connection (an
        interface adaptation that every request would otherwise repeat)."""
        if self._secure is None:
            if self.transport is None:
                return False
            self._secure = bool(super().isSecure())
        return self._secure

    # -- responses -----------------------------------------------------------------

    def write_coalesced(self, write: Callable[[bytes], None], data: bytes) -> None:
        """Call ``write(data)`` (a request's first write) with the response head
        held back until the first body bytes, which it is sent with (one
        ``send``, one TCP segment for a small response, instead of a head
        segment the body waits behind). A head still held when ``write``
        returns (no body) is sent then: nothing outlives the call, so no other
        write can overtake a held head.
        """
        self._coalescing = True
        try:
            write(data)
        finally:
            self._coalescing = False
            head, self._held_head = self._held_head, None
            if head is not None:
                send_now(self.transport, head)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """Serialize the head as twisted.web does; hold it while coalescing,
        else send it now (:func:`.sending.send_now`)."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)  # sanitizes pairs
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if self._coalescing:
            self._held_head = b"".join(parts)
        else:
            send_now(self.transport, b"".join(parts))

    def write(self, data: bytes) -> None:
        head, self._held_head = self._held_head, None
        send_now(self.transport, data if head is None else head + data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))

    def expire_head(self) -> None:
        """The request head took too long as a whole: answer 408 and close."""
        self._cancel_head_deadline()
        self._head_timeout()

    def _head_timeout(self) -> None:
        self._head_deadline = None
        self._head_started = None
        transport: Any = self.transport
        log.info("request head deadline passed; closing {peer}", peer=str(transport.getPeer()))
        transport.write(render_error_response(RequestTimeout("Request head not received in time")))
        self.loseConnection()

    def _cancel_head_deadline(self) -> None:
        self._head_started = None
        if self._head_deadline is not None:
            if self._head_deadline.active():
                self._head_deadline.cancel()
            self._head_deadline = None

    def headerReceived(self, line: bytes) -> bool:
        # Twisted takes "chunked" from one Transfer-Encoding header and lets a
        # second one ("identity") or "identity" with a Content-Length pass;
        # other parsers frame those differently (TE.TE request smuggling).
        # Only one Transfer-Encoding, exactly "chunked", is accepted.
        name, colon, value = line.partition(b":")
        if colon and name.lower() == b"transfer-encoding":
            if self._transfer_encoded or value.strip(b" \t").lower() != b"chunked":
                self._respondToBadRequestAndDisconnect()
                return False
            self._transfer_encoded = True
        return bool(super().headerReceived(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted just drops the connection; answer like any other bad head.
        self._respondToBadRequestAndDisconnect()

    def allHeadersReceived(self) -> None:
        # Replaces HTTPChannel.allHeadersReceived: same steps, except that the
        # request is admitted and 100 Continue is left to the admission.
        self._cancel_head_deadline()
        self._transfer_encoded = False
        request = self.requests[-1]
        request.parseCookies()
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        if self.body_timeout is not None and self.length != 0 and self._idle_period is None:
            # Between two body reads the body timeout applies, not the idle one.
            self._idle_period = self.setTimeout(self.body_timeout)
        expect = request.requestHeaders.getRawHeaders(b"expect")
        expect_continue = bool(expect) and expect[0].lower() == b"100-continue"
        request.head_complete(
            self._command, self._path, expect_continue and self._version == b"HTTP/1.1"
        )

    def allContentReceived(self) -> None:
        if self._idle_period is not None:
            # Back to the idle period first: it is what twisted saves (and
            # restores once the response is done).
            self.setTimeout(self._idle_period)
            self._idle_period = None
        super().allContentReceived()

    def skip_body(self) -> None:
        """Called during head processing: treat the request as bodiless and close after."""
        self.length = 0
        self._transferDecoder = None
        self.persistent = False

    def abandon_body(self, request: Any) -> None:
        """Stop receiving ``request``'s body mid-stream and let it be answered.

        Scheduled (not called from inside the body decoder, which may still
        be running); a body that completed meanwhile needs nothing.
        """
        if not self.requests or self.requests[-1] is not request:
            return
        if request.complete:
            return
        self.persistent = False
        self._transferDecoder = None
        self.allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Answer a request twisted.web cannot frame (bad chunking, a bad head) and close.

        twisted.web writes a bare ``400 Bad Request``; clients and operators
        get kura's JSON error instead, with the request's id when it has one.
        """
        error = BadFraming("Malformed request")
        spec = None
        after: tuple[tuple[bytes, bytes], ...] = ()
        if self.requests:
            request = self.requests[-1]
            if not request.complete:
                request.fail_body(error)
            if request.admitted is not None:
                spec = request.admitted.spec
            after = ((b"X-Request-Id", request.ensure_request_id().encode("ascii")),)
        transport: Any = self.transport
        transport.write(render_error_response(error, spec, after=after))
        self.loseConnection()

    def requestDone(self, request: http.Request) -> None:
        if not self.persistent and getattr(request, "body_skipped", False):
            self._linger()
            del self.requests[0]
            return
        super().requestDone(request)

    def _linger(self) -> None:
        """Half-close and drain unread body bytes briefly, then close.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy the response before the client reads it.
        """
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        transport: Any = self.transport
        # TLS transports cannot half-close; they still drain, then close.
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        transport.resumeProducing()
        self._lingering = self.reactor.callLater(LINGER_SECONDS, transport.loseConnection)

    @property
    def idle(self) -> bool:
        """No request is being received or answered on this connection."""
        return not self.requests and not self._handlingRequest

    def drain(self) -> None:
        """Close now if idle; otherwise close once the current response is done."""
        self.persistent = False
        if self.idle:
            transport: Any = self.transport
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_head_deadline()
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        channels = getattr(getattr(self, "site", None), "channels", None)
        if channels is not None:
            channels.discard(self)
        super().connectionLost(reason)

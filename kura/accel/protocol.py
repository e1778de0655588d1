"""The same-port listener: accelerate what is safe, hand everything else to twisted.web.

Per connection, :class:`SamePortProtocol` buffers bytes until a request head
is complete (at most 16 KiB, within the head deadline), parses it strictly
(:mod:`.head`), classifies it with the Klein route table (:mod:`.classify`),
and then either

* serves it: takes a permit, looks the artifact up, opens its file, lets
  :func:`.decide.decide` judge it, runs the authorization once, writes the
  response head and has the transfer engine (:mod:`.engine`) move the body;
  afterwards the connection is kept alive when safe and the next request is
  classified again; or
* hands off: a twisted.web ``HTTPChannel`` for the Klein ``Site`` (or an
  HTTP/2 connection for a prior-knowledge preface) is attached to the
  connection and receives every buffered byte, untouched. From then on the
  connection belongs to twisted.web.

Any doubt means hand-off, and every hand-off happens before a single byte of
the request has been consumed, so twisted.web sees exactly what the client
sent.

A connection is in exactly one :class:`State`::

    IDLE --a byte--> READING_HEAD --servable head--> SERVING
      ^                                                 |
      +---------------- answered, keep-alive -----------+

    READING_HEAD, SERVING --not served here, head deadline--> HANDED_OFF
    IDLE --idle deadline, drain--> CLOSING
    SERVING --deny, Connection: close, short or failed body--> CLOSING
    IDLE, READING_HEAD, SERVING --cut off--> CLOSING
    any --connection lost--> CLOSED

The request being served is an :class:`_Exchange`: what it holds (permit,
file lease, engine reservation, in-flight slot, transfer) is given back in
one place when it ends, however it ends.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kura.domain.artifacts import Manifest
from kura.domain.errors import KuraError
from kura.telemetry.logs import log_access
from kura.telemetry.traffic import InflightSlot
from kura.web.accounting import producer_label
from kura.web.errors import render_error_response
from kura.web.request import SERVER_NAME

from . import reasons
from .accelerator import Accelerator
from .classify import Candidate
from .decide import (
    Fallback,
    HeldBody,
    OpenedFile,
    Serve,
    admit,
    decide,
    is_file_backed,
    serve_whole,
)
from .engine import SENDFILE_MAX_BYTES
from .handles import Lease
from .head import MAX_HEAD_BYTES, find_head_end, parse_head
from .interfaces import INCOMPLETE, OK, ITransfer
from .response import head_from_fields, header_fields

log = Logger(namespace="kura.accel")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: No reservation held (``None`` is a valid one: sendfile needs no pipe).
_UNRESERVED = object()
_NO_HEADERS: list[tuple[bytes, bytes]] = []


class State(enum.Enum):
    """Where a connection is (see the module docstring)."""

    #: Between requests, nothing buffered; the idle deadline runs.
    IDLE = "idle"
    #: Part of a request head is buffered; the head deadline runs.
    READING_HEAD = "reading head"
    #: One request is being decided or sent (an :class:`_Exchange`).
    SERVING = "serving"
    #: twisted.web (or HTTP/2) owns the connection.
    HANDED_OFF = "handed off"
    #: The accelerator ended the connection; nothing more is read or answered.
    CLOSING = "closing"
    #: The connection is gone.
    CLOSED = "closed"


class SamePortFactory(ServerFactory):
    """The protocol factory listening on ``KURA_PORT``."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def startFactory(self) -> None:
        self.accelerator.start()

    def stopFactory(self) -> None:
        self.accelerator.stop()

    def buildProtocol(self, addr: Any) -> SamePortProtocol:
        return SamePortProtocol(self.accelerator)


class _Exchange:
    """One request the accelerator took on, from its permit to its response's end.

    Attributes:
        candidate: the classified request.
        started_at: when the first byte of its head arrived.
        paused: it outlived the step of the request loop that started it (a
            look-up, a check or a transfer went off the reactor), so the
            connection reads nothing until it ends; its end resumes reading
            and the loop.
        lease: its file, once open.
        held: its body, when it is kept in the database and held in memory
            (sent with the response head: no file, no pipe).
        body_in_head: how many body bytes ride in the response head (a held
            body's), counted as sent once the head has left.
        reservation: what the engine reserved for its transfer, until the
            transfer starts.
        transfer: its transfer, once started.
        slot: its public in-flight slot, from the response head on.
        status, keep_alive, request_id: the response's.
        first_byte_recorded: its time to first byte was sampled.
    """

    __slots__ = (
        "body_in_head",
        "candidate",
        "first_byte_recorded",
        "held",
        "keep_alive",
        "lease",
        "paused",
        "request_id",
        "reservation",
        "slot",
        "started_at",
        "status",
        "transfer",
    )

    def __init__(self, candidate: Candidate, started_at: float) -> None:
        self.candidate = candidate
        self.started_at = started_at
        self.paused = False
        self.lease: Lease | None = None
        self.held: HeldBody | None = None
        self.body_in_head = 0
        self.reservation: object = _UNRESERVED
        self.transfer: ITransfer | None = None
        self.slot: InflightSlot | None = None
        self.status = 0
        self.keep_alive = False
        self.request_id = b""
        self.first_byte_recorded = False


@implementer(IPushProducer)
def not_a_download_or_ambiguous(head: bytes) -> str:
    """Why a head :func:`parse_head` refused falls back: ``method`` when its
    request line is not ``GET ... HTTP/1.1`` (a write, a HEAD, HTTP/1.0: simply
    not a download), ``ambiguous`` when it is one but outside the strict subset."""
    line = head[: head.find(b"\r\n")]
    if line.startswith(b"GET ") and line.endswith(b" HTTP/1.1"):
        return reasons.AMBIGUOUS
    return reasons.METHOD


class SamePortProtocol(Protocol):
    """One client connection (see the module docstring).

    Attributes:
        state: where the connection is.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self._accel = accelerator
        self.state = State.IDLE
        self._buffer = b""
        # How much of the buffer was searched for the end of the head.
        self._scanned = 0
        # When the idle (IDLE) or head (READING_HEAD) deadline passes; the
        # Sweeper checks it, so a request schedules no timer.
        self._deadline: float | None = None
        self._head_started_at = 0.0
        self._channel: Any = None
        self._exchange: _Exchange | None = None
        # The TCP server transport, set by connectionMade: an ITCPTransport,
        # IPushProducer and IConsumer at once, which no one interface names.
        self._tcp: Any = None

    # -- connection events -----------------------------------------------------

    def connectionMade(self) -> None:
        accel = self._accel
        accel.connections.add(self)
        self._tcp = self.transport
        self._tcp.setTcpNoDelay(True)
        self._deadline = accel.reactor.seconds() + accel.settings.idle_timeout

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is State.HANDED_OFF:
            self._channel.dataReceived(data)
        elif state is State.IDLE or state is State.READING_HEAD:
            self._buffer += data
            self._advance()
        elif state is State.SERVING:
            # Already on its way when reading paused: the next request.
            self._buffer += data
        # CLOSING: the connection ends after what was answered.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        handed_off = self.state is State.HANDED_OFF
        self.state = State.CLOSED
        self._deadline = None
        self._accel.connections.discard(self)
        # An exchange still waiting ends when its look-up, check or transfer
        # does, and then only gives back what it holds.
        self._stop_transfer()
        if handed_off:
            self._channel.connectionLost(reason)

    # IPushProducer: registered with the transport while a transfer runs in
    # the background, so a lost connection stops it.

    def pauseProducing(self) -> None:
        """Nothing to do: bodies bypass the transport's write buffer."""

    def resumeProducing(self) -> None:
        """Nothing to do: bodies bypass the transport's write buffer."""

    def stopProducing(self) -> None:
        self._stop_transfer()

    # -- deadlines, drain and cut-off (driven by the Accelerator) ---------------

    def check_deadline(self, now: float) -> None:
        """Act if the idle or head deadline has passed (the :class:`~.sweep.Sweeper` asks)."""
        deadline = self._deadline
        if deadline is None or now < deadline:
            return
        self._deadline = None
        if self.state is State.IDLE:
            self._close()
        elif self.state is State.READING_HEAD:
            # Twisted would only close when the client went silent; a head
            # that trickles in forever is cut off here, as a whole.
            self._hand_off(reasons.HEAD_TIMEOUT)
            self._channel.expire_head()

    def close_if_idle(self) -> None:
        if self.state is State.IDLE:
            self._close()

    def abort(self) -> None:
        self._stop_transfer()
        if self.state is not State.CLOSED:
            self.state = State.CLOSING
            self._deadline = None
            self._tcp.abortConnection()

    def _close(self) -> None:
        self.state = State.CLOSING
        self._deadline = None
        self._tcp.loseConnection()

    def _stop_transfer(self) -> None:
        exchange = self._exchange
        if exchange is not None and exchange.transfer is not None:
            exchange.transfer.stop()

    # -- the request loop -----------------------------------------------------------

    def _advance(self) -> None:
        """Classify and serve buffered requests until one is pending or handed off,
        or nothing is left.

        A request answered before :meth:`_serve` returns brings the loop
        back here, which takes the next one (a thousand pipelined requests do
        not nest a thousand frames deep). One still pending pauses reading;
        its end resumes reading and calls this again.
        """
        accel = self._accel
        # One clock read per turn of the reactor: it stamps the arrival of
        # every head that starts in these bytes and the idle deadline after
        # them (they are microseconds apart).
        now = accel.reactor.seconds()
        while self.state is State.IDLE or self.state is State.READING_HEAD:
            buffer = self._buffer
            if not buffer:
                self.state = State.IDLE
                self._deadline = now + accel.idle_timeout
                return
            if self.state is State.IDLE:
                self.state = State.READING_HEAD
                self._head_started_at = now
                self._deadline = now + accel.header_timeout
            if buffer[0] == 0x50 and (  # b"P"
                buffer.startswith(H2_PREFACE) or H2_PREFACE.startswith(buffer)
            ):
                if len(buffer) >= len(H2_PREFACE):
                    self._hand_off_h2()
                return
            if not accel.enabled:
                # The kill switch: twisted.web serves everything on this port.
                self._hand_off(reasons.DISABLED)
                return
            end = find_head_end(buffer, self._scanned)
            if end < 0:
                self._scanned = len(buffer)
                if len(buffer) > MAX_HEAD_BYTES:
                    self._hand_off(reasons.HEAD_TOO_LARGE)
                return
            self._scanned = 0
            head = parse_head(buffer, end)
            if head is None:
                self._hand_off(not_a_download_or_ambiguous(buffer))
                return
            candidate = accel.classifier.classify(head)
            if isinstance(candidate, str):
                self._hand_off(candidate)
                return
            permits = accel.permits
            draining = accel.state.draining
            permits_free = permits.in_use < permits.limit
            if draining or not permits_free:
                refusal = admit(draining=draining, permits_free=permits_free)
                assert refusal is not None
                self._hand_off(refusal.reason)
                return
            manifest = accel.store.cached_manifest(candidate.artifact_id)
            if manifest is None or not self._serve_now(candidate, manifest):
                self._serve(candidate, manifest)
            exchange = self._exchange
            if exchange is not None:  # still pending: it resumes the loop when it ends
                exchange.paused = True
                self._tcp.pauseProducing()
                return

    # -- hand-off ------------------------------------------------------------------

    def _hand_off(self, reason: str, *, paused: bool = False) -> None:
        """Give the connection, and every byte buffered so far, to twisted.web."""
        self._accel.meters.fallback(reason)
        self._attach(self._accel.site.make_channel(), paused=paused)

    def _hand_off_h2(self) -> None:
        from kura.web.h2 import build_h2_connection  # noqa: PLC0415 - the optional h2 extra

        site = self._accel.site
        connection = build_h2_connection(site, reactor=self._accel.reactor, metrics=site.metrics)
        self._accel.meters.fallback(reasons.H2C)
        self._attach(connection, paused=False, register_producer=True)

    def _attach(self, channel: Any, *, paused: bool, register_producer: bool = False) -> None:
        self.state = State.HANDED_OFF
        self._deadline = None
        self._accel.connections.discard(self)
        self._channel = channel
        transport = self._tcp
        channel.makeConnection(transport)
        if register_producer:
            transport.registerProducer(channel, True)
        if paused:
            transport.resumeProducing()
        buffered, self._buffer = self._buffer, b""
        if buffered:
            channel.dataReceived(buffered)

    # -- serving -------------------------------------------------------------------

    def _serve_now(self, candidate: Candidate, manifest: Manifest) -> bool:
        """Serve the commonest request in one step, if it is one: the whole of a
        small artifact whose file is open in the handle cache, verified, or
        whose body (kept in the database) is held in memory, for a plain head
        (no Range, no Connection, no X-Request-Id, no credentials) on an open
        route.

        Its answer is exactly the general path's (the same cached decision,
        head and metrics); what it skips is the bookkeeping of a request
        that may wait: no permit, exchange, lease or transfer object exists
        unless the socket pushes back (then the request becomes an ordinary
        exchange holding the descriptor, as if :meth:`_start` had begun it).
        Sending a small body from the page cache never blocks the reactor.

        Returns:
            Whether it took the request on (``False``: nothing was done).
        """
        accel = self._accel
        head = candidate.head
        if (
            not head.plain
            or manifest.size > SENDFILE_MAX_BYTES
            or manifest.inline  # key-value entries are never accelerated
            or accel.authorization.needs_check(candidate.spec)
        ):
            return False
        if manifest.in_database:
            # The body rides in the head's send; no file is involved.
            body = accel.store.bodies.get(manifest)
            if body is None:
                return False  # twisted.web reads it (and holds it for next time)
            fd, file_bytes = -1, 0
        else:
            fd = accel.handles.ready_fd(manifest)
            if fd < 0:
                return False
            body, file_bytes = b"", manifest.size  # the whole file (ready_fd checked its size)
        decision = serve_whole(manifest)
        if decision.response.status != 200:
            return False
        request_id = accel.request_ids.next()
        now = accel.reactor.seconds()
        head_bytes = head_from_fields(
            200,
            decision.fields,
            date=accel.dates.value(now),
            request_id=request_id,
            keep_alive=True,  # admit() let it in: the node is not draining
        )
        transfer = accel.engine.send(
            self._tcp, head_bytes + body, fd, file_bytes, self._transfer_done
        )
        if transfer is not None:
            self._took_on(candidate, manifest, transfer, request_id, now)
            return True
        self._buffer = self._buffer[head.length :]
        accel.store.record_access(candidate.artifact_id, now)
        spec = candidate.spec
        accel.meters.route(spec).count_whole(
            manifest.size, now - self._head_started_at, now, from_memory=fd < 0
        )
        if accel.site.access_log:
            log_access(head.method, head.path, 200, request_id, spec.template)
        self.state = State.IDLE  # the loop takes the next request
        return True

    def _took_on(
        self,
        candidate: Candidate,
        manifest: Manifest,
        transfer: ITransfer,
        request_id: bytes,
        now: float,
    ) -> None:
        """A one-step response that did not end at once becomes an exchange
        (it failed, or the rest goes on in the background holding the file)."""
        accel = self._accel
        accel.permits.take()  # admit() saw one free
        self.state = State.SERVING
        self._deadline = None
        exchange = self._exchange = _Exchange(candidate, self._head_started_at)
        if manifest.in_database:
            exchange.body_in_head = manifest.size
        elif transfer.result is None:
            exchange.lease = accel.handles.adopt(manifest)
        exchange.status = 200
        exchange.keep_alive = True
        exchange.request_id = request_id
        self._buffer = self._buffer[candidate.head.length :]
        accel.store.record_access(candidate.artifact_id)
        self._launched(exchange, transfer, now, from_memory=manifest.in_database)

    def _serve(self, candidate: Candidate, manifest: Manifest | None) -> _Exchange:
        """Take a permit and look the artifact up (``manifest``: from memory, if it was)."""
        accel = self._accel
        accel.permits.take()
        self.state = State.SERVING
        self._deadline = None
        exchange = self._exchange = _Exchange(candidate, self._head_started_at)
        if manifest is not None:
            self._decide(exchange, manifest)
        else:
            lookup = Deferred.fromCoroutine(accel.store.manifest(candidate.artifact_id))
            lookup.addCallbacks(
                lambda found: self._decide(exchange, found),
                lambda failure: self._fall_back(exchange, reasons.LOOKUP_ERROR),
            )
        return exchange

    def _decide(self, exchange: _Exchange, manifest: Manifest | None) -> None:
        """Open the artifact's file, verify it if need be (or take its body
        from memory, for one kept in the database), judge the request, then
        authorize and start it.

        The file (or held body) and the engine's reservation are taken
        together, both or neither, before :func:`.decide.decide` runs, so
        running out of descriptors falls back (twisted.web answers 503)
        instead of breaking an authorized response. Only a file whose bytes
        were checked against the manifest's digest in its current state is
        served (:mod:`kura.storage.verify`); a held body was checked when it
        was stored or read back.
        """
        if self.state is not State.SERVING:  # the connection went away meanwhile
            self._end(exchange)
            return
        accel = self._accel
        lease: OpenedFile | None = None
        if is_file_backed(manifest):
            handles = accel.handles
            try:
                lease = handles.borrow(manifest)
            except OSError:
                pass
            else:
                try:
                    exchange.reservation = accel.engine.reserve(lease.size)
                except OSError:
                    handles.release(lease)
                    lease = None
                else:
                    exchange.lease = lease
                    if not lease.verified and lease.size == manifest.size:
                        self._verify(exchange, manifest, lease)
                        return
        elif manifest is not None and not manifest.inline:
            # A body kept in the database: served only when held in memory
            # (known good); otherwise twisted.web reads it, and holds it.
            data = accel.store.bodies.get(manifest)
            if data is not None:
                try:
                    exchange.reservation = accel.engine.reserve(len(data))
                except OSError:
                    pass
                else:
                    lease = exchange.held = HeldBody(data)
        self._judge(exchange, manifest, lease)

    def _verify(self, exchange: _Exchange, manifest: Manifest, lease: Lease) -> None:
        """Check the file's bytes against its digest first (not verified in this state).

        Small files are hashed at once, larger ones on a storage thread (this
        request waits, reading paused; the connection may go meanwhile). A
        file that fails is forgotten by the store, and twisted.web answers
        the miss.
        """
        d = Deferred.fromCoroutine(self._accel.store.verify_open(manifest, lease.fd))
        d.addCallbacks(
            lambda intact: self._verified(exchange, manifest, lease, intact),
            lambda failure: self._fall_back(exchange, reasons.OPEN),
        )

    def _verified(
        self, exchange: _Exchange, manifest: Manifest, lease: Lease, intact: bool
    ) -> None:
        if self.state is not State.SERVING:  # the connection went away meanwhile
            self._end(exchange)
        elif not intact:
            self._fall_back(exchange, reasons.RANGE_OR_DAMAGE)
        else:
            lease.verified = True
            self._judge(exchange, manifest, lease)

    def _judge(
        self, exchange: _Exchange, manifest: Manifest | None, lease: OpenedFile | None
    ) -> None:
        """Serve (after authorization when the route needs it) or fall back, as decided."""
        accel = self._accel
        decision = decide(exchange.candidate, manifest, lease)
        if isinstance(decision, Fallback):
            self._fall_back(exchange, decision.reason)
        elif accel.authorization.needs_check(exchange.candidate.spec):
            self._authorize(exchange, decision)
        else:  # open routes: nothing to check
            self._start(exchange, decision, _NO_HEADERS)

    def _authorize(self, exchange: _Exchange, decision: Serve) -> None:
        """The servable request's authorization: now, and only now, exactly once."""
        authorization = self._accel.authorization
        candidate = exchange.candidate
        head = candidate.head
        ctx = authorization.context(
            spec=candidate.spec,
            method=head.method.decode("ascii"),
            target=candidate.target,
            headers=head.headers,
            query=candidate.params,
            transport="http",
        )
        decided = authorization.check_response(ctx, decision.response.status)
        decided.addCallbacks(
            lambda extra: self._start(exchange, decision, extra),
            lambda failure: self._deny(exchange, failure),
        )

    def _start(
        self,
        exchange: _Exchange,
        decision: Serve,
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        """Write the response head and start the body's transfer."""
        if self.state is not State.SERVING:  # the connection went away meanwhile
            self._end(exchange)
            return
        accel = self._accel
        candidate = exchange.candidate
        head = candidate.head
        response = decision.response
        self._buffer = self._buffer[head.length :]
        accel.store.record_access(candidate.artifact_id)
        exchange.status = status = response.status
        if head.plain:  # no Connection, no X-Request-Id
            keep_alive = not accel.state.draining
            request_id = accel.request_ids.next()
        else:
            keep_alive = head.keep_alive and not accel.state.draining
            request_id = accel.request_ids.for_request(head.get(b"x-request-id"))
        exchange.keep_alive = keep_alive
        exchange.request_id = request_id
        fields = decision.fields
        if extra_headers:
            fields += header_fields(extra_headers)
        head_bytes = head_from_fields(
            status,
            fields,
            date=accel.dates.value(accel.reactor.seconds()),
            request_id=request_id,
            keep_alive=keep_alive,
        )
        body = response.body
        reservation, exchange.reservation = exchange.reservation, _UNRESERVED
        held = exchange.held
        if held is not None:  # the body rides in the head's send
            exchange.body_in_head = body.length
            data = held.data[body.offset : body.offset + body.length]
            transfer = accel.engine.start(
                reservation, self._tcp, head_bytes + data, -1, 0, 0, self._transfer_done
            )
            self._launched(exchange, transfer, accel.reactor.seconds(), from_memory=True)
            return
        lease = exchange.lease
        assert lease is not None
        transfer = accel.engine.start(
            reservation,
            self._tcp,
            head_bytes,
            lease.fd,
            body.offset,
            body.length,
            self._transfer_done,
        )
        self._launched(exchange, transfer, accel.reactor.seconds())

    def _launched(
        self, exchange: _Exchange, transfer: ITransfer, now: float, *, from_memory: bool = False
    ) -> None:
        """The engine took ``exchange``'s response (``from_memory``: a body kept
        in the database, sent with its head): follow it in the background, or
        finish it if it is over already."""
        accel = self._accel
        (accel.meters.served_from_memory if from_memory else accel.meters.served).inc()
        exchange.transfer = transfer
        if transfer.result is None:
            # In flight from here until it ends. (One that ended inside
            # start() was never in flight across a reactor turn, so taking
            # no slot for it is the same to every reader of the count.)
            exchange.slot = accel.traffic.begin()
            self._note_first_byte(exchange, transfer, now)
            self._tcp.registerProducer(self, True)  # a lost connection stops it
        else:
            accel.traffic.started += 1  # public demand all the same (the limiter's CPU share)
            self._finish(exchange, transfer)

    def _transfer_done(self, transfer: ITransfer) -> None:
        """A transfer that went on in the background is over."""
        exchange = self._exchange
        assert exchange is not None and exchange.transfer is transfer
        if self.state is not State.CLOSED:
            self._tcp.unregisterProducer()
        self._finish(exchange, transfer)

    def _note_first_byte(self, exchange: _Exchange, transfer: ITransfer, now: float) -> None:
        if exchange.first_byte_recorded or not transfer.head_sent:
            return
        exchange.first_byte_recorded = True
        accel = self._accel
        accel.traffic.record_first_byte(
            now - exchange.started_at,
            transport="http",
            route=exchange.candidate.spec.template,
        )

    # -- how an exchange ends ----------------------------------------------------------

    def _end(self, exchange: _Exchange) -> None:
        """Give back everything ``exchange`` holds (every exchange ends here once)."""
        accel = self._accel
        self._exchange = None
        if exchange.lease is not None:
            accel.handles.release(exchange.lease)
        if exchange.reservation is not _UNRESERVED:
            accel.engine.release(exchange.reservation)
        if exchange.slot is not None:
            exchange.slot.release()
        accel.permits.give_back()

    def _fall_back(self, exchange: _Exchange, reason: str) -> None:
        """After a look at the artifact: nothing of the request was consumed yet."""
        self._end(exchange)
        if self.state is State.SERVING:
            self._hand_off(reason, paused=exchange.paused)

    def _finish(self, exchange: _Exchange, transfer: ITransfer) -> None:
        result = transfer.result
        now = self._accel.reactor.seconds()
        if not exchange.first_byte_recorded:
            self._note_first_byte(exchange, transfer, now)
        self._end(exchange)
        self._account(exchange, transfer, result, now)
        if self.state is not State.SERVING:  # lost or cut off meanwhile
            return
        if result == OK and exchange.keep_alive and not self._accel.state.draining:
            self.state = State.IDLE
            if exchange.paused:
                self._tcp.resumeProducing()
                self._advance()
            # Otherwise the loop that served it is still running and goes on.
        elif result in (OK, INCOMPLETE):
            # A short body must end the connection: the client would
            # otherwise read the next response as the rest of this one.
            self._close()
        else:
            self.state = State.CLOSING
            self._tcp.abortConnection()

    def _deny(self, exchange: _Exchange, failure: Failure) -> None:
        """Answer a refused request with its error and close, as twisted.web would."""
        self._end(exchange)
        if self.state is not State.SERVING:
            return
        accel = self._accel
        error = failure.value
        if not isinstance(error, KuraError):
            log.failure("authorization failed unexpectedly", failure)
            error = KuraError("Internal server error")
        candidate = exchange.candidate
        spec = candidate.spec
        head = candidate.head
        request_id = accel.request_ids.for_request(head.get(b"x-request-id"))
        date = accel.dates.value(accel.reactor.seconds())
        self._tcp.write(
            render_error_response(
                error,
                spec,
                before=((b"Server", SERVER_NAME), (b"Date", date)),
                after=((b"X-Request-Id", request_id),),
            )
        )
        accel.meters.request(spec.template, error.status).inc()
        if accel.site.access_log:
            log_access(head.method, head.path, error.status, request_id, spec.template)
        self._buffer = b""
        self._close()

    def _account(self, exchange: _Exchange, transfer: ITransfer, result: str, now: float) -> None:
        accel = self._accel
        spec = exchange.candidate.spec
        elapsed = max(now - exchange.started_at, 1e-9)
        status = exchange.status if result in (OK, INCOMPLETE) else 499
        meters = accel.meters
        meters.request(spec.template, status).inc()
        meters.duration.observe(elapsed)
        producer = producer_label(spec)
        sent = transfer.sent + (exchange.body_in_head if transfer.head_sent else 0)
        accel.egress.record(producer, result, sent, elapsed)
        if accel.site.access_log:
            head = exchange.candidate.head
            log_access(head.method, head.path, status, exchange.request_id, spec.template)
        if result == INCOMPLETE:
            log.error(
                "artifact body ended early; connection closed",
                route=spec.template,
                sent=sent,
            )

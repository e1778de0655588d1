"""The same-port listener: accelerate what is safe, hand everything else to twisted.web.

Per connection, :class:`SamePortProtocol` buffers bytes until a request head
is complete (at most 16 KiB, within the head deadline), parses it strictly
(:mod:`.head`), classifies it with the Klein route table (:mod:`.classify`),
and then either

* serves it: looks the artifact up, opens its file, takes a permit, writes
  the response head and moves the body with splice/sendfile — inline on the
  reactor while the socket accepts it, then on a worker thread
  (:mod:`.transfer`); afterwards the connection is kept alive when safe and
  the next request is classified again; or
* hands off: a twisted.web ``HTTPChannel`` for the Klein ``Site`` (or an
  HTTP/2 connection for a prior-knowledge preface) is attached to the
  connection and receives every buffered byte, untouched. From then on the
  connection belongs to twisted.web.

Any doubt means hand-off, and every hand-off happens before a single byte of
the request has been consumed, so twisted.web sees exactly what the client
sent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kura.domain.artifacts import Manifest
from kura.domain.errors import KuraError
from kura.telemetry.traffic import InflightSlot
from kura.web.download import ArtifactHead
from kura.web.errors import render_error_response
from kura.web.http import SERVER_NAME, log_access

from . import reasons
from .accelerator import Accelerator
from .classify import Candidate
from .decide import Fallback, admit, decide, is_file_backed
from .handles import Lease
from .head import MAX_HEAD_BYTES, RequestHead, find_head_end, parse_head
from .interfaces import INCOMPLETE, OK, ITransfer
from .response import build_head

log = Logger(namespace="kura.accel")

#: No reservation taken (``None`` is sendfile's reservation).
_UNRESERVED = object()

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


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


@implementer(IPushProducer)
class SamePortProtocol(Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self._accel = accelerator
        self._buffer = b""
        self._scanned = 0
        self._busy = False
        self._advancing = False
        self._closed = False
        # Set once the connection must end after what was already answered.
        self._closing = False
        self._reading_paused = False
        self._deadline: float | None = None
        self._on_deadline: Any = None
        self._head_started_at: float | None = None
        self._channel: Any = None
        # What the engine reserved for this request's transfer (a splice pipe).
        self._reservation: object = _UNRESERVED
        self._transfer: ITransfer | None = None

    # -- connection events -----------------------------------------------------

    def connectionMade(self) -> None:
        accel = self._accel
        accel.connections.add(self)
        transport: Any = self.transport
        transport.setTcpNoDelay(True)
        self._arm(accel.settings.idle_timeout, self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._channel is not None:
            self._channel.dataReceived(data)
            return
        if self._closing:
            return
        self._buffer += data
        if not self._busy:
            self._advance()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._disarm()
        self._accel.connections.discard(self)
        self._stop_transfer()
        self._release_reservation()
        if self._channel is not None:
            self._channel.connectionLost(reason)

    # IPushProducer: registered with the transport while a worker thread
    # writes to the socket, so a lost connection stops the worker.

    def pauseProducing(self) -> None:
        """Nothing to do: bodies bypass the transport's write buffer."""

    def resumeProducing(self) -> None:
        """Nothing to do: bodies bypass the transport's write buffer."""

    def stopProducing(self) -> None:
        self._stop_transfer()

    # -- deadlines (enforced by Accelerator.sweep) ---------------------------------

    def _arm(self, seconds: float, action: Any) -> None:
        self._deadline = self._accel.reactor.seconds() + seconds
        self._on_deadline = action

    def _disarm(self) -> None:
        self._deadline = None

    def check_deadline(self, now: float) -> None:
        """Act if the idle or head deadline has passed (the :class:`~.sweep.Sweeper` asks)."""
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._on_deadline()

    def _idle_timeout(self) -> None:
        self._transport().loseConnection()

    def _head_timeout(self) -> None:
        # Twisted would only close when the client went silent; a head that
        # trickles in forever is cut off here, as a whole.
        self._hand_off(reasons.HEAD_TIMEOUT)
        if self._channel is not None:
            self._channel.expire_head()

    def abort(self) -> None:
        self._stop_transfer()
        self._transport().abortConnection()

    def close_if_idle(self) -> None:
        if not self._busy and not self._buffer and self._channel is None and not self._closed:
            self._transport().loseConnection()

    # -- the request loop -----------------------------------------------------------

    def _transport(self) -> Any:
        return self.transport

    def _advance(self) -> None:
        """Classify and serve buffered requests until one is pending or handed off.

        Re-entrant calls (a response that completed inline asking for the
        next request) return at once: the running loop picks the next one up,
        so a thousand pipelined requests do not nest a thousand frames deep.
        """
        if self._advancing:
            return
        self._advancing = True
        try:
            self._advance_loop()
        finally:
            self._advancing = False

    def _advance_loop(self) -> None:
        accel = self._accel
        while self._channel is None and not (self._busy or self._closed or self._closing):
            buffer = self._buffer
            if not buffer:
                self._head_started_at = None
                self._arm(accel.settings.idle_timeout, self._idle_timeout)
                return
            if self._head_started_at is None:
                self._head_started_at = accel.reactor.seconds()
                self._arm(accel.settings.header_timeout, self._head_timeout)
            if buffer[:1] == b"P" and (
                buffer.startswith(H2_PREFACE) or H2_PREFACE.startswith(buffer)
            ):
                if len(buffer) >= len(H2_PREFACE):
                    self._hand_off_h2()
                return
            if not accel.settings.config.enabled:
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
            head = parse_head(buffer)
            if head is None:
                self._hand_off(reasons.AMBIGUOUS)
                return
            decision = accel.classifier.classify(head)
            if isinstance(decision, str):
                self._hand_off(decision)
                return
            refusal = admit(draining=accel.state.draining, permits_free=accel.permits.available > 0)
            if refusal is not None:
                self._hand_off(refusal.reason)
                return
            self._serve(decision)

    def _hand_off(self, reason: str) -> None:
        """Give the connection, and every byte buffered so far, to twisted.web."""
        self._accel.meters.fallback(reason)
        self._attach(self._accel.site.make_channel())

    def _hand_off_h2(self) -> None:
        from kura.web.h2 import build_h2_connection  # noqa: PLC0415 - the optional h2 extra

        site = self._accel.site
        connection = build_h2_connection(site, reactor=self._accel.reactor, metrics=site.metrics)
        self._accel.meters.fallback(reasons.H2C)
        self._attach(connection, register_producer=True)

    def _attach(self, channel: Any, register_producer: bool = False) -> None:
        self._disarm()
        self._accel.connections.discard(self)
        self._release_reservation()
        self._channel = channel
        transport = self._transport()
        channel.makeConnection(transport)
        if register_producer:
            transport.registerProducer(channel, True)
        if self._reading_paused:
            self._reading_paused = False
            transport.resumeProducing()
        buffered, self._buffer = self._buffer, b""
        if buffered:
            channel.dataReceived(buffered)

    # -- serving ---------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._transport().pauseProducing()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self._closed:
            self._reading_paused = False
            self._transport().resumeProducing()

    def _serve(self, candidate: Candidate) -> None:
        accel = self._accel
        self._busy = True
        self._disarm()
        accel.permits.take()
        artifact_id = candidate.artifact_id
        manifest = accel.store.cached_manifest(artifact_id)
        if manifest is not None:
            self._serve_manifest(candidate, manifest)
            return
        self._pause_reading()
        lookup = Deferred.fromCoroutine(accel.store.manifest(artifact_id))
        lookup.addCallbacks(
            lambda found: self._serve_manifest(candidate, found),
            lambda failure: self._decline(reasons.LOOKUP_ERROR),
        )

    def _open(self, manifest: Manifest) -> Lease | None:
        """The artifact's file and, in splice mode, a pipe; ``None`` if either fails
        (out of descriptors: twisted.web answers, 503)."""
        handles = self._accel.handles
        try:
            lease = handles.borrow(manifest)
        except OSError:
            return None
        try:
            self._reserve()  # now, so a failure can still fall back
        except OSError:
            handles.release(lease)
            return None
        return lease

    def _decline(self, reason: str) -> None:
        """Fall back after a look at the artifact; nothing has been consumed yet."""
        self._accel.permits.give_back()
        self._busy = False
        if not self._closed:
            self._hand_off(reason)

    def _serve_manifest(self, candidate: Candidate, manifest: Manifest | None) -> None:
        if self._closed:
            self._accel.permits.give_back()
            return
        lease = self._open(manifest) if is_file_backed(manifest) else None
        decision = decide(candidate, manifest, lease)
        if isinstance(decision, Fallback):
            if lease is not None:
                self._accel.handles.release(lease)
            self._decline(decision.reason)
            return
        response = decision.response
        assert manifest is not None and lease is not None  # decide() served them
        head = candidate.head
        authorization = self._accel.authorization
        if not authorization.needs_check(candidate.spec):
            self._start(candidate, manifest, lease, response, [])
            return
        # The artifact is servable: now (and only now, exactly once) the check.
        ctx = authorization.context(
            spec=candidate.spec,
            method=head.method.decode("ascii"),
            target=candidate.target,
            headers=head.headers,
            query=candidate.params,
            transport="http",
        )

        decided = authorization.check_response(ctx, response.status)
        if not decided.called:
            self._pause_reading()
        decided.addCallbacks(
            lambda extra: self._start(candidate, manifest, lease, response, extra),
            lambda failure: self._deny(candidate, lease, failure),
        )

    def _deny(self, candidate: Candidate, lease: Lease, failure: Failure) -> None:
        """Answer a refused request with its error and close, as twisted.web would."""
        accel = self._accel
        accel.handles.release(lease)
        accel.permits.give_back()
        self._busy = False
        if self._closed:
            return
        error = failure.value
        if not isinstance(error, KuraError):
            log.failure("authorization failed unexpectedly", failure)
            error = KuraError("Internal server error")
        spec = candidate.spec
        head = candidate.head
        self._buffer = self._buffer[head.length :]
        request_id = self._request_id(head)
        date = accel.dates.value(accel.reactor.seconds())
        response = render_error_response(
            error,
            spec,
            before=((b"Server", SERVER_NAME), (b"Date", date)),
            after=((b"X-Request-Id", request_id),),
        )
        transport = self._transport()
        transport.write(response)
        accel.meters.request(spec.template, error.status).inc()
        if accel.site.access_log:
            log_access(head.method, head.path, error.status, request_id, spec)
        self._closing = True
        transport.loseConnection()

    def _request_id(self, head: RequestHead) -> bytes:
        return self._accel.request_ids.for_request(head.get(b"x-request-id"))

    def _start(
        self,
        candidate: Candidate,
        manifest: Manifest,
        lease: Lease,
        response: ArtifactHead,
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        accel = self._accel
        head = candidate.head
        self._buffer = self._buffer[head.length :]
        accel.store.record_access(manifest.artifact_id)
        keep_alive = head.keep_alive and not accel.state.draining
        request_id = self._request_id(head)
        head_bytes = build_head(
            response.status,
            response.headers,
            date=accel.dates.value(accel.reactor.seconds()),
            request_id=request_id,
            keep_alive=keep_alive,
            extra=extra_headers,
        )
        exchange = _Exchange(
            candidate=candidate,
            request_id=request_id,
            status=response.status,
            keep_alive=keep_alive,
            slot=accel.traffic.begin(),
            lease=lease,
            started_at=accel.reactor.seconds()
            if self._head_started_at is None
            else self._head_started_at,
            first_byte_recorded=False,
        )
        self._head_started_at = None
        accel.meters.served.inc()
        reservation, self._reservation = self._reservation, _UNRESERVED
        transport = self._transport()
        transfer = accel.engine.start(
            reservation,
            transport,
            head_bytes,
            lease.fd,
            response.body.offset,
            response.body.length,
            lambda over: self._transfer_done(over, exchange),
        )
        self._note_first_byte(transfer, exchange)
        if transfer.result is None:
            # In the background: register so a lost connection stops it.
            self._pause_reading()
            self._transfer = transfer
            transport.registerProducer(self, True)
        else:
            self._finish(transfer, exchange, transfer.result)

    def _reserve(self) -> None:
        if self._reservation is _UNRESERVED:
            self._reservation = self._accel.engine.reserve()

    def _release_reservation(self) -> None:
        if self._reservation is not _UNRESERVED:
            reservation, self._reservation = self._reservation, _UNRESERVED
            self._accel.engine.release(reservation)

    def _note_first_byte(self, transfer: ITransfer, exchange: _Exchange) -> None:
        if exchange.first_byte_recorded or not transfer.head_sent:
            return
        exchange.first_byte_recorded = True
        accel = self._accel
        accel.traffic.record_first_byte(
            accel.reactor.seconds() - exchange.started_at,
            transport="http",
            route=exchange.candidate.spec.template,
        )

    def _transfer_done(self, transfer: ITransfer, exchange: _Exchange) -> None:
        """A transfer that went on in the background is over."""
        self._transfer = None
        if not self._closed:
            self._transport().unregisterProducer()
        self._note_first_byte(transfer, exchange)
        self._finish(transfer, exchange, transfer.result)

    def _stop_transfer(self) -> None:
        if self._transfer is not None:
            self._transfer.stop()

    def _finish(self, transfer: ITransfer, exchange: _Exchange, result: str) -> None:
        accel = self._accel
        accel.handles.release(exchange.lease)
        accel.permits.give_back()
        exchange.slot.release()
        self._account(transfer, exchange, result)
        self._busy = False
        if self._closed:
            return
        transport = self._transport()
        if result == OK and exchange.keep_alive and not accel.state.draining:
            self._resume_reading()
            self._advance()
        elif result in (OK, INCOMPLETE):
            # A short body must end the connection: the client would
            # otherwise read the next response as the rest of this one.
            transport.loseConnection()
        else:
            transport.abortConnection()

    def _account(self, transfer: ITransfer, exchange: _Exchange, result: str) -> None:
        accel = self._accel
        spec = exchange.candidate.spec
        elapsed = max(accel.reactor.seconds() - exchange.started_at, 1e-9)
        status = exchange.status if result in (OK, INCOMPLETE) else 499
        meters = accel.meters
        meters.request(spec.template, status).inc()
        meters.duration.observe(elapsed)
        producer = spec.producer.value if spec.producer is not None else "unknown"
        accel.egress.record(producer, result, transfer.sent, elapsed)
        if accel.site.access_log:
            head = exchange.candidate.head
            log_access(head.method, head.path, status, exchange.request_id, spec)
        if result == INCOMPLETE:
            log.error(
                "artifact body ended early; connection closed",
                route=spec.template,
                sent=transfer.sent,
            )


class _Exchange:
    """Bookkeeping for one accelerated response."""

    __slots__ = (
        "candidate",
        "first_byte_recorded",
        "keep_alive",
        "lease",
        "request_id",
        "slot",
        "started_at",
        "status",
    )

    def __init__(
        self,
        *,
        candidate: Candidate,
        request_id: bytes,
        status: int,
        keep_alive: bool,
        slot: InflightSlot,
        lease: Lease,
        started_at: float,
        first_byte_recorded: bool,
    ) -> None:
        self.candidate = candidate
        self.request_id = request_id
        self.status = status
        self.keep_alive = keep_alive
        self.slot = slot
        self.lease = lease
        self.started_at = started_at
        self.first_byte_recorded = first_byte_recorded

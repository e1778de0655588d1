"""twisted.web with kura's admission step between a request's head and body.

Stock twisted.web reads the whole request body (into memory or a temp file
in the system temp dir) and auto-sends ``100 Continue`` before the
application sees anything. kura instead:

* admits every request from its head (the site's :class:`~.interfaces.IGate`)
  before reading a body byte or sending ``100 Continue``; a refused upload is
  answered at once and its connection closed after a short lingering drain;
* streams accepted artifact bodies into its own staging directory, counted
  against the route limit and the staging budget as they arrive, pausing the
  transport when the disk falls behind;
* caps the bodies one client stages at once (:mod:`.upload_slots`), the
  client being its principal or its address (:mod:`.client_address`,
  exposed as :attr:`KuraRequest.client_address`);
* bounds the whole request head by a deadline (twisted's own timeout is an
  idle timer that every trickled byte resets);
* holds a public in-flight slot until the last response byte is written,
  samples time to first byte when the head goes out, and counts every
  request (499 for clients that leave before their request completes).

The same request class serves HTTP/1.1 (plain and TLS) and HTTP/2.
"""

from __future__ import annotations

import io
import weakref
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from kura.config.proxies import TrustedProxies
from kura.domain.errors import (
    BadFraming,
    KuraError,
    PayloadTooLarge,
    TmpBudgetExhausted,
    TooManyRequests,
)
from kura.lifecycle import NodeState
from kura.storage.interfaces import IArtifactStore
from kura.storage.staging import StagingFile
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import InflightSlot, PublicTraffic

from .accounting import Egress
from .admission import UNMATCHED, Admission, RequestHead
from .client_address import client_address
from .errors import RequestTimeout, render_error_response
from .interfaces import IGate
from .request_ids import RequestIds
from .routing import BodyKind, RouteSpec
from .upload_slots import UploadSlot, UploadSlots, client_key

log = Logger(namespace="kura.http")

SERVER_NAME = b"kura"
#: How long a refused upload's connection keeps draining unread body bytes,
#: so the client reads our answer instead of a reset.
LINGER_SECONDS = 2.0


class KuraRequest(server.Request):
    """A twisted.web request with head-time admission and staged bodies."""

    def __init__(self, channel: Any, queued: Any = http._QUEUED_SENTINEL) -> None:
        # Form bodies are never parsed into ``args``: request bodies are opaque bytes.
        super().__init__(channel, queued, parsePOSTFormSubmission=False)
        site = getattr(channel, "site", None)
        assert isinstance(site, KuraSite), "KuraRequest needs a KuraSite channel"
        self._site = site
        self.body_bytes = io.BytesIO()
        self.admission: Deferred[Admission] | None = None
        self.admitted: Admission | None = None
        self.rejection: KuraError | None = None
        self.staging: StagingFile | None = None
        self.spec: RouteSpec = UNMATCHED
        self.request_id = ""
        self._declared_length: int | None = 0
        self._early_chunks: list[bytes] | None = None
        self._discarding = False
        self._pause_reasons: set[str] = set()
        self._received_at: float | None = None
        self._first_byte_at: float | None = None
        self._slot: InflightSlot | None = None
        self._upload_slot: UploadSlot | None = None
        self._client_address: str | None = None
        self._lost = False
        self._counted = False

    # -- site services ---------------------------------------------------------

    @property
    def kura_site(self) -> KuraSite:
        return self._site

    @property
    def client_address(self) -> str:
        """Who sent this request, for accounting and logs.

        The TCP peer's address, or the client a trusted proxy reports in
        ``X-Forwarded-For`` (``KURA_TRUSTED_PROXIES``; see
        :mod:`.client_address`). Read it once the head is in.
        """
        if self._client_address is None:
            peer = self.getClientAddress()
            host = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else str(peer)
            forwarded = self.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
            self._client_address = client_address(
                host,
                [value.decode("latin-1") for value in forwarded],
                self.kura_site.trusted_proxies,
            )
        return self._client_address

    # -- head time ---------------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        """Remember the declared length; bodies never go to twisted's temp files."""
        self._declared_length = length
        self.content = self.body_bytes = io.BytesIO()

    def head_complete(self, command: bytes, path: bytes, expect_continue: bool) -> None:
        """The whole head is in (called by the channel before any body byte)."""
        site = self.kura_site
        raw_path, _, raw_query = path.partition(b"?")
        head = RequestHead(
            method=command.decode("ascii", "replace"),
            path=raw_path,
            query=_decode_query(raw_query),
            headers=_header_map(self),
            declared_length=self._declared_length,
            transport=self._transport_name(),
            raw_query=raw_query,
            peer=_host_of(self.getClientAddress()),
        )
        self.spec = site.gate.classify(head)[0]
        if self.spec.public and not self.spec.probe and self.spec is not UNMATCHED:
            # In flight from the head on: an upload streaming its body is
            # public work (a drain waits for it; replication backs off).
            self._slot = site.traffic.begin()
        self.admission = site.gate.admit(head)
        if self.admission.called:
            self.admission.addCallbacks(
                lambda a: self._admitted(a, expect_continue, synchronous=True),
                lambda f: self._refused(f, synchronous=True),
            )
        else:
            self._early_chunks = []
            self._pause("admission")
            self.admission.addCallbacks(
                lambda a: self._admitted(a, expect_continue, synchronous=False),
                lambda f: self._refused(f, synchronous=False),
            )

    def _transport_name(self) -> str:
        channel: Any = self.channel
        if not isinstance(channel, http.HTTPChannel):
            return "h2"
        return "https" if self.isSecure() else "http"

    def _has_body(self) -> bool:
        return self._declared_length != 0

    def _admitted(
        self, admission: Admission, expect_continue: bool, synchronous: bool
    ) -> Admission:
        self.admitted = admission
        early, self._early_chunks = self._early_chunks, None
        try:
            self._prepare_body(admission, expect_continue, synchronous, early or [])
        finally:
            # Last: resuming an HTTP/2 stream hands over the body bytes it held
            # back at once, so the staging file must be ready (or the body
            # refused) before then.
            self._resume("admission")
        return admission

    def _prepare_body(
        self, admission: Admission, expect_continue: bool, synchronous: bool, early: list[bytes]
    ) -> None:
        """Stage (or skip) the admitted request's body; replay what arrived meanwhile."""
        if self._lost:
            # The client left while its head was being admitted (a slow hook
            # or lookup): take no upload slot and open no file that nothing
            # would ever give back.
            return
        if admission.skips_body:
            if self._has_body():
                self._skip_body(synchronous)
            return
        try:
            if admission.spec.body is BodyKind.STAGED:
                self._stage(admission)
        except KuraError as error:
            # Answered at once: the body is never read, so nothing is in flight.
            self._release_upload_slot()
            self.rejection = error
            if self._has_body():
                self._skip_body(synchronous)
            return
        if expect_continue and self._has_body() and not self.startedWriting:
            transport = self.channel.transport
            assert transport is not None, "the connection is open (not _lost)"
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        for chunk in early:
            self.handleContentChunk(chunk)

    def _stage(self, admission: Admission) -> None:
        """Take the client's upload slot, then open the staging file.

        Raises:
            TooManyRequests: the client has ``KURA_MAX_UPLOADS_PER_CLIENT``
                bodies in flight already.
            TmpBudgetExhausted: the declared length cannot fit the staging
                budget's free space.
            PayloadTooLarge: the declared length is over the route's limit.
        """
        site = self.kura_site
        if site.upload_slots is not None and admission.spec.public:
            key = client_key(admission.caller, self.client_address)
            try:
                self._upload_slot = site.upload_slots.acquire(key)
            except TooManyRequests:
                site.metrics.upload_rejections.labels("client_uploads").inc()
                raise
        try:
            self.staging = site.store.stage(
                limit=admission.spec.body_limit,
                expected_length=self._declared_length,
                hashed=admission.hashes_body,
                on_pressure=lambda paused: self._pause("disk") if paused else self._resume("disk"),
            )
        except TmpBudgetExhausted:
            site.metrics.upload_rejections.labels("tmp_budget").inc()
            raise

    def _release_upload_slot(self) -> None:
        if self._upload_slot is not None:
            self._upload_slot.release()
            self._upload_slot = None

    def _refused(self, failure: Failure, synchronous: bool) -> Failure | None:
        """Record a refusal; handlers raise it from :attr:`rejection`.

        A recorded refusal is consumed here: requests that no handler
        awaits (an unknown route with a body) must not leave an unhandled
        failure behind to be logged as an error when collected.
        """
        self._early_chunks = None
        error = failure.value
        if isinstance(error, KuraError):
            self.rejection = error
        if self._has_body():
            self._skip_body(synchronous)
        # After the refusal is recorded: a resumed HTTP/2 stream hands over
        # its held-back body at once, and it must be dropped, not staged.
        self._resume("admission")
        return None if isinstance(error, KuraError) else failure

    def _skip_body(self, synchronous: bool) -> None:
        """Answer without reading the body; the connection closes afterwards."""
        self._discarding = True
        channel = self.channel
        if not isinstance(channel, KuraHTTPChannel):
            return
        if synchronous:
            channel.skip_body()
        else:
            self._pause("discard")
            channel.reactor.callLater(0, channel.abandon_body, self)

    @property
    def _body_source(self) -> Any:
        """What to pause so that no more body arrives, or ``None`` once done.

        On HTTP/1.1 the connection's transport. On HTTP/2 the stream itself: a
        paused stream stops giving its flow-control window back, so the client
        stops sending and at most one window waits in memory (pausing the
        whole connection would stall its other streams). ``None`` once
        twisted has deleted ``request.channel`` (the request finished): a
        paced ingest may schedule a resume that fires after that.
        """
        channel = getattr(self, "channel", None)
        if channel is None:
            return None
        if isinstance(channel, http.HTTPChannel):
            return channel.transport
        return channel

    def _pause(self, reason: str) -> None:
        source = self._body_source
        if not self._pause_reasons and source is not None:
            source.pauseProducing()
        self._pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            source = self._body_source
            if not self._pause_reasons and source is not None:
                source.resumeProducing()

    # -- body ---------------------------------------------------------------------

    def handleContentChunk(self, data: bytes) -> None:
        if self.admission is None:
            self._admit_late()
        if self._discarding or self.rejection is not None:
            return
        if self._early_chunks is not None:
            self._early_chunks.append(data)
            return
        spec = self.admitted.spec if self.admitted is not None else self.spec
        try:
            if self.staging is not None:
                try:
                    self.staging.write(data)
                except PayloadTooLarge:
                    # The route's own wording (e.g. "Part exceeds 10MB limit"),
                    # as when the declared length is over the limit.
                    raise PayloadTooLarge(spec.too_large_message) from None
                self._pace(len(data))
            else:
                content = self.body_bytes
                if content.tell() + len(data) > spec.body_limit:
                    raise PayloadTooLarge(spec.too_large_message)
                content.write(data)
        except KuraError as error:
            self.rejection = error
            if isinstance(error, TmpBudgetExhausted):
                self.kura_site.metrics.upload_rejections.labels("tmp_budget").inc()
            if self.staging is not None:
                # The body will never be published: give back its file and
                # its staging reservation now, not at the next restart.
                self.staging.abort()
            self._skip_body(synchronous=False)

    def _pace(self, size: int) -> None:
        """Hold the transport back while the admission's pacer says so."""
        pacer = self.admitted.pacer if self.admitted is not None else None
        if pacer is None:
            return
        delay = pacer.reserve(size)
        if delay > 0 and "pacing" not in self._pause_reasons:
            self._pause("pacing")
            self._site.clock.callLater(delay, self._resume, "pacing")

    def _admit_late(self) -> None:
        """Admit a request whose channel has no head step (an HTTP/2 stream).

        Twisted's HTTP/2 stream has already sent ``100 Continue``; the body is
        still held back by flow control until admission decides.
        """
        command = getattr(self.channel, "command", None) or b"GET"
        path = getattr(self.channel, "path", None) or b"/"
        self.head_complete(command, path, expect_continue=False)

    # -- processing -----------------------------------------------------------------

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        site = self.kura_site
        self._received_at = site.clock.seconds()
        if self.admission is None:
            self._admit_late()
        self._resume("discard")
        super().requestReceived(command, path, version)

    def process(self) -> None:
        site = self.kura_site
        self.request_id = site.request_ids.for_request(self.getHeader(b"x-request-id")).decode(
            "ascii"
        )
        site.metrics.http_inflight.inc()
        self.notifyFinish().addBoth(self._finished)
        super().process()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._before_head()
        super().write(data)

    def _before_head(self) -> None:
        site = self.kura_site
        self.setHeader(b"Server", SERVER_NAME)
        self.setHeader(b"X-Request-Id", self.request_id.encode("ascii"))
        channel = self.channel
        close = site.state.draining or self._discarding or self.rejection_closes()
        if self.clientproto == b"HTTP/1.1" and isinstance(channel, http.HTTPChannel):
            if close:
                channel.persistent = False
            self.setHeader(b"Connection", b"keep-alive" if channel.persistent else b"close")
        if self._received_at is not None and self._slot is not None:
            self._first_byte_at = site.clock.seconds()
            site.traffic.record_first_byte(
                self._first_byte_at - self._received_at,
                transport="http",
                route=self.spec.template,
            )

    def rejection_closes(self) -> bool:
        return self.rejection is not None and self.rejection.close

    def _finished(self, result: object) -> None:
        site = self.kura_site
        site.metrics.http_inflight.dec()
        status = 499 if isinstance(result, Failure) else self.code
        self._count(status)
        if self._slot is not None:
            self._slot.release()
        self._release_upload_slot()

    def _count(self, status: int) -> None:
        if self._counted:
            return
        self._counted = True
        site = self.kura_site
        site.metrics.http_requests.labels(self.spec.template, str(status)).inc()
        if self._received_at is not None and not self.spec.probe:
            site.metrics.http_request_duration.observe(site.clock.seconds() - self._received_at)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        if self._received_at is None:
            # The client left before its request was complete.
            if self._slot is not None:
                self._slot.release()
            self._release_upload_slot()
            if self.staging is not None:
                self.staging.abort()
            # A body already failed as bad framing was counted (400, write
            # error) when it failed; its connection closing is not an abort.
            already_counted = self._counted
            self._count(499)
            spec = self.admitted.spec if self.admitted is not None else None
            if (
                not already_counted
                and spec is not None
                and spec.producer is not None
                and spec.body is BodyKind.STAGED
            ):
                self._site.metrics.artifact_writes.labels(
                    spec.producer.value, "client_aborted"
                ).inc()
        super().connectionLost(reason)

    def fail_body(self, error: BadFraming) -> None:
        """The channel found the body malformed (bad chunking)."""
        if self.staging is not None:
            self.staging.abort()
        self._release_upload_slot()
        site = self.kura_site
        self._count(400)
        if self.admitted is not None and self.admitted.spec.producer is not None:
            site.metrics.artifact_writes.labels(self.admitted.spec.producer.value, "error").inc()


def _decode_query(raw: bytes) -> dict[str, list[str]]:
    # parse_qs on bytes raises when an escape decodes to a non-ASCII byte
    # (``%c0%ae``, or plain UTF-8 such as ``%ef%bc%8e``), which dropped the
    # connection unanswered. As latin-1 text every byte and every escape stays
    # one character; the result is then read as UTF-8, errors replaced.
    parsed = parse_qs(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return {_utf8(k): [_utf8(v) for v in values] for k, values in parsed.items()}


def _utf8(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "replace")


def _host_of(address: object) -> str:
    return str(getattr(address, "host", "") or "")


def _header_map(request: http.Request) -> dict[str, list[str]]:
    return {
        name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


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
    _lingering: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._head_deadline is None and not self._handlingRequest and self.line_mode:
            self._head_deadline = self.reactor.callLater(self.header_timeout, self._head_timeout)
        super().dataReceived(data)

    def expire_head(self) -> None:
        """The request head took too long as a whole: answer 408 and close."""
        self._cancel_head_deadline()
        self._head_timeout()

    def _head_timeout(self) -> None:
        self._head_deadline = None
        transport: Any = self.transport
        log.info("request head deadline passed; closing {peer}", peer=str(transport.getPeer()))
        transport.write(render_error_response(RequestTimeout("Request head not received in time")))
        self.loseConnection()

    def _cancel_head_deadline(self) -> None:
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

    def abandon_body(self, request: KuraRequest) -> None:
        """Stop receiving ``request``'s body mid-stream and let it be answered.

        Scheduled (not called from inside the body decoder, which may still
        be running); a body that completed meanwhile needs nothing.
        """
        if not self.requests or self.requests[-1] is not request:
            return
        if request._received_at is not None:
            return
        self.persistent = False
        self._transferDecoder = None
        self.allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self.requests:
            request = self.requests[-1]
            if isinstance(request, KuraRequest) and request._received_at is None:
                request.fail_body(BadFraming("Malformed request"))
        super()._respondToBadRequestAndDisconnect()

    def requestDone(self, request: http.Request) -> None:
        if not self.persistent and isinstance(request, KuraRequest) and request._discarding:
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
        self._cancel_head_deadline()
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        site: Any = getattr(self, "site", None)
        if isinstance(site, KuraSite):
            site.channels.discard(self)
        super().connectionLost(reason)


ACCESS = "{method} {path} {status} {request_id}"


def log_access(
    method: bytes, path: bytes, status: int, request_id: str | bytes, spec: RouteSpec
) -> None:
    """One structured access event; both serving paths log through here."""
    log.info(
        ACCESS,
        method=method.decode("ascii", "replace"),
        path=path.decode("ascii", "replace"),
        status=status,
        request_id=request_id if isinstance(request_id, str) else request_id.decode("ascii"),
        route=spec.template,
    )


class KuraSite(server.Site):
    """A Site of kura's: holds the services its requests and channels use.

    Args:
        resource: the Klein app's resource.
        gate: admits each request from its head.
        store: stages request bodies.
        state: whether the node drains (responses then close their connection).
        metrics: request counters.
        traffic: public in-flight accounting.
        reactor: time for deadlines and samples.
        header_timeout: seconds a request head may take from its first byte.
        idle_timeout: seconds an idle connection stays open.
        send_timeout: seconds a response may go without write progress.
        body_timeout: seconds a request body may go without a byte
            (``None``: the idle timeout applies).
        upload_slots: the per-client cap on bodies in flight (``None``: none,
            as on the internal plane, whose clients are peers).
        trusted_proxies: whose ``X-Forwarded-For`` names the client.
        access_log: log one event per request (``KURA_ACCESS_LOG``).
    """

    requestFactory = KuraRequest  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        gate: IGate,
        store: IArtifactStore,
        state: NodeState,
        metrics: KuraMetrics,
        traffic: PublicTraffic,
        reactor: IReactorTime,
        header_timeout: float,
        idle_timeout: float,
        send_timeout: float,
        body_timeout: float | None = None,
        upload_slots: UploadSlots | None = None,
        trusted_proxies: TrustedProxies = (),
        access_log: bool = True,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        self.gate = gate
        self.store = store
        self.state = state
        self.metrics = metrics
        self.traffic = traffic
        self.clock: IReactorTime = reactor
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.body_timeout = body_timeout
        self.upload_slots = upload_slots
        self.trusted_proxies = trusted_proxies
        self.access_log = access_log
        self.request_ids = RequestIds()
        self.egress = Egress(metrics)
        # Weak: a channel replaced by HTTP/2 after ALPN never reports its loss.
        self.channels: weakref.WeakSet[KuraHTTPChannel] = weakref.WeakSet()

    def drain(self) -> None:
        """Close idle connections; the others close after their current response."""
        for channel in list(self.channels):
            channel.drain()

    def cut_off(self) -> None:
        """Abort every connection still open (the drain deadline passed)."""
        for channel in list(self.channels):
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()

    def make_channel(self) -> KuraHTTPChannel:
        """A bare HTTP/1.1 channel for this site (the accelerator's fallback)."""
        channel: Any = KuraHTTPChannel()
        self.channels.add(channel)
        channel.factory = self
        channel.site = self
        channel.requestFactory = self.requestFactory
        channel.timeOut = self.timeOut
        channel.callLater = self.reactor.callLater
        channel.reactor = self.reactor
        channel.header_timeout = self.header_timeout
        channel.body_timeout = self.body_timeout
        return channel  # type: ignore[no-any-return]

    def buildProtocol(self, addr: Any) -> Any:
        """A protocol for TLS listeners: HTTP/1.1, or HTTP/2 when ALPN picks h2."""
        channel = self.make_channel()
        if not http.H2_ENABLED:
            return channel  # without the h2 extra, HTTP/1.1 only
        from kura.web.h2 import NegotiatingChannel, build_h2_connection  # noqa: PLC0415

        return NegotiatingChannel(
            channel,
            lambda: build_h2_connection(self, reactor=self.reactor, metrics=self.metrics),
        )

    def log(self, request: http.Request) -> None:
        """Access logging is structured (see kura.telemetry.logs), not the common log format."""
        if self.access_log and isinstance(request, KuraRequest):
            log_access(request.method, request.path, request.code, request.request_id, request.spec)

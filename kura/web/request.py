"""The twisted.web request of every Klein app kura serves: :class:`KuraRequest`.

Stock twisted.web reads the whole request body (into memory or a temp file
in the system temp dir) and auto-sends ``100 Continue`` before the
application sees anything. A :class:`KuraRequest` instead:

* is admitted from its head (the site's :class:`~.interfaces.IGate`) before a
  body byte is read or ``100 Continue`` sent; a refused upload is answered at
  once and its connection closed after a short lingering drain
  (:mod:`.channel`);
* hands its body to a :class:`~.ingest.BodyIngest`: artifact bodies stream
  into the staging directory, counted against the route limit and the
  staging budget as they arrive, pausing the source when the disk falls
  behind; small bodies stay in memory;
* caps the bodies one client stages at once (:mod:`.upload_slots`), the
  client being its principal or its address (:mod:`.client_address`,
  exposed as :attr:`KuraRequest.client_address`);
* holds a public in-flight slot until the last response byte is written,
  samples time to first byte when the head goes out, and counts every
  request (499 for clients that leave before their request completes).

The same request class serves HTTP/1.1 (plain and TLS) and HTTP/2.
"""

from __future__ import annotations

import functools
import io
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web import http, server

# By name: twisted.web.http is a deprecation proxy module, and each ``http.X``
# lookup through it costs microseconds on every request.
from twisted.web.http import HTTPChannel

from kura.domain.errors import BadFraming, KuraError, TmpBudgetExhausted, TooManyRequests
from kura.storage.staging import StagingFile
from kura.telemetry.traffic import InflightSlot

from .admission import UNMATCHED, Admission, RequestHead
from .channel import KuraHTTPChannel
from .client_address import client_address
from .ingest import DISCARD, BodyIngest
from .routing import BodyKind, RouteSpec
from .upload_slots import UploadSlot, client_key

if TYPE_CHECKING:
    from .site import KuraSite

#: The ``Server`` header of every response, on both serving paths.
SERVER_NAME = b"kura"


class KuraRequest(server.Request):
    """A twisted.web request with head-time admission and staged bodies."""

    def __init__(self, channel: Any, queued: Any = http._QUEUED_SENTINEL) -> None:
        # Form bodies are never parsed into ``args``: request bodies are opaque bytes.
        super().__init__(channel, queued, parsePOSTFormSubmission=False)
        site = getattr(channel, "site", None)
        assert site is not None and hasattr(site, "gate"), "KuraRequest needs a KuraSite channel"
        self._site: KuraSite = site
        self.ingest = BodyIngest(_body_source_of(self), site.clock)
        self.admission: Deferred[Admission] | None = None
        self.admitted: Admission | None = None
        self.rejection: KuraError | None = None
        self.spec: RouteSpec = UNMATCHED
        self.request_id = ""
        self._request_id = b""
        #: The request is answered without reading its body (the connection
        #: closes after the answer, lingering to drain what the client sent).
        self.body_skipped = False
        self._declared_length: int | None = 0
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
    def staging(self) -> StagingFile | None:
        """The staging file an artifact body is received into, if any."""
        return self.ingest.staging

    @property
    def body_bytes(self) -> io.BytesIO:
        """A small body received into memory (JSON payloads)."""
        return self.ingest.memory

    @property
    def complete(self) -> bool:
        """The whole request (head and body) has arrived."""
        return self._received_at is not None

    @property
    def over(self) -> bool:
        """Whether nothing more can be written: the response finished or the client left."""
        return bool(self.finished or self._disconnected)

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
        self.content = self.ingest.memory

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
            self.ingest.hold()
            self.admission.addCallbacks(
                lambda a: self._admitted(a, expect_continue, synchronous=False),
                lambda f: self._refused(f, synchronous=False),
            )

    def _transport_name(self) -> str:
        channel: Any = self.channel
        if not isinstance(channel, HTTPChannel):
            return "h2"
        return "https" if self.isSecure() else "http"

    def _has_body(self) -> bool:
        return self._declared_length != 0

    def _admitted(
        self, admission: Admission, expect_continue: bool, synchronous: bool
    ) -> Admission:
        self.admitted = admission
        try:
            self._prepare_body(admission, expect_continue, synchronous)
        finally:
            # Last: what was held is replayed into the sink just chosen, then
            # the source resumes (see kura.web.ingest).
            self.ingest.admitted()
        return admission

    def _prepare_body(self, admission: Admission, expect_continue: bool, synchronous: bool) -> None:
        """Choose where the admitted request's body goes (or that it is skipped)."""
        if self._lost:
            # The client left while its head was being admitted (a slow hook
            # or lookup): take no upload slot and open no file that nothing
            # would ever give back.
            self.ingest.discard()
            return
        if admission.skips_body:
            self.ingest.discard()
            if self._has_body():
                self._skip_body(synchronous)
            return
        try:
            if admission.spec.body is BodyKind.STAGED:
                self._stage(admission)
            else:
                self.ingest.keep_in_memory(
                    limit=admission.spec.body_limit, too_large=admission.spec.too_large_message
                )
        except KuraError as error:
            # Answered at once: the body is never read, so nothing is in flight.
            self._release_upload_slot()
            self.rejection = error
            self.ingest.discard()
            if self._has_body():
                self._skip_body(synchronous)
            return
        if expect_continue and self._has_body() and not self.startedWriting:
            transport = self.channel.transport
            assert transport is not None, "the connection is open (not _lost)"
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

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
            staging = site.store.stage(
                limit=admission.spec.body_limit,
                expected_length=self._declared_length,
                hashed=admission.hashes_body,
                on_pressure=self.ingest.on_disk_pressure,
            )
        except TmpBudgetExhausted:
            site.metrics.upload_rejections.labels("tmp_budget").inc()
            raise
        self.ingest.stage(
            staging, too_large=admission.spec.too_large_message, pacer=admission.pacer
        )

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
        error = failure.value
        if isinstance(error, KuraError):
            self.rejection = error
        self.ingest.discard()
        if self._has_body():
            self._skip_body(synchronous)
        # After the refusal is recorded: a resumed HTTP/2 stream hands over
        # its held-back body at once, and it must be dropped, not staged.
        self.ingest.admitted()
        return None if isinstance(error, KuraError) else failure

    def _skip_body(self, synchronous: bool) -> None:
        """Answer without reading the body; the connection closes afterwards."""
        self.body_skipped = True
        channel = self.channel
        if not isinstance(channel, KuraHTTPChannel):
            return
        if synchronous:
            channel.skip_body()
        else:
            self.ingest.pause(DISCARD)
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
        if isinstance(channel, HTTPChannel):
            return channel.transport
        return channel

    # -- body ---------------------------------------------------------------------

    def handleContentChunk(self, data: bytes) -> None:
        if self.admission is None:
            self._admit_late()
        try:
            self.ingest.receive(data)
        except KuraError as error:
            self.rejection = error
            if isinstance(error, TmpBudgetExhausted):
                self.kura_site.metrics.upload_rejections.labels("tmp_budget").inc()
            # The body will never be published: give back its file and its
            # staging reservation now, not at the next restart.
            self.ingest.abort()
            self._skip_body(synchronous=False)

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
        self.ingest.finished()
        self.ingest.resume(DISCARD)
        super().requestReceived(command, path, version)

    def ensure_request_id(self) -> str:
        """The request's id: the client's ``X-Request-Id`` if usable, else a new one.

        Given when the request is processed, or earlier when the channel must
        answer a body it cannot frame; the same id either way.
        """
        if not self._request_id:
            ids = self.kura_site.request_ids
            self._request_id = ids.for_request(self.getHeader(b"x-request-id"))
            self.request_id = self._request_id.decode("ascii")
        return self.request_id

    def process(self) -> None:
        """Find the resource and render it, as ``server.Request.process`` does,
        minus what kura's responses do not use on every request: twisted's
        ``Server`` header (kura's is set here, once), a freshly formatted
        ``Date`` (one per second, from the site's clock) and content encoders
        (kura's resources have none)."""
        site = self.kura_site
        self.ensure_request_id()
        site.metrics.http_inflight.inc()
        self.notifyFinish().addBoth(self._finished)
        self.site = site
        self.setHeader(b"Server", SERVER_NAME)
        self.setHeader(b"Date", site.dates.value(site.clock.seconds()))
        self.prepath = []
        self.postpath = [unquote(segment) for segment in self.path[1:].split(b"/")]
        if self.path == b"*":
            self._handleStar()
            return
        try:
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._before_head()
            channel = self.channel
            if isinstance(channel, KuraHTTPChannel):
                # The head goes out together with this first body write.
                channel.write_coalesced(super().write, data)
                return
        super().write(data)

    def _before_head(self) -> None:
        site = self.kura_site
        self.setHeader(b"X-Request-Id", self._request_id)
        channel = self.channel
        close = site.state.draining or self.body_skipped or self.rejection_closes()
        if self.clientproto == b"HTTP/1.1" and isinstance(channel, HTTPChannel):
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
            self.ingest.abort()
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
                # A write cut short is an error (upstream's rule); its status stays 499.
                self._site.metrics.artifact_writes.labels(spec.producer.value, "error").inc()
        super().connectionLost(reason)

    def fail_body(self, error: BadFraming) -> None:
        """The channel found the body malformed (bad chunking)."""
        self.ingest.abort()
        self._release_upload_slot()
        site = self.kura_site
        self._count(400)
        if self.admitted is not None and self.admitted.spec.producer is not None:
            site.metrics.artifact_writes.labels(self.admitted.spec.producer.value, "error").inc()


def _body_source_of(request: KuraRequest) -> Callable[[], Any]:
    """``request._body_source``, asked through a weak reference.

    The ingest belongs to the request; a strong reference back would make
    every request a reference cycle, left for the cyclic collector to find
    (~35 objects a request) instead of freed when its connection drops it.
    """
    ref = weakref.ref(request)

    def source() -> Any:
        alive = ref()
        return None if alive is None else alive._body_source

    return source


def _decode_query(raw: bytes) -> dict[str, list[str]]:
    """The request's own copy of the decoded query (clients repeat the same few)."""
    if not raw:
        return {}
    return {name: list(values) for name, values in _parse_query(raw)}


@functools.lru_cache(maxsize=4096)
def _parse_query(raw: bytes) -> tuple[tuple[str, tuple[str, ...]], ...]:
    # parse_qs on bytes raises when an escape decodes to a non-ASCII byte
    # (``%c0%ae``, or plain UTF-8 such as ``%ef%bc%8e``), which dropped the
    # connection unanswered. As latin-1 text every byte and every escape stays
    # one character; the result is then read as UTF-8, errors replaced.
    parsed = parse_qs(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return tuple((_utf8(k), tuple(_utf8(v) for v in values)) for k, values in parsed.items())


def _utf8(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "replace")


def _host_of(address: object) -> str:
    return str(getattr(address, "host", "") or "")


def _header_map(request: http.Request) -> dict[str, list[str]]:
    return {
        name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
        for name, values in request.requestHeaders.getAllRawHeaders()
    }

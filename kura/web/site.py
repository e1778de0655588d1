"""The twisted.web site of every Klein app kura serves: :class:`KuraSite`.

It holds what its requests and channels share (the gate, the store, the
clock and deadlines, the metrics, request ids, the `Date` value and egress accounting, the
upload slots and trusted proxies), builds the channels (the accelerator's
fallback takes them from :meth:`KuraSite.make_channel`) and logs one
structured access line per request
(:func:`~kura.telemetry.logs.log_access`, the one both serving paths use).
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http, server
from twisted.web.resource import IResource

from kura.config.proxies import TrustedProxies
from kura.lifecycle import NodeState
from kura.storage.interfaces import IArtifactStore
from kura.telemetry.logs import log_access
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic

from .accounting import Egress
from .channel import KuraHTTPChannel
from .dates import DateCache
from .interfaces import IGate
from .request import KuraRequest
from .request_ids import RequestIds
from .upload_slots import UploadSlots


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
    protocol = KuraHTTPChannel  # type: ignore[assignment]

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
        self.dates = DateCache()
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
        """A bare HTTP/1.1 channel for this site (the accelerator's fallback).

        ``Site.buildProtocol`` wires it to the site as twisted.web would (its
        factory, request factory, ``callLater`` and idle timeout); kura adds
        its deadlines and keeps it for draining.
        """
        channel: KuraHTTPChannel = server.Site.buildProtocol(self, None)
        channel.reactor = self.reactor
        channel.header_timeout = self.header_timeout
        channel.body_timeout = self.body_timeout
        self.channels.add(channel)
        return channel

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
            log_access(
                request.method,
                request.path,
                request.code,
                request.request_id,
                request.spec.template,
            )

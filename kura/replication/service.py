"""``ReplicationService``: the MultiService that owns the replication mesh.

:class:`PeerMesh` (who the peers are, and how to reach and trust them) is
built before storage: its membership is the store's replication targets and
the view readiness reports. :class:`ReplicationService` builds the rest from
it and the store. Construction only builds objects; work starts in
:meth:`start_serving`, which the node calls once storage is open: it opens
the internal listener (TLS when peer mTLS is configured) and starts the
membership rounds (every 2 s), the outbox worker (on every commit and every
2 s) and the bandwidth gauges (every second). Catch-ups start whenever a
round finds a known peer that is not caught up. :meth:`stopService` stops
all of it; outbox rows are safe to abandon and catch-up progress is
saved per page (a restarted node resumes it).
"""

from __future__ import annotations

import datetime
from typing import Any, cast
from urllib.parse import urlsplit

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorPluggableNameResolver,
    IReactorSSL,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kura.config import KuraConfig, ReplicationConfig
from kura.domain.failpoints import Failpoints
from kura.lifecycle import NodeState
from kura.storage.interfaces import IArtifactStore, IBlockingRunner
from kura.telemetry.load import LoadSampler, poll_timer
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic
from kura.web.admission import RouteMatch
from kura.web.site import KuraSite

from .bootstrap import Bootstrapper
from .client import PeerClient
from .digests import BodyDigests
from .internal import InternalAPI, InternalGate
from .limiter import BandwidthLimiter
from .membership import POLL_SECONDS, DnsDiscovery, Membership
from .outbox import OutboxWorker
from .peer_auth import PeerAuthenticator
from .receiver import Receiver
from .repair import Repairs
from .tls import PeerTLSPolicy, reloading_server_options

log = Logger(namespace="kura.replication")

INTERNAL_LISTENING = (
    "internal plane on {host}:{port} ({scheme}); peers: {peers}; peer authentication: {auth}"
)
INSECURE_MESH = (
    "KURA_INTERNAL_INSECURE=true: this node accepts unauthenticated peer requests; anyone "
    "who reaches port {port} can write, pin or wipe the cache"
)
UNSIGNED_WINDOW = (
    "KURA_PEER_ACCEPT_UNSIGNED_UNTIL: unsigned peer traffic is accepted until {until}; "
    "finish the rolling upgrade before then"
)
#: How often the bandwidth gauges are refreshed.
GAUGE_SECONDS = 1.0


@attrs.frozen
class PeerMesh:
    """Who the peers are, and how to reach and trust them: what exists before storage.

    Attributes:
        auth: signs and checks peer requests and responses.
        client: the treq client of peers' internal planes.
        membership: the peer view; the store's replication targets and the
            view readiness reports.
    """

    auth: PeerAuthenticator
    client: PeerClient
    membership: Membership

    @classmethod
    def build(cls, config: KuraConfig, *, reactor: IReactorTime, metrics: KuraMetrics) -> PeerMesh:
        """The mesh of ``config``: seed peers, DNS discovery, peer authentication and TLS.

        ``reactor`` also provides IReactorTCP (the peer client's connections)
        and IReactorPluggableNameResolver (DNS discovery).
        """
        settings = config.replication
        auth = PeerAuthenticator(
            settings.auth, tenant=config.tenant_id, clock=reactor, metrics=metrics
        )
        tls = settings.internal_tls
        client = PeerClient(
            reactor=IReactorTCP(reactor),
            tenant_id=config.tenant_id,
            auth=auth,
            tls_policy=(
                PeerTLSPolicy(tls, reactor, config.tls_reload_interval_ms / 1000)
                if tls is not None
                else None
            ),
        )
        discovery = None
        if settings.discovery_dns_name:
            node = urlsplit(config.node_url)
            discovery = DnsDiscovery(
                IReactorPluggableNameResolver(reactor).nameResolver,
                settings.discovery_dns_name,
                node.scheme,
                node.port or config.internal_port,
            )
        membership = Membership(
            clock=reactor,
            client=client,
            node_url=config.node_url,
            tenant_id=config.tenant_id,
            seeds=settings.peers,
            discovery=discovery,
            metrics=metrics,
        )
        return cls(auth=auth, client=client, membership=membership)


class ReplicationService(MultiService):
    """Owns the internal plane, outbox delivery, catch-up, the limiter and membership rounds.

    Args:
        config: the node configuration (``config.replication`` above all).
        reactor: the reactor: timers, and the listener (IReactorTCP, or
            IReactorSSL with peer mTLS).
        peers: the mesh built before the store (:meth:`PeerMesh.build`).
        store: the node's store (its replication targets are ``peers.membership``).
        state: the node's state (status report; readiness reads membership).
        metrics: the node's metrics.
        traffic: public load, which the limiter backs off against.
        runner: blocking disk work.
        failpoints: the node's crash points (the outbox passes one).
    """

    def __init__(
        self,
        *,
        config: KuraConfig,
        reactor: IReactorTime,
        peers: PeerMesh,
        store: IArtifactStore,
        state: NodeState,
        metrics: KuraMetrics,
        traffic: PublicTraffic,
        runner: IBlockingRunner,
        failpoints: Failpoints,
    ) -> None:
        super().__init__()
        settings = config.replication
        self.config = config
        self.reactor = reactor
        self.store = store
        self.metrics = metrics
        self.limiter = BandwidthLimiter(
            clock=reactor,
            traffic=traffic,
            configured_bytes_per_second=settings.bandwidth_limit_bytes_per_second,
            latency_target_ms=settings.public_latency_target_ms,
            floor_bytes_per_second=settings.min_bytes_per_second,
            busy_utilisation=settings.busy_cpu_percent / 100,
        )
        # The CPU signal the limiter's share follows (see limiter.py).
        self.load = LoadSampler(clock=reactor, traffic=traffic, demand=poll_timer(reactor))
        self.load.listeners.append(self.limiter.observe)
        load = self.load
        metrics.reactor_utilisation.set_function(
            lambda: 0.0 if load.last is None else load.last.utilisation
        )
        self.auth = peers.auth
        self.client = peers.client
        self.membership = peers.membership
        self.digests = BodyDigests(runner)
        self.receiver = Receiver(
            store=store,
            metrics=metrics,
            limiter=self.limiter,
            runner=runner,
            clock=reactor,
            max_inline_bytes=config.max_keyvalue_bytes,
            max_clock_skew_ms=settings.auth.max_clock_skew_ms,
        )
        self.api = InternalAPI(
            config=config,
            store=store,
            state=state,
            receiver=self.receiver,
            limiter=self.limiter,
            auth=self.auth,
            digests=self.digests,
            metrics=metrics,
            runner=runner,
            clock=reactor,
        )
        self.gate = InternalGate(
            routes=RouteMatch(self.api.app.url_map, self.api.specs),
            rules=self.api.head_rules,
            receiver=self.receiver,
            auth=self.auth,
            node_tenant=config.tenant_id,
        )
        # A peer upload that makes no progress this long is cut, in both directions.
        stall_seconds = settings.upload_stall_ms / 1000
        self.site = KuraSite(
            self.api.resource(),
            gate=self.gate,
            store=store,
            state=state,
            metrics=metrics,
            traffic=traffic,
            reactor=reactor,
            header_timeout=config.header_timeout_ms / 1000,
            idle_timeout=config.keepalive_idle_timeout_ms / 1000,
            send_timeout=stall_seconds,
        )
        self.outbox = OutboxWorker(
            store=store,
            client=self.client,
            membership=self.membership,
            limiter=self.limiter,
            clock=reactor,
            metrics=metrics,
            runner=runner,
            digests=self.digests,
            failpoints=failpoints,
            stall_seconds=stall_seconds,
        )
        self.bootstrap = Bootstrapper(
            store=store,
            client=self.client,
            membership=self.membership,
            receiver=self.receiver,
            limiter=self.limiter,
            clock=reactor,
            metrics=metrics,
            max_concurrent_peers=settings.bootstrap_max_concurrent_peers,
            timeout_seconds=settings.bootstrap_timeout_ms / 1000,
            stall_seconds=stall_seconds,
            max_inline_bytes=config.max_keyvalue_bytes,
            max_clock_skew_ms=settings.auth.max_clock_skew_ms,
        )
        self.repairs = Repairs(
            bootstrap=self.bootstrap, membership=self.membership, metrics=metrics
        )
        # Rows a write just committed are delivered at once, not at the next round.
        store.add_commit_listener(self.outbox.poke)
        self.membership.listeners.append(self._topology_changed)
        self._rounds = LoopingCall(self._round)
        self._rounds.clock = reactor
        self._round_d: Deferred[None] | None = None
        self._gauges = LoopingCall(self.limiter.publish, metrics)
        self._gauges.clock = reactor
        self._serving = False
        view = self.membership
        metrics.bootstrap_known_peers.set_function(lambda: float(len(view.known_peers)))
        metrics.bootstrap_completed_peers.set_function(lambda: float(len(view.bootstrapped_peers)))
        metrics.bootstrap_inflight_peers.set_function(
            lambda: float(len(view.bootstrap_inflight_peers))
        )
        self.limiter.publish(metrics)

    # -- start and stop --------------------------------------------------------------------

    def start_serving(self) -> IListeningPort:
        """Open the internal listener and start the workers (storage must be open).

        The listener binds ``KURA_INTERNAL_BIND_HOST`` (loopback on a node
        without peers).
        """
        settings = self.config.replication
        host = self.config.internal_bind_host
        tls = settings.internal_tls
        if tls is not None:
            options = reloading_server_options(
                tls,
                settings.auth.tls_peer_names,
                self.reactor,
                self.config.tls_reload_interval_ms / 1000,
            )
            port: IListeningPort = IReactorSSL(self.reactor).listenSSL(
                self.config.internal_port,
                self.site,
                options,  # type: ignore[arg-type]  # IOpenSSLServerConnectionCreator is accepted
                interface=host,
            )
        else:
            # listenTCP is annotated with a bare ServerFactory (of the default
            # protocol type); a Site's factory type is invariant in its protocol.
            factory = cast("ServerFactory", self.site)
            port = IReactorTCP(self.reactor).listenTCP(
                self.config.internal_port, factory, interface=host
            )
        address: Any = port.getHost()
        log.info(
            INTERNAL_LISTENING,
            host=host,
            port=getattr(address, "port", self.config.internal_port),
            scheme="https, client certificates required" if tls else "http",
            peers=", ".join(settings.peers) or "none",
            auth=settings.peer_auth_mode,
        )
        warn_if_insecure(settings, self.config.internal_port)
        self._serving = True
        self.outbox.start()
        self._rounds.start(POLL_SECONDS, now=True)
        self._gauges.start(GAUGE_SECONDS, now=True)
        self.load.start()
        return port

    def _round(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._poll())
        self._round_d = None if d.called else d
        return d

    async def _poll(self) -> None:
        try:
            await self.membership.poll()
        except CancelledError:
            return
        except Exception:
            log.failure("membership round failed")
        finally:
            self._round_d = None
        self.bootstrap.kick()

    def _topology_changed(self) -> None:
        self.bootstrap.kick()
        self.outbox.wake()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._serving:
            self._serving = False
            for loop in (self._rounds, self._gauges):
                if loop.running:
                    loop.stop()
            self.load.stop()
            if self._round_d is not None:
                self._round_d.cancel()
            await self.outbox.stop()
            await self.repairs.stop()
            await self.bootstrap.stop()
            await self.client.close()
        await super().stopService()


def warn_if_insecure(settings: ReplicationConfig, port: int) -> None:
    """The start-up warnings of explicitly unsafe peer settings."""
    auth = settings.auth
    if auth.insecure:
        log.warn(INSECURE_MESH, port=port)
    if auth.accept_unsigned_until_ms is not None:
        until = datetime.datetime.fromtimestamp(auth.accept_unsigned_until_ms / 1000, datetime.UTC)
        log.warn(UNSIGNED_WINDOW, until=until.isoformat())

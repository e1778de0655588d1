"""The node: every component wired together under one ``MultiService``.

Construction only builds objects. :meth:`KuraNode.startService` takes the
writer lock, opens storage (the metadata store; stale staging is set aside
with one rename) and then opens the listeners, so nothing is served from a
half-open store, and start-up does not scale with the store: orphaned blobs
and stale staging are removed afterwards by a paced background sweep
(:mod:`kura.storage.sweep`), and ``/ready`` says ``store scan in progress``
until it ends.
:meth:`KuraNode.stopService` stops accepting, lets in-flight work finish,
flushes storage and releases the lock.
"""

from __future__ import annotations

import time
from typing import Any, cast

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from twisted.application.service import MultiService
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorFromThreads,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from kura import __version__
from kura.accel.accelerator import Accelerator, AcceleratorSettings, Collaborators
from kura.accel.classify import Classifier
from kura.accel.engine import KernelTransferEngine
from kura.accel.protocol import SamePortFactory
from kura.api.app import PublicAPI
from kura.api.authorization import RequestAuthorization
from kura.api.gate import Gate
from kura.auth import build_authorizer
from kura.config import KuraConfig
from kura.domain.artifacts import Manifest
from kura.domain.failpoints import Failpoints
from kura.lifecycle import NodeState
from kura.memory import MemoryMonitor
from kura.objectstore.client import S3Store, connect
from kura.objectstore.tier import ObjectTier
from kura.reapi.server import GrpcListener, ReapiServer, ReloadingGrpcCredentials
from kura.replication.service import PeerMesh, ReplicationService
from kura.scrub import ScrubService, state_path
from kura.storage.interfaces import IBlockingRunner
from kura.storage.layout import Layout
from kura.storage.lock import WriterLock, WriterLockHeld
from kura.storage.runner import ThreadPoolRunner
from kura.storage.staging import TmpBudget
from kura.storage.store import CORRUPT, WRONG_SIZE, ArtifactStore
from kura.storage.sweep import PAUSE, StartupSweep, Stopped
from kura.storage.tombstones import TombstoneSweeper
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic
from kura.tls import public_https_options
from kura.web.admission import RouteMatch
from kura.web.site import KuraSite
from kura.web.upload_slots import UploadSlots

log = Logger(namespace="kura.node")

#: How often the retention age gauge is refreshed.
RETENTION_SAMPLE_SECONDS = 60.0
#: Seconds between two calls that give free database pages back (each gives
#: at most :data:`~kura.storage.store.FREE_SPACE_PER_CALL`: ~2 MB/s at most,
#: ~1.2 % of a storage thread while there is a backlog, nothing otherwise).
FREE_SPACE_SECONDS = 1.0

NODE_STARTED = "kura {version} serving tenant {tenant_id} on public port {port}"
WRITER_LOCK_FAILED = "{message}"
LISTEN_BACKLOG = 1024
OPEN_MODE = (
    "open mode: no tokens and no extension guard the public port; anyone who reaches it "
    "can read and write artifacts (cleans and deletes: {deletes}). Set KURA_AUTH_TOKENS_FILE "
    "or KURA_AUTH_WRITE_TOKENS, or an extension, to close it"
)
ACCESS_MODE = "public port guarded by {mode}"
DRAIN_DEADLINE = "drain deadline passed with {count} public transfers in flight; cutting them off"
#: The readiness reason while the start-up sweep runs.
STORE_SCAN = "store scan in progress"


def process_registry() -> CollectorRegistry:
    """A node's registry: kura's metrics go on it, next to the standard
    ``process_*`` (CPU, memory, descriptors) and ``python_*`` (version, GC)
    collectors every Python exporter has."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class KuraNode(MultiService):
    """One kura node (see the module docstring).

    Args:
        config: the validated configuration.
        reactor: the reactor everything runs on (injected for tests): its
            time (IReactorTime) for every part of the node, and
            IReactorCore, IReactorTCP, IReactorSSL and
            IReactorPluggableNameResolver for the node's own calls, as a real
            reactor and ``MemoryReactorClock`` provide; the default runner
            also needs IReactorFromThreads.
        registry: the Prometheus registry (a fresh one by default).
        runner: where blocking disk work runs (a bounded thread pool by
            default; tests pass an inline runner).
        object_store: the object-store client when ``KURA_OBJECT_STORE_URL``
            is set (built from the configuration and the AWS credential
            chain by default; tests pass an in-memory one). With an injected
            ``runner`` the tier's requests run on it too, else on the tier's
            own threads.

    Raises:
        ObjectStoreSetupError: the object-store tier is configured but no
            AWS credentials were found (the node must not start).
    """

    def __init__(
        self,
        config: KuraConfig,
        reactor: IReactorTime,
        registry: CollectorRegistry | None = None,
        runner: IBlockingRunner | None = None,
        object_store: S3Store | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = KuraMetrics(registry or process_registry())
        self.pool: ThreadPool | None = None
        if runner is None:
            self.pool = ThreadPool(
                minthreads=1, maxthreads=config.storage_threads, name="kura-storage"
            )
            runner = ThreadPoolRunner(IReactorFromThreads(reactor), self.pool)
        self.runner: IBlockingRunner = runner
        self.lock = WriterLock(config.data_dir)
        failpoints = Failpoints(config.failpoints)
        # Before the store: the membership is its replication targets.
        self.peers = PeerMesh.build(config, reactor=reactor, metrics=self.metrics)
        # Before the store too: the tier's upload queue hears of every client write.
        self.object_tier: ObjectTier | None = None
        if config.object_store.enabled:
            self.object_tier = ObjectTier(
                config=config.object_store,
                client=object_store or connect(config.object_store),
                reactor=reactor,
                metrics=self.metrics,
                runner=None if self.pool is not None else runner,
            )
        self.store = ArtifactStore(
            layout=Layout(config.data_dir, config.tmp_dir),
            runner=self.runner,
            clock=reactor,
            node_tenant=config.tenant_id,
            capacity_bytes=config.cas_capacity_bytes,
            tmp_budget=TmpBudget(config.tmp_dir_max_bytes),
            manifest_cache_bytes=config.manifest_cache_max_bytes,
            memory_body_bytes=config.memory_body_max_bytes,
            body_cache_bytes=config.body_cache_max_bytes,
            failpoints=failpoints,
            max_unfinished_uploads=config.multipart_max_unfinished,
            replication_targets=self.peers.membership,
            on_evicted=self._count_eviction,
            on_damaged=self._damaged,
            write_hooks=None if self.object_tier is None else self.object_tier.queue,
        )
        if self.object_tier is not None:
            self.object_tier.attach(
                self.store,
                self.runner,
                failpoints,
                max_clock_skew_ms=config.replication.auth.max_clock_skew_ms,
            )
        self.traffic = PublicTraffic(reactor, self.metrics)
        self.authorizer = build_authorizer(
            config.extension, reactor=reactor, metrics=self.metrics, access=config.access
        )
        self.memory = MemoryMonitor(
            soft_bytes=config.memory_soft_limit_bytes,
            hard_bytes=config.memory_hard_limit_bytes,
            clock=reactor,
            metrics=self.metrics,
            on_critical=[
                ("manifest_cache_drop", self.store.drop_manifest_cache),
                ("body_cache_drop", self.store.bodies.clear),
                ("extension_cache_drop", self.authorizer.clear_caches),
            ],
        )
        self.state = NodeState(
            config=config,
            clock=reactor,
            metrics=self.metrics,
            traffic=self.traffic,
            outbox_depth=lambda: self.store.outbox_depth,
            membership=self.peers.membership,
            memory=self.memory,
            access_mode=self.authorizer.mode,
        )
        self.replication = ReplicationService(
            config=config,
            reactor=reactor,
            peers=self.peers,
            store=self.store,
            state=self.state,
            metrics=self.metrics,
            traffic=self.traffic,
            runner=self.runner,
            failpoints=failpoints,
        )
        self.replication.setServiceParent(self)
        self.scrub = ScrubService(
            store=self.store,
            runner=self.runner,
            clock=reactor,
            metrics=self.metrics,
            bytes_per_second=config.scrub_bytes_per_second,
            interval_seconds=config.scrub_interval_ms / 1000,
            state_path=state_path(config.data_dir),
        )
        self.scrub.setServiceParent(self)
        self.authorization = RequestAuthorization(self.authorizer, config.tenant_id)
        self.api = PublicAPI(
            config=config,
            store=self.store,
            state=self.state,
            metrics=self.metrics,
            runner=self.runner,
            authorization=self.authorization,
            read_through=None if self.object_tier is None else self.object_tier.fetch,
        )
        self.gate = Gate(
            routes=RouteMatch(self.api.app.url_map, self.api.specs),
            store=self.store,
            state=self.state,
            node_tenant=config.tenant_id,
            outbox_max_depth=config.replication.outbox_max_depth,
            authorization=self.authorization,
        )
        self.site = KuraSite(
            self.api.resource(),
            gate=self.gate,
            store=self.store,
            state=self.state,
            metrics=self.metrics,
            traffic=self.traffic,
            reactor=reactor,
            header_timeout=config.header_timeout_ms / 1000,
            idle_timeout=config.keepalive_idle_timeout_ms / 1000,
            send_timeout=config.send_timeout_ms / 1000,
            body_timeout=config.body_timeout_ms / 1000,
            upload_slots=UploadSlots(config.max_uploads_per_client),
            trusted_proxies=config.trusted_proxies,
            access_log=config.access_log,
        )
        self.accel_pool = ThreadPool(
            minthreads=0, maxthreads=config.accelerator.max_concurrent, name="kura-accel"
        )
        accelerator_settings = AcceleratorSettings.from_config(config)
        self.accelerator = Accelerator(
            accelerator_settings,
            Collaborators(
                site=self.site,
                authorization=self.authorization,
                classifier=Classifier(self.gate.routes, config.tenant_id),
                store=self.store,
                state=self.state,
                traffic=self.traffic,
                metrics=self.metrics,
                reactor=reactor,
            ),
            KernelTransferEngine.from_settings(
                # Only a worker thread calls back through it: a real reactor
                # provides it, and in-memory nodes never send from a thread.
                accelerator_settings,
                reactor=cast(IReactorFromThreads, reactor),
                pool=self.accel_pool,
            ),
        )
        # REAPI v2 over gRPC on its own port (kura.reapi; docs/architecture.md).
        self.grpc: GrpcListener | None = None
        if config.grpc.enabled:
            self.reapi = ReapiServer(
                store=self.store,
                state=self.state,
                authorization=self.authorization,
                metrics=self.metrics,
                reactor=cast(IReactorFromThreads, reactor),
                config=config.grpc,
                node_tenant=config.tenant_id,
                outbox_max_depth=config.replication.outbox_max_depth,
                read_through=None if self.object_tier is None else self.object_tier.fetch,
            )
            grpcs = (
                None
                if config.public_tls is None
                else ReloadingGrpcCredentials(
                    config.public_tls, reactor, config.tls_reload_interval_ms / 1000
                )
            )
            self.grpc = GrpcListener(self.reapi, config.grpc, grpcs)
            self.state.grpc_inflight = lambda: self.reapi.inflight
        self.ports: dict[str, IListeningPort] = {}

        self.started: Deferred[None] = Deferred()
        self.sweep: StartupSweep | None = None
        #: Fires when the start-up sweep ended (removed everything, failed or stopped).
        self.swept: Deferred[None] = Deferred()
        self._janitor = LoopingCall(lambda: Deferred.fromCoroutine(self._expire_uploads()))
        self._janitor.clock = reactor
        self._retention = LoopingCall(lambda: Deferred.fromCoroutine(self._sample_retention()))
        self._retention.clock = reactor
        self._space = LoopingCall(lambda: Deferred.fromCoroutine(self._return_free_space()))
        self._space.clock = reactor
        self._space_failing = False
        self.tombstones = TombstoneSweeper(
            store=self.store,
            clock=reactor,
            retention_ms=config.replication.tombstone_retention_ms,
            on_purged=self.metrics.artifact_tombstones_purged.inc,
            on_count=self.metrics.artifact_tombstones.set,
        )
        self._init_metrics()

    def _init_metrics(self) -> None:
        m = self.metrics
        m.node_info.labels(self.config.region, self.config.tenant_id).set(1)
        m.process_start_time.set(time.time())
        m.cas_capacity_bytes.set(self.config.cas_capacity_bytes)
        m.tmp_dir_max_bytes.set(self.config.tmp_dir_max_bytes)
        m.cas_used_bytes.set_function(lambda: float(self.store.metadata.used_bytes))
        m.tmp_dir_bytes.set_function(lambda: float(self.store.tmp_budget.used))
        m.verified_files.set_function(lambda: float(len(self.store.verifier)))
        m.outbox_messages.set_function(lambda: float(self.store.outbox_depth))
        # From the store's count, which survives restarts (the rows do).
        m.multipart_uploads.set_function(lambda: float(self.store.unfinished_uploads))

    def _count_eviction(self, producer: str, size: int) -> None:
        self.metrics.evicted_artifacts.labels(producer).inc()
        self.metrics.evicted_bytes.inc(size)

    def _damaged(self, manifest: Manifest, reason: str) -> None:
        """An artifact was forgotten as damaged: count it, and ask the peers for it again.

        Only a body that is there but wrong (corrupt, or of another size) is
        fetched again: a missing file may be an eviction racing a read, which
        must not bring the artifact back.
        """
        self.metrics.damaged_artifacts.inc()
        if reason == CORRUPT:
            self.metrics.corrupt_artifacts.inc()
        if reason in (CORRUPT, WRONG_SIZE):
            self.replication.repairs.request(manifest)

    # -- lifecycle -----------------------------------------------------------------

    def startService(self) -> None:
        try:
            self.lock.acquire()
        except WriterLockHeld as error:
            log.critical(WRITER_LOCK_FAILED, message=str(error))
            raise SystemExit(f"kura: {error}") from None
        self.state.writer_lock_owned = True
        super().startService()
        if self.pool is not None:
            self.pool.start()
        self.accel_pool.start()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._start_failed)

    async def _start(self) -> None:
        await self.store.start()
        if self.object_tier is not None:
            await self.object_tier.start()
            tier = self.object_tier
            self.state.object_store_uploads = lambda: tier.queue.depth
        self.state.hold(STORE_SCAN)
        self._listen()
        # Only once the listeners are open (stopping waits for a sweep that started).
        # With an injected (inline) runner the sweep runs inline too: no pauses.
        self.sweep = self.store.startup_sweep(pause=PAUSE if self.pool is not None else 0)
        Deferred.fromCoroutine(self._sweep(self.sweep))
        self.scrub.begin()
        self.accelerator.log_settings()
        self._log_access_mode()
        self.authorizer.start()  # JWKS key fetches (readiness does not wait)
        self._janitor.start(self.config.multipart_janitor_interval_ms / 1000, now=True)
        self._retention.start(RETENTION_SAMPLE_SECONDS, now=True)
        if self.store.metadata.space.returns_free_pages:
            self._space.start(FREE_SPACE_SECONDS, now=False)
        self.tombstones.start()
        self.memory.start()
        log.info(
            NODE_STARTED,
            version=__version__,
            tenant_id=self.config.tenant_id,
            port=self.public_port,
        )
        self.started.callback(None)

    async def _sweep(self, sweep: StartupSweep) -> None:
        """Run the start-up sweep; readiness is held until it ends."""
        try:
            await sweep.run()
        except Stopped:
            pass
        except Exception:
            log.failure("start-up sweep failed; orphans stay until the next start")
        finally:
            self.state.release(STORE_SCAN)
            self.swept.callback(None)

    def _log_access_mode(self) -> None:
        """Say how the public port is guarded; open mode is a warning at every start."""
        mode = self.authorizer.mode
        if mode == "open":
            log.warn(
                OPEN_MODE,
                deletes="allowed (KURA_ALLOW_ANONYMOUS_DELETE)"
                if self.config.access.allow_anonymous_delete
                else "refused",
            )
        else:
            log.info(ACCESS_MODE, mode=mode)

    def _start_failed(self, failure: Any) -> None:
        log.failure("kura failed to start", failure)
        self.started.errback(failure)
        core = IReactorCore(self.reactor)
        if core.running:
            core.stop()

    def _listen(self) -> None:
        host = self.config.bind_host
        # A deep accept queue: with Twisted's default of 50, a burst of
        # connects (a CI fleet starting its builds) waits for SYN retries.
        self.ports["public"] = IReactorTCP(self.reactor).listenTCP(
            self.config.port, self.public_factory(), backlog=LISTEN_BACKLOG, interface=host
        )
        if self.config.public_tls is not None:
            options = public_https_options(
                self.config.public_tls, self.reactor, self.config.tls_reload_interval_ms / 1000
            )
            self.ports["https"] = IReactorSSL(self.reactor).listenSSL(
                self.config.https_port,
                self.site,
                options,  # type: ignore[arg-type]  # IOpenSSLServerConnectionCreator is accepted
                interface=host,
            )

        # The internal plane; its workers start now that storage is open.
        self.ports["internal"] = self.replication.start_serving()
        if self.grpc is not None:
            self.grpc.start(host)

    def public_factory(self) -> Any:
        """The protocol factory of the plain public port: the same-port accelerator."""
        return SamePortFactory(self.accelerator)

    @property
    def public_port(self) -> int:
        address: Any = self.ports["public"].getHost()
        return int(address.port)

    async def _sample_retention(self) -> None:
        """Refresh ``kura_cas_retention_age_seconds`` (one indexed SQLite read)."""
        try:
            oldest = await self.store.oldest_access_ms()
        except Exception:
            log.failure("sampling the retention age failed")
            return
        age = 0.0 if oldest is None else max(0.0, self.reactor.seconds() - oldest / 1000)
        self.metrics.cas_retention_age.set(age)

    async def _return_free_space(self) -> None:
        """Give a bounded share of the database's free pages back to the filesystem.

        A failure (a full disk: moving pages needs room in the WAL) is
        logged once until a call succeeds again, not every second.
        """
        try:
            returned = await self.store.return_free_space()
        except Exception:
            if not self._space_failing:
                log.failure("returning the database's free space failed (retried every second)")
            self._space_failing = True
            return
        if self._space_failing:
            log.info("returning the database's free space works again")
        self._space_failing = False
        self.metrics.database_space_returned_bytes.inc(returned)

    async def _expire_uploads(self) -> None:
        expired = await self.store.expire_uploads(self.config.multipart_upload_ttl_ms)
        if expired:
            log.info("expired {count} unfinished multipart uploads", count=expired)

    def drain(self) -> None:
        """Stop taking new public work (SIGUSR1); ``/ready`` turns 503 at once."""
        if not self.state.draining:
            log.info("draining: new public requests get 503")
            self.state.start_draining()
            self.accelerator.close_idle()
            self.site.drain()

    def shutdown(self) -> Deferred[None]:
        """Drain, wait for in-flight public transfers (bounded), then stop the reactor."""
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        self.drain()
        idle = self.traffic.when_idle()
        idle.addTimeout(self.config.drain_completion_timeout_ms / 1000, self.reactor)
        try:
            await idle
        except defer.TimeoutError:
            log.warn(DRAIN_DEADLINE, count=self.traffic.inflight)
            self.accelerator.cut_off()
            self.site.cut_off()
        IReactorCore(self.reactor).stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for loop in (self._janitor, self._retention, self._space):
            if loop.running:
                loop.stop()
        self.tombstones.stop()
        self.memory.stop()
        await self.authorizer.close()
        if self.grpc is not None:
            # RPCs in flight finish (they need the reactor, still running here).
            grace = self.config.drain_completion_timeout_ms / 1000
            stopped = self.grpc.stop(grace)
            pool = IReactorThreads(self.reactor).getThreadPool()
            await threads.deferToThreadPool(
                cast(IReactorFromThreads, self.reactor), pool, stopped.wait, grace + 5
            )
        await DeferredList([maybeDeferred(p.stopListening) for p in self.ports.values()])
        self.ports.clear()
        await super().stopService()
        if self.sweep is not None:
            # It reads the metadata store: it must end before the store closes.
            self.sweep.stop()
            await self.swept
        if self.object_tier is not None:
            await self.object_tier.stop()
        if self.state.writer_lock_owned:
            await self.store.stop()
            if self.pool is not None:
                self.pool.stop()
            self.accel_pool.stop()
            self.lock.release()
            self.state.writer_lock_owned = False

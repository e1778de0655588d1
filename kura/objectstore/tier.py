"""The object-store tier of one node: its threads, queue, read-through and follower.

Built by the node when ``KURA_OBJECT_STORE_URL`` is set
(:class:`kura.service.KuraNode`). The :class:`UploadQueue` is made first,
because the artifact store takes it as its write hooks; the rest is made
once the store exists (:meth:`ObjectTier.attach`).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.threadpool import ThreadPool

from kura.config.objectstore import ObjectStoreConfig
from kura.domain.artifacts import ArtifactAddress, Manifest
from kura.domain.failpoints import Failpoints
from kura.objectstore.calls import StoreCalls
from kura.objectstore.client import S3Store
from kura.objectstore.queue import Uploader, UploadQueue
from kura.objectstore.readthrough import ReadThrough
from kura.objectstore.tombstones import TombstoneFollower
from kura.storage.interfaces import IBlockingRunner
from kura.storage.runner import ThreadPoolRunner
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics


class ObjectTier:
    """The tier's parts for one node.

    Args:
        config: the tier's settings.
        client: the blocking S3 client (:func:`kura.objectstore.client.connect`).
        reactor: time, and the hop back from the tier's threads.
        metrics: the node's metrics.
        runner: where store requests run; the tier's own thread pool by
            default (deterministic tests pass an inline runner).

    Attributes:
        queue: the store's write hooks (pass it to the artifact store).
        pool: the tier's own threads (every store request runs there), unless
            a runner was given.
    """

    def __init__(
        self,
        *,
        config: ObjectStoreConfig,
        client: S3Store,
        reactor: IReactorTime,
        metrics: KuraMetrics,
        runner: IBlockingRunner | None = None,
    ) -> None:
        self.config = config
        self.queue = UploadQueue(config.upload_queue_max)
        self.pool: ThreadPool | None = None
        if runner is None:
            self.pool = ThreadPool(minthreads=0, maxthreads=config.threads, name="kura-objectstore")
            runner = ThreadPoolRunner(IReactorFromThreads(reactor), self.pool)
        self.calls = StoreCalls(client, runner, reactor, metrics)
        self._reactor = reactor
        self._metrics = metrics
        self.uploader: Uploader | None = None
        self.read_through: ReadThrough | None = None
        self.follower: TombstoneFollower | None = None
        metrics.object_store_uploads.set_function(lambda: float(self.queue.depth))

    def attach(
        self,
        store: ArtifactStore,
        storage: IBlockingRunner,
        failpoints: Failpoints,
        max_clock_skew_ms: int,
    ) -> None:
        """Build the parts that work on ``store`` (built with :attr:`queue` as its hooks).

        ``max_clock_skew_ms`` bounds how far ahead an object's version may be
        (``KURA_MAX_CLOCK_SKEW_MS``, as for replicated writes).
        """
        prefix = self.config.prefix or ""
        self.uploader = Uploader(
            store=store,
            queue=self.queue,
            calls=self.calls,
            prefix=prefix,
            storage=storage,
            clock=self._reactor,
            failpoints=failpoints,
        )
        results = self._metrics.object_store_read_through
        self.read_through = ReadThrough(
            store=store,
            calls=self.calls,
            prefix=prefix,
            storage=storage,
            clock=self._reactor,
            deadline_seconds=self.config.read_deadline_ms / 1000,
            max_clock_skew_ms=max_clock_skew_ms,
            on_result=lambda result: results.labels(result).inc(),
        )
        self.follower = TombstoneFollower(
            store=store,
            calls=self.calls,
            prefix=prefix,
            clock=self._reactor,
            interval_seconds=self.config.tombstone_poll_ms / 1000,
            metrics=self._metrics,
        )

    async def fetch(self, address: ArtifactAddress) -> Manifest | None:
        """Read a local miss through (see :class:`ReadThrough`); ``None`` is a miss."""
        assert self.read_through is not None
        return await self.read_through.fetch(address)

    async def start(self) -> None:
        """Start the threads, the uploader and the follower (the store is open)."""
        assert self.uploader is not None and self.follower is not None
        if self.pool is not None:
            self.pool.start()
        await self.uploader.start()
        self.follower.start()

    async def stop(self) -> None:
        """Stop polling and uploading (rows left stay queued), then the threads."""
        if self.follower is not None:
            self.follower.stop()
        if self.uploader is not None:
            await self.uploader.stop()
        if self.pool is not None:
            self.pool.stop()

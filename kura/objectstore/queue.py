"""The durable upload queue: client writes and deletes on their way to the store.

The same discipline as the replication outbox (:mod:`kura.replication.outbox`):

* a row per client write or delete is written in the metadata transaction
  that publishes it (:class:`UploadQueue`, the store's
  :class:`~kura.storage.interfaces.IWriteHooks`), so nothing acknowledged
  can miss the store, crashes and restarts included;
* :class:`Uploader` puts rows in the store and deletes a row only after the
  store answered; a failure moves that row's turn on and pauses the worker
  (backoff doubling from 1 s to 60 s, with jitter), so a store that is down
  costs one request per backoff, not one per row;
* the queue is bounded: at ``KURA_OBJECT_STORE_UPLOAD_QUEUE_MAX`` rows new
  writes are refused with a 503 (:class:`UploadQueueFull`) rather than
  accepted and never uploaded;
* while a row names an artifact, eviction keeps it
  (:meth:`~kura.storage.metadata.MetadataStore.evict`).

A row names a version, not bytes: when it comes up, the artifact's current
manifest is read, and a row whose version is no longer stored (replaced or
deleted since) is dropped; the newer write or the delete has its own row.
Deletes run alone, after every row queued before them has finished, so a
delete never races the upload it must win over.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Sequence
from typing import cast

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kura.domain.artifacts import Manifest
from kura.domain.errors import ServiceUnavailable
from kura.domain.failpoints import AFTER_OBJECT_UPLOAD_BEFORE_DEQUEUE, Failpoints
from kura.objectstore import naming
from kura.objectstore.calls import StoreCalls
from kura.objectstore.client import ObjectMissing
from kura.storage.interfaces import IBlockingRunner, IWriteHooks
from kura.storage.metadata import (
    UPLOAD_ARTIFACT,
    UPLOAD_DELETE_ARTIFACT,
    UPLOAD_DELETE_NAMESPACE,
    ArtifactTombstone,
    ObjectUpload,
    enqueue_object_upload,
)
from kura.storage.store import ArtifactStore

log = Logger(namespace="kura.objectstore")

UPLOAD_FAILED = (
    "object-store upload of {kind} {artifact} failed ({error}); retrying in {delay:.1f}s"
)

#: Rows taken per pass.
BATCH = 64
#: The worker also wakes this often (postponed rows come due).
IDLE_POLL_SECONDS = 1.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0


class UploadQueueFull(ServiceUnavailable):
    """The upload queue is at its cap: the write is refused, nothing was stored."""


@implementer(IWriteHooks)
class UploadQueue:
    """Queues every client write and delete, in its own transaction (see the module docstring).

    Args:
        cap: the most rows the queue holds (``KURA_OBJECT_STORE_UPLOAD_QUEUE_MAX``).

    Attributes:
        depth: rows in the queue. Changed only inside commits, which run one
            at a time on the writer connection: counted up as rows are
            queued, and recounted in the transaction that deletes uploaded
            rows (so a write whose transaction failed after its row was
            counted is corrected there).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.depth = 0

    def _enqueue(
        self,
        conn: sqlite3.Connection,
        kind: str,
        artifact_id: str,
        namespace: str,
        version: int,
        now_ms: int,
    ) -> None:
        if self.depth >= self.cap:
            raise UploadQueueFull(
                f"object-store upload queue is full ({self.depth} writes waiting); retry later"
            )
        enqueue_object_upload(conn, kind, artifact_id, namespace, version, now_ms)
        self.depth += 1

    def artifact_written(self, conn: sqlite3.Connection, manifest: Manifest, now_ms: int) -> None:
        self._enqueue(
            conn,
            UPLOAD_ARTIFACT,
            manifest.artifact_id,
            manifest.namespace_id,
            manifest.version_ms,
            now_ms,
        )

    def namespace_deleted(
        self, conn: sqlite3.Connection, namespace_id: str, version_ms: int, now_ms: int
    ) -> None:
        self._enqueue(conn, UPLOAD_DELETE_NAMESPACE, "", namespace_id, version_ms, now_ms)

    def artifact_deleted(
        self, conn: sqlite3.Connection, tombstone: ArtifactTombstone, now_ms: int
    ) -> None:
        self._enqueue(
            conn,
            UPLOAD_DELETE_ARTIFACT,
            tombstone.artifact_id,
            tombstone.namespace_id,
            tombstone.version_ms,
            now_ms,
        )


class Uploader:
    """Drains the upload queue into the store (see the module docstring).

    Args:
        store: the node's artifact store (manifests, bodies, commits).
        queue: the queue's hooks (its depth).
        calls: metered store requests.
        prefix: the key prefix in the bucket.
        storage: the storage threads (metadata reads).
        clock: schedules passes and backoffs.
        failpoints: crash points (``after_object_upload_before_dequeue``).
        jitter: a number in [0, 1) (injected for tests).
    """

    def __init__(
        self,
        *,
        store: ArtifactStore,
        queue: UploadQueue,
        calls: StoreCalls,
        prefix: str,
        storage: IBlockingRunner,
        clock: IReactorTime,
        failpoints: Failpoints | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._failpoints = failpoints or Failpoints()
        self._queue = queue
        self._calls = calls
        self._prefix = prefix
        self._storage = storage
        self._clock = clock
        self._jitter = jitter
        self._failures = 0
        self._running: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._stopped = True
        #: Rows put in the store (tests and benchmarks read it).
        self.uploaded = 0

    async def start(self) -> None:
        """Count the queue left by the last run and begin draining it."""
        self._queue.depth = await self._storage.run(self._store.metadata.object_upload_count)
        self._stopped = False
        self._store.add_commit_listener(self.wake)
        self._schedule(0)

    async def stop(self) -> None:
        """Stop taking rows; returns once the pass in progress (if any) ended."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._running is not None:
            await self._running

    def wake(self) -> None:
        """New rows may be there (a commit): pass now, unless busy or backing off."""
        if self._failures == 0 and self._running is None:
            self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._begin)

    def _begin(self) -> None:
        if self._running is not None or self._stopped:
            return
        self._running = Deferred.fromCoroutine(self._pass())

        def ended(_: object) -> None:
            self._running = None

        self._running.addBoth(ended)

    async def _pass(self) -> None:
        try:
            rows = await self._storage.run(
                self._store.metadata.object_uploads_due, self._store.now_ms(), BATCH
            )
            done, failed = await self._process(rows)
            if done:
                # A crash here puts the same objects again after the restart.
                self._failpoints.hit(AFTER_OBJECT_UPLOAD_BEFORE_DEQUEUE)
                await self._store.commit(lambda conn: self._forget(conn, done))
                self.uploaded += len(done)
        except Exception:
            log.failure("object-store upload pass failed")
            failed = True
            rows = []
        if failed:
            self._failures += 1
            self._schedule(self._delay(self._failures))
        else:
            self._failures = 0
            self._schedule(0 if len(rows) == BATCH else IDLE_POLL_SECONDS)

    def _forget(self, conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
        """Delete uploaded rows and recount the queue (an operation: inside a commit)."""
        self._queue.depth = self._store.metadata.delete_object_uploads(conn, seqs)

    async def _process(self, rows: Sequence[ObjectUpload]) -> tuple[list[int], bool]:
        """Put ``rows`` in the store: uploads side by side, each delete alone.

        Returns the rows that are done, and whether any failed (those were
        postponed and the pass stops at the first failed group).
        """
        done: list[int] = []
        group: list[ObjectUpload] = []
        for row in rows:
            if row.kind == UPLOAD_ARTIFACT:
                group.append(row)
                continue
            # A delete: every upload queued before it first, then the delete alone.
            for batch in (group, [row]):
                if batch and not await self._run_group(batch, done):
                    return done, True
            group = []
        if group and not await self._run_group(group, done):
            return done, True
        return done, False

    async def _run_group(self, rows: Sequence[ObjectUpload], done: list[int]) -> bool:
        results = await DeferredList(
            [Deferred.fromCoroutine(self._put(row)) for row in rows], consumeErrors=True
        )
        postponed: list[tuple[int, int]] = []
        for row, (succeeded, outcome) in zip(rows, results, strict=True):
            if succeeded:
                done.append(row.seq)
                continue
            delay = self._delay(row.attempts + 1)
            log.warn(
                UPLOAD_FAILED,
                kind=row.kind,
                artifact=row.artifact_id or row.namespace_id,
                error=cast(Failure, outcome).getErrorMessage(),
                delay=delay,
            )
            postponed.append((row.seq, self._store.now_ms() + int(delay * 1000)))
        if postponed:
            await self._store.commit(
                lambda conn: self._store.metadata.postpone_object_uploads(conn, postponed)
            )
        return not postponed

    async def _put(self, row: ObjectUpload) -> None:
        """Carry out one row.

        Raises:
            StoreError, OSError: the store (or the body file) failed; retry later.
        """
        if row.kind == UPLOAD_ARTIFACT:
            await self._put_artifact(row)
        else:
            await self._put_tombstone(row)

    async def _put_artifact(self, row: ObjectUpload) -> None:
        manifest = await self._store.manifest(row.artifact_id)
        if manifest is None or manifest.version_ms != row.version_ms or manifest.digest is None:
            return  # replaced or deleted since: that write or delete has its own row
        key = naming.artifact_key(self._prefix, manifest.namespace_id, manifest.artifact_id)
        metadata = naming.manifest_metadata(manifest)
        client = self._calls.client
        if manifest.in_database:
            value = await self._store.read_inline(manifest)
            if value is None:
                return
            await self._calls("put", client.put_bytes, key, value, manifest.digest, metadata)
            return
        assert manifest.blob_path is not None
        path = self._store.layout.absolute(manifest.blob_path)
        try:
            await self._calls("put", client.put_file, key, path, manifest.digest, metadata)
        except FileNotFoundError:
            current = await self._store.manifest(row.artifact_id)
            if current is None or current.version_ms != row.version_ms:
                return  # replaced or deleted while it was read
            raise

    async def _put_tombstone(self, row: ObjectUpload) -> None:
        """Record the tombstone in the store, then drop the objects it covers."""
        tombstone = naming.Tombstone(
            written_ms=self._store.now_ms(),
            version_ms=row.version_ms,
            namespace_id=row.namespace_id,
            artifact_id=row.artifact_id if row.kind == UPLOAD_DELETE_ARTIFACT else None,
        )
        client = self._calls.client
        await self._calls(
            "put",
            client.put_bytes,
            naming.tombstone_key(self._prefix, tombstone),
            b"",
            naming.EMPTY_SHA256,
            {},
        )
        if tombstone.artifact_id is not None:
            keys = [naming.artifact_key(self._prefix, row.namespace_id, tombstone.artifact_id)]
        else:
            prefix = naming.namespace_prefix(self._prefix, row.namespace_id)
            keys = await self._calls("list", lambda: list(client.list_keys(prefix)))
        for key in keys:
            await self._drop_if_covered(key, row.version_ms)

    async def _drop_if_covered(self, key: str, version_ms: int) -> None:
        """Delete the object at ``key`` unless it is newer than ``version_ms`` (LWW)."""
        client = self._calls.client
        try:
            metadata = await self._calls("head", client.head, key)
        except ObjectMissing:
            return
        try:
            stored = naming.parse_metadata(metadata).version_ms
        except ValueError:
            return  # not ours: leave it
        if stored <= version_ms:
            await self._calls("delete", client.delete, key)

    def _delay(self, failures: int) -> float:
        base = BACKOFF_BASE_SECONDS * float(2 ** min(failures - 1, 16))
        return min(BACKOFF_MAX_SECONDS, base * (0.8 + 0.4 * self._jitter()))

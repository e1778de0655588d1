"""The artifact store: durable publish, reads, capacity, multipart, outbox.

Publishing a file-backed artifact follows one order, and a crash at any
point leaves either nothing or the whole artifact:

1. the body is streamed into a staging file and fsynced (:mod:`.staging`);
2. it is renamed into ``blobs/`` under a fresh name derived from the id,
   and the directory is fsynced;

3. one metadata transaction records the manifest, evicts what capacity
   demands and queues one outbox row per replication target (group
   commit: concurrent publishes share one WAL fsync);
4. only then does the caller acknowledge.

A body small enough to be received in memory skips steps 1-2: it is stored
in the metadata database itself (``key_values``, metadata schema 4), in the
transaction that records its manifest, so one WAL fsync per group commit
makes the bytes and the metadata of every small write in it durable at once
(where a file per body cost a file creation, its fsync and a directory
fsync). Its digest is computed on the storage thread, in that transaction.
The serving paths answer such bodies from memory (:mod:`.bodies`).

A file renamed in step 2 whose transaction never committed is an orphan;
after start-up a paced background sweep (:mod:`.sweep`) removes orphans
older than the start and the upload staging area set aside at the start.

All methods run on the reactor thread and return Deferreds or coroutines;
blocking work goes through the injected runner.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from kura.defer import shielded
from kura.domain.artifacts import ArtifactAddress, Manifest
from kura.domain.errors import (
    DigestMismatch,
    InsufficientStorage,
    KuraError,
    StorageFault,
    TooManyRequests,
)
from kura.domain.failpoints import (
    AFTER_BYTES_DURABLE_BEFORE_METADATA,
    AFTER_METADATA_COMMIT_BEFORE_ACK,
    BEFORE_FSYNC,
    Failpoints,
)
from kura.storage.bodies import BODY_CACHE_MAX_BYTES, BodyCache
from kura.storage.interfaces import (
    IArtifactStore,
    IBlockingRunner,
    IReplicationTargets,
    IWriteHooks,
)
from kura.storage.layout import Layout, fsync_directory, make_directory_durably
from kura.storage.metadata import (
    ApplyResult,
    ArtifactTombstone,
    MetadataStore,
    OutboxMessage,
    Outcome,
    SpaceMode,
    Upload,
    WritePolicy,
)
from kura.storage.staging import (
    MEMORY_BODY_MAX_BYTES,
    StagedBody,
    StagingFile,
    TmpBudget,
    translate_os_error,
)
from kura.storage.sweep import StartupSweep
from kura.storage.verify import INLINE_HASH_BYTES, BodyVerifier, sha256_of

T = TypeVar("T")

log = Logger(namespace="kura.storage")

#: Event formats (kept as constants so operators can grep and tests can match).
EVICTED = "evicted {count} artifacts ({bytes} bytes) to make room"
SPACE_CONVERTED = (
    "metadata database ({bytes} bytes) converted in {seconds:.1f}s to return the space "
    "that deletes and evictions free to the filesystem"
)
SPACE_NOT_CONVERTED = (
    "metadata database not converted to return freed space ({error}); it reuses the space "
    "that deletes and evictions free but never gives it back: the next start tries again"
)
SPACE_TOO_BIG_TO_CONVERT = (
    "metadata database ({bytes} bytes) was made before kura returned freed space and is "
    "too big to convert at start: it reuses the space that deletes and evictions free but "
    "never gives it back. To convert it, stop the node and run "
    "python -c \"import sqlite3; c = sqlite3.connect('{path}', isolation_level=None); "
    "c.execute('PRAGMA auto_vacuum = INCREMENTAL'); c.execute('VACUUM')\" "
    "(it needs room for a copy of the file)"
)
#: Free database bytes :meth:`ArtifactStore.return_free_space` leaves free by
#: default: the next small bodies reuse them without growing the file.
FREE_SPACE_KEPT = 32 * 1024 * 1024
#: Most bytes one :meth:`ArtifactStore.return_free_space` call gives back by
#: default (512 pages of 4 KiB: ~12 ms of the write transaction here).
FREE_SPACE_PER_CALL = 2 * 1024 * 1024
DAMAGED = "artifact {artifact_id} is damaged ({reason}); forgotten"

#: Why a stored artifact is damaged (``on_damaged``'s second argument).
MISSING = "body file missing"
WRONG_SIZE = "body file size differs from its manifest"
CORRUPT = "body does not match its digest"

#: Approximate per-entry overhead of a cached manifest (object + dict slot).
_CACHE_ENTRY_OVERHEAD = 400


@implementer(IReplicationTargets)
@attrs.frozen
class StaticTargets:
    """A fixed list of replication targets: none for a store without peers."""

    urls: tuple[str, ...] = ()

    def targets(self) -> Sequence[str]:
        return self.urls


#: The targets of a store without peers.
NO_TARGETS = StaticTargets()


@attrs.frozen
class PublishResult:
    """What a write did: its outcome and the manifest that is now current."""

    outcome: Outcome
    manifest: Manifest


class ManifestCache:
    """A byte-bounded LRU of manifests in front of SQLite (reactor thread only)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, Manifest] = collections.OrderedDict()
        self._bytes = 0

    @staticmethod
    def _cost(manifest: Manifest) -> int:
        digest = manifest.digest
        return (
            _CACHE_ENTRY_OVERHEAD
            + len(manifest.key)
            + len(manifest.namespace_id)
            + (len(digest) if digest is not None else 0)
        )

    def get(self, artifact_id: str) -> Manifest | None:
        manifest = self._entries.get(artifact_id)
        if manifest is not None:
            self._entries.move_to_end(artifact_id)
        return manifest

    def put(self, manifest: Manifest) -> None:
        self.discard(manifest.artifact_id)
        self._entries[manifest.artifact_id] = manifest
        self._bytes += self._cost(manifest)
        while self._bytes > self._max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= self._cost(evicted)

    def discard(self, artifact_id: str) -> None:
        manifest = self._entries.pop(artifact_id, None)
        if manifest is not None:
            self._bytes -= self._cost(manifest)

    def clear(self) -> int:
        """Drop every entry; return how many there were."""
        count = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return count

    def discard_namespace(self, namespace_id: str) -> None:
        for artifact_id in [
            key for key, m in self._entries.items() if m.namespace_id == namespace_id
        ]:
            self.discard(artifact_id)


#: Most artifact bodies one transaction stores (``key_values`` rows): bounds
#: the bytes a group commit writes to the WAL at once.
MAX_BODIES_PER_COMMIT = 64


@attrs.define
class _Pending:
    operation: Callable[[sqlite3.Connection], Any]
    done: Deferred[Any]
    #: The operation stores a body in the transaction (counted against
    #: :data:`MAX_BODIES_PER_COMMIT`).
    carries_body: bool = False
    #: Whether the operation may queue rows for a tier beside the store
    #: (outbox rows, a write hook's): only then do commit listeners hear of it.
    queues_rows: bool = True


@implementer(IArtifactStore)
class ArtifactStore:
    """Durable storage for one node (see the module docstring for the contract).

    Args:
        layout: the data and staging directories.
        runner: where blocking disk work runs.
        clock: time source for versions and access times.
        node_tenant: the node's tenant, part of every artifact id.
        capacity_bytes: budget for blobs (key-value entries are not
            counted); LRU eviction keeps the store under it.
        tmp_budget: the staging ledger.
        manifest_cache_bytes: memory for the manifest cache
            (``KURA_MANIFEST_CACHE_MAX_BYTES``).
        max_unfinished_uploads: multipart uploads that may be started and
            not yet completed or expired (``KURA_MULTIPART_MAX_UNFINISHED``).
        failpoints: crash points for consistency tests.
        replication_targets: the peers a write must reach, asked at write
            time (one outbox row each); none by default.
        on_evicted: called with ``(producer, size)`` for every artifact
            evicted to make room (metrics).
        on_damaged: called with ``(manifest, reason)`` for every artifact
            forgotten as damaged (:data:`MISSING`, :data:`WRONG_SIZE`,
            :data:`CORRUPT`), once it is forgotten: a metric, and a repair
            from a peer.
        memory_body_bytes: bodies with a declared length up to this are
            received in memory and stored in the metadata database
            (``KURA_MEMORY_BODY_MAX_BYTES``; 0 stages every body to a file).
        body_cache_bytes: memory for bodies stored in the database
            (``KURA_BODY_CACHE_MAX_BYTES``, :mod:`.bodies`).
        write_hooks: told of every client write and delete inside its
            transaction (the object-store tier's upload queue); none by default.

    Commit listeners (:meth:`add_commit_listener`) hear of every metadata
    commit that may have queued rows for them (a write with replication
    targets or write hooks, and every other kind of commit).
    """

    def __init__(
        self,
        *,
        layout: Layout,
        runner: IBlockingRunner,
        clock: IReactorTime,
        node_tenant: str,
        capacity_bytes: int,
        tmp_budget: TmpBudget,
        manifest_cache_bytes: int,
        max_unfinished_uploads: int,
        failpoints: Failpoints | None = None,
        replication_targets: IReplicationTargets = NO_TARGETS,
        on_evicted: Callable[[str, int], None] = lambda producer, size: None,
        on_damaged: Callable[[Manifest, str], None] = lambda manifest, reason: None,
        memory_body_bytes: int = MEMORY_BODY_MAX_BYTES,
        body_cache_bytes: int = BODY_CACHE_MAX_BYTES,
        write_hooks: IWriteHooks | None = None,
    ) -> None:
        self.layout = layout
        self._write_hooks = write_hooks
        self.memory_body_bytes = memory_body_bytes
        self.node_tenant = node_tenant
        self.capacity_bytes = capacity_bytes
        self.tmp_budget = tmp_budget
        self.metadata = MetadataStore(layout.database, layout.data_dir)
        self._replication_targets = replication_targets
        self.outbox_depth = 0
        self.max_unfinished_uploads = max_unfinished_uploads
        #: Multipart uploads started and not completed or expired (its rows).
        self.unfinished_uploads = 0
        self._on_evicted = on_evicted
        self._on_damaged = on_damaged
        self._commit_listeners: list[Callable[[], None]] = []
        self._runner = runner
        self._clock = clock
        self._failpoints = failpoints or Failpoints()
        #: Which blob files were checked against their digests (serving paths).
        self.verifier = BodyVerifier(runner)
        self._cache = ManifestCache(manifest_cache_bytes)
        #: Bodies stored in the database, for the serving paths (:mod:`.bodies`).
        self.bodies = BodyCache(body_cache_bytes)
        self._queue: list[_Pending] = []
        self._committing = False
        #: Fired when no commit is queued or on the disk (:meth:`stop` waits).
        self._settled_waiters: list[Deferred[None]] = []
        self._write_epoch = 0
        self._last_version = 0
        self._accessed: dict[str, int] = {}
        self._data_dir_fd: int | None = None
        self.started_wall = 0.0

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the metadata store and set stale staging aside; no full-disk scan.

        Orphaned blobs and the staging set aside are removed afterwards, in
        the background, by :meth:`startup_sweep` (the node opens its
        listeners first). Unfinished multipart parts are reconciled here:
        there are at most ``max_unfinished_uploads`` of them.
        """
        # Files modified before this instant were written by an earlier process.
        self.started_wall = time.time()
        await self._runner.run(self._open)
        self._log_space_mode(self.metadata.space)
        self.tmp_budget.used = await self._runner.run(self.metadata.staged_part_bytes)
        self.outbox_depth = await self._runner.run(self.metadata.outbox_depth)
        self.unfinished_uploads = await self._runner.run(self.metadata.upload_count)

    def _log_space_mode(self, space: SpaceMode) -> None:
        if space.converted_seconds is not None:
            log.info(SPACE_CONVERTED, bytes=space.database_bytes, seconds=space.converted_seconds)
        elif space.conversion_error is not None:
            log.warn(SPACE_NOT_CONVERTED, error=space.conversion_error)
        elif not space.returns_free_pages:
            log.warn(
                SPACE_TOO_BIG_TO_CONVERT, bytes=space.database_bytes, path=self.layout.database
            )

    async def return_free_space(
        self, keep_bytes: int | None = None, most_bytes: int | None = None
    ) -> int:
        """Give the database's free pages beyond ``keep_bytes`` back to the filesystem.

        At most ``most_bytes`` per call, in the next group commit (the pages
        move while the write transaction is held, ~24 µs each here, so a
        call is bounded and the caller paces the calls). ``keep_bytes`` stay
        free for the bodies to come, which reuse them without growing the
        file. Returns the bytes given back (0 when the database does not
        return free pages, see :mod:`.metadata`). The defaults are
        :data:`FREE_SPACE_KEPT` and :data:`FREE_SPACE_PER_CALL`.
        """
        if not self.metadata.space.returns_free_pages:
            return 0
        keep = FREE_SPACE_KEPT if keep_bytes is None else keep_bytes
        most = FREE_SPACE_PER_CALL if most_bytes is None else most_bytes
        excess = await self._runner.run(self.metadata.free_bytes) - keep
        pages = min(excess, most) // self.metadata.page_size
        if pages <= 0:
            return 0
        returned = await self._commit(
            lambda conn: self.metadata.return_free_pages(conn, pages), queues_rows=False
        )
        return returned * self.metadata.page_size

    def startup_sweep(self, **pacing: Any) -> StartupSweep:
        """The background sweep of orphans and stale staging (see :mod:`.sweep`).

        Only files older than :meth:`start` can be orphans, so a publish
        racing the sweep never loses its file.
        """
        return StartupSweep(
            layout=self.layout,
            metadata=self.metadata,
            runner=self._runner,
            clock=self._clock,
            cutoff=self.started_wall,
            **pacing,
        )

    def _open(self) -> None:
        self.layout.prepare()
        # Blobs are opened relative to this descriptor: one path lookup fewer
        # per download, and immune to the working directory.
        self._data_dir_fd = os.open(
            self.layout.data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
        self.metadata.open()
        live = self.metadata.live_parts()
        for upload_id in os.listdir(self.layout.parts):
            upload_dir = os.path.join(self.layout.parts, upload_id)
            if upload_id not in live:
                shutil.rmtree(upload_dir, ignore_errors=True)
                continue
            for name in os.listdir(upload_dir):
                number = name.removesuffix(".part")
                if not number.isdigit() or int(number) not in live[upload_id]:
                    os.unlink(os.path.join(upload_dir, name))

    async def stop(self) -> None:
        """Flush recorded access times, let queued commits finish, close the database.

        The writer connection is closed only once no transaction is queued
        or running on a storage thread: closing a SQLite connection while
        another thread executes on it is undefined behaviour (a crash).
        """
        if self._accessed:
            await self._commit(self._access_operation())
        await self._settled()
        await self._runner.run(self.metadata.close)
        if self._data_dir_fd is not None:
            os.close(self._data_dir_fd)
            self._data_dir_fd = None

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every metadata commit that may have queued
        rows for it (the outbox worker and the upload queue wake on it).

        It runs inside the commit callback, so it must not start commits
        synchronously (with an inline runner they would run before this
        batch's waiters resumed): it defers its work instead.
        """
        self._commit_listeners.append(listener)

    # -- versions and identity -----------------------------------------------------

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def next_version(self) -> int:
        """A version for a client write: wall-clock ms, strictly increasing."""
        self._last_version = max(self.now_ms(), self._last_version + 1)
        return self._last_version

    def artifact_id(self, address: ArtifactAddress) -> str:
        return _artifact_id(address, self.node_tenant)

    # -- group commit --------------------------------------------------------------

    def _commit(
        self,
        operation: Callable[[sqlite3.Connection], T],
        *,
        carries_body: bool = False,
        queues_rows: bool = True,
    ) -> Deferred[T]:
        """Queue ``operation`` for the next metadata transaction.

        ``carries_body``: it stores an artifact's body in the transaction.
        ``queues_rows=False`` promises that it queues no rows for the tiers
        beside the store (no replication target, no write hook): a batch of
        such operations is not announced to the commit listeners, whose
        wake-ups would each cost a scan on a storage thread for nothing.
        """
        done: Deferred[T] = Deferred()
        self._queue.append(_Pending(operation, done, carries_body, queues_rows))
        self._pump()
        return done

    def commit(self, operation: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        """Run ``operation`` (on the writer connection) in the next group commit.

        For the tiers beside the store that keep rows of their own (the
        object-store upload queue); errors as :meth:`_commit`'s.
        """
        return self._commit(operation)

    def _access_operation(self) -> Callable[[sqlite3.Connection], None]:
        accessed, self._accessed = self._accessed, {}
        return lambda conn: self.metadata.record_access(conn, accessed)

    def _settled(self) -> Deferred[None]:
        """A Deferred that fires once no commit is queued or on the disk."""
        if not self._committing and not self._queue:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._settled_waiters.append(waiter)
        return waiter

    def _pump(self) -> None:
        if self._committing:
            return
        if not self._queue:
            waiters, self._settled_waiters = self._settled_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        batch, self._queue = _take_batch(self._queue)
        # Recorded reads go first, so that eviction in this very batch sees
        # them (the LRU order is what the reads made it).
        recency = [self._access_operation()] if self._accessed else []
        operations = [*recency, *(pending.operation for pending in batch)]
        self._committing = True
        self._write_epoch += 1
        d = self._runner.run(self.metadata.commit, operations)

        def committed(results: list[Any]) -> None:
            self._committing = False
            self._write_epoch += 1
            for pending, result in zip(batch, results[len(recency) :], strict=True):
                if isinstance(result, Exception):
                    pending.done.errback(_as_domain_error(result))
                else:
                    pending.done.callback(result)
            if any(pending.queues_rows for pending in batch):
                for listener in self._commit_listeners:
                    listener()
            self._pump()

        def failed(failure: Any) -> None:
            self._committing = False
            self._write_epoch += 1
            for pending in batch:
                pending.done.errback(_as_domain_error(failure.value))
            self._pump()

        d.addCallbacks(committed, failed)

    # -- reads ------------------------------------------------------------------

    def _uncache(self, artifact_id: str) -> None:
        """An artifact left the store: its manifest and body leave memory too."""
        self._cache.discard(artifact_id)
        self.bodies.discard(artifact_id)

    def _uncache_namespace(self, namespace_id: str) -> None:
        """A namespace was cleaned: its manifests and bodies leave memory too."""
        self._cache.discard_namespace(namespace_id)
        self.bodies.discard_namespace(namespace_id)

    def drop_manifest_cache(self) -> int:
        """Forget every cached manifest (memory pressure); SQLite still has them."""
        return self._cache.clear()

    def cached_manifest(self, artifact_id: str) -> Manifest | None:
        """The manifest if it is in memory; ``None`` means *unknown*, not absent."""
        return self._cache.get(artifact_id)

    async def manifest(self, artifact_id: str) -> Manifest | None:
        """The current manifest of ``artifact_id``, or ``None`` when not stored."""
        cached = self._cache.get(artifact_id)
        if cached is not None:
            return cached
        epoch = self._write_epoch
        try:
            found = await self._runner.run(self.metadata.get_manifest, artifact_id)
        except sqlite3.Error as error:
            raise StorageFault(f"metadata read failed: {error}") from error
        # A write that committed while we read may have made our answer stale.
        if found is not None and epoch == self._write_epoch and not self._committing:
            self._cache.put(found)
        return found

    async def manifests(self, artifact_ids: Sequence[str]) -> dict[str, Manifest]:
        """The current manifests of many ids (absent ones left out), in one thread hop.

        Cached manifests answer first; the rest are read together (REAPI's
        FindMissingBlobs asks for thousands at once).
        """
        found: dict[str, Manifest] = {}
        unknown: list[str] = []
        for artifact_id in artifact_ids:
            cached = self._cache.get(artifact_id)
            if cached is None:
                unknown.append(artifact_id)
            else:
                found[artifact_id] = cached
        if not unknown:
            return found
        epoch = self._write_epoch
        try:
            read = await self._runner.run(self._read_manifests, unknown)
        except sqlite3.Error as error:
            raise StorageFault(f"metadata read failed: {error}") from error
        if epoch == self._write_epoch and not self._committing:
            for manifest in read:
                self._cache.put(manifest)
        found.update((manifest.artifact_id, manifest) for manifest in read)
        return found

    def _read_manifests(self, artifact_ids: Sequence[str]) -> list[Manifest]:
        get = self.metadata.get_manifest
        return [m for m in map(get, artifact_ids) if m is not None]

    async def read_inline(self, manifest: Manifest) -> bytes | None:
        """The body of an artifact kept in the metadata database (a key-value
        entry, or a small blob: ``manifest.in_database``), or ``None`` when
        that version is gone.

        Answered from :attr:`bodies` when held there. Otherwise it is read
        and hashed on a storage thread; a body that does not match the
        manifest's digest is forgotten as damaged (``None``), one that does
        is held for the next reader.
        """
        held = self.bodies.get(manifest)
        if held is not None:
            return held
        try:
            read = await self._runner.run(self._read_stored_body, manifest.artifact_id)
        except sqlite3.Error as error:
            raise StorageFault(f"metadata read failed: {error}") from error
        if read is None:
            return None
        value, digest = read
        if manifest.digest is not None and digest != manifest.digest:
            # Damage, or a newer version's body read for an older manifest
            # (then forgetting the older version finds nothing to drop).
            await shielded(Deferred.fromCoroutine(self.forget_damaged(manifest, CORRUPT)))
            return None
        self.bodies.put(manifest, value)
        return value

    def _read_stored_body(self, artifact_id: str) -> tuple[bytes, str] | None:
        """A body kept in the database and its SHA-256 (blocking)."""
        value = self.metadata.get_inline(artifact_id)
        return None if value is None else (value, hashlib.sha256(value).hexdigest())

    def open_body(self, manifest: Manifest) -> int:
        """Open a file-backed artifact for reading; the caller closes the fd.

        Opening is one metadata syscall and is done on the caller's thread;
        the body itself is moved by sendfile/splice or a reader thread.

        Raises:
            OSError: the file is missing or cannot be opened.
        """
        assert manifest.blob_path is not None and self._data_dir_fd is not None
        return os.open(manifest.blob_path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._data_dir_fd)

    def record_access(self, artifact_id: str, now: float | None = None) -> None:
        """Note a read for the LRU order (persisted with the next commit).

        ``now``: the store's clock, in seconds, when the caller just read it.
        """
        self._accessed[artifact_id] = self.now_ms() if now is None else int(now * 1000)

    async def stored(self, artifact_id: str) -> Manifest | None:
        """The manifest of an artifact whose body is really there, else ``None``.

        Existence answers (write-once uploads, module HEAD/start) use this, so
        an artifact whose file vanished behind our back is forgotten and can
        be uploaded again instead of being reported as present forever. (Its
        bytes are checked when they are read: :meth:`verify_open`.)
        """
        manifest = await self.manifest(artifact_id)
        if manifest is None or manifest.inline or manifest.blob_path is None:
            return manifest
        path = self.layout.absolute(manifest.blob_path)
        if await self._runner.run(os.path.exists, path):
            return manifest
        await self.forget_damaged(manifest, MISSING)
        return None

    async def open_intact(self, manifest: Manifest) -> int | None:
        """Open ``manifest``'s body file if it is the body that was published.

        Blobs are write-once, so a missing file, one of any other size
        (truncated, or grown behind our back) or one whose bytes do not hash
        to the manifest's digest (:meth:`verify_open`) is damage: the
        artifact is forgotten (:meth:`forget_damaged`) and ``None``
        returned, which every reader answers as a miss. The caller closes
        the descriptor.

        Raises:
            OSError: the file exists but cannot be opened or read
                (descriptor exhaustion, permissions, I/O errors): not
                damage, nothing is forgotten.
        """
        opened = self.open_published(manifest)
        if isinstance(opened, str):
            await shielded(Deferred.fromCoroutine(self.forget_damaged(manifest, opened)))
            return None
        fd, status = opened
        try:
            intact = await self.verify_open(manifest, fd, status)
        except BaseException:
            os.close(fd)
            raise
        if not intact:
            os.close(fd)
            return None
        return fd

    def open_published(self, manifest: Manifest) -> tuple[int, os.stat_result] | str:
        """The first step of :meth:`open_intact`, which never waits: open and check the size.

        Returns:
            The open descriptor (the caller closes it) and its ``fstat``, or,
            when the file is damage, why: the caller must then
            :meth:`forget_damaged` it.

        Raises:
            OSError: the file exists but cannot be opened.
        """
        try:
            fd = self.open_body(manifest)
        except FileNotFoundError:
            return MISSING
        status = os.fstat(fd)
        if status.st_size != manifest.size:
            os.close(fd)
            return WRONG_SIZE
        return fd, status

    async def verify_open(
        self, manifest: Manifest, fd: int, status: os.stat_result | None = None
    ) -> bool:
        """Whether the open body file ``fd`` of ``manifest`` still holds its published bytes.

        The second step of :meth:`open_intact`: free when the file was
        verified in its current state (see :mod:`kura.storage.verify`),
        otherwise its bytes are hashed (on a storage thread unless small).
        A file that does not match its digest is forgotten as damaged, even
        if the caller is cancelled meanwhile. ``fd`` stays the caller's.
        ``status`` is ``fd``'s ``fstat`` when the caller just took it (one
        system call fewer per read), else it is taken here.

        Raises:
            OSError: the file cannot be read.
        """
        if self.verifier.trusted(manifest, os.fstat(fd) if status is None else status):
            return True
        # The verdict stands even if the caller is cancelled meanwhile.
        return await shielded(Deferred.fromCoroutine(self._verify(manifest, fd)))

    async def _verify(self, manifest: Manifest, fd: int) -> bool:
        check = await self.verifier.check(manifest, fd)
        if not check.intact:
            await self.forget_damaged(manifest, CORRUPT)
        return check.intact

    async def forget_damaged(self, manifest: Manifest, reason: str) -> None:
        """Drop an artifact whose body is missing or not the published one.

        ``on_damaged`` hears of it once it is forgotten (once, however many
        readers found the damage).
        """
        if manifest.blob_path is not None:
            self.verifier.forget(manifest.blob_path)
        if await self.remove_local(manifest):
            log.warn(DAMAGED, artifact_id=manifest.artifact_id, reason=reason)
            self._on_damaged(manifest, reason)

    async def remove_local(self, manifest: Manifest) -> bool:
        """Remove one artifact version from this node only (no tombstone, no outbox).

        A newer version written meanwhile is left alone. Peers keep their
        copy: this is for damage, not for a client's delete (that is
        :meth:`delete_artifact`, which tombstones and replicates).

        Returns:
            Whether that version was stored (and is now removed).
        """
        self._uncache(manifest.artifact_id)
        dropped = await self._commit(
            lambda conn: self.metadata.drop_manifest(
                conn, manifest.artifact_id, manifest.version_ms
            )
        )
        if dropped is not None and dropped.blob_path:
            await self._unlink([dropped.blob_path])
        return dropped is not None

    async def fill_digest(self, manifest: Manifest, digest: str) -> Manifest | None:
        """Record the digest of a version stored without one (the scrub's upgrade path).

        Returns the manifest with its digest, or ``None`` when that version
        is gone or got a digest meanwhile.
        """
        filled = await self._commit(
            lambda conn: self.metadata.fill_digest(
                conn, manifest.artifact_id, manifest.version_ms, digest
            )
        )
        if not filled:
            return None
        updated = attrs.evolve(manifest, digest=digest)
        cached = self._cache.get(manifest.artifact_id)
        if cached is not None and cached.version_ms == manifest.version_ms:
            self._cache.put(updated)
        return updated

    async def blobs_page(self, after: str | None, limit: int) -> list[Manifest]:
        """File-backed manifests in artifact-id order, strictly after ``after`` (the scrub)."""
        try:
            return await self._runner.run(self.metadata.blobs_page, after, limit)
        except sqlite3.Error as error:
            raise StorageFault(f"metadata read failed: {error}") from error

    # -- writes -----------------------------------------------------------------

    def stage(
        self,
        *,
        limit: int,
        expected_length: int | None = None,
        hashed: bool = True,
        on_pressure: Callable[[bool], None] | None = None,
    ) -> StagingFile:
        """Start receiving a body into staging (see :class:`StagingFile`).

        A declared length up to :attr:`memory_body_bytes` is received in memory.
        """
        return StagingFile(
            path=self.layout.new_upload_path,
            runner=self._runner,
            budget=self.tmp_budget,
            failpoints=self._failpoints,
            limit=limit,
            expected_length=expected_length,
            hashed=hashed,
            in_memory=expected_length is not None
            and expected_length <= self.memory_body_bytes
            and self.memory_body_bytes > 0,  # 0: every body is a file, even an empty one
            on_pressure=on_pressure,
        )

    async def discard(self, staged: StagedBody) -> None:
        """Throw away a finished staged body that will not be published."""
        self.tmp_budget.release(staged.reserved)
        if staged.data is None:
            await self._runner.run(_unlink_quietly, staged.path)

    async def publish_blob(
        self,
        address: ArtifactAddress,
        staged: StagedBody,
        *,
        content_type: str,
        policy: WritePolicy,
        version_ms: int | None = None,
        targets: Sequence[str] | None = None,
        expected_digest: str | None = None,
    ) -> PublishResult:
        """Publish a durable staged body as the artifact at ``address``.

        The staged file is consumed whatever happens, and its budget
        reservation released. ``targets`` overrides the replication targets
        (replicated applies pass ``()`` so they queue no outbox rows). The
        body's SHA-256 (computed as it was staged, or as its batch was
        written) is stored with the manifest; when ``expected_digest`` is
        given (a peer's declared digest, a content-addressed key) a body that
        does not match it is refused before anything is published.

        Raises:
            DigestMismatch: the body does not match ``expected_digest``;
                nothing was stored.
            InsufficientStorage: the artifact alone exceeds the capacity, or
                the disk is full.
            StorageFault: an I/O or metadata failure; nothing was published.
        """
        artifact_id = self.artifact_id(address)
        try:
            if staged.size > self.capacity_bytes:
                raise InsufficientStorage(
                    f"artifact of {staged.size} bytes exceeds the cache capacity"
                )
            if staged.data is not None:
                # Stored in the database by the transaction that records its
                # manifest, which hashes it (see _apply).
                relative, digest = None, None
            else:
                assert staged.sha256 is not None, "a published body is hashed as it is staged"
                digest = staged.sha256
                _check_digest(digest, expected_digest)
                relative = self.layout.new_blob_path(artifact_id)
                try:
                    await self._runner.run(self._place, staged.path, relative)
                except OSError as error:
                    raise translate_os_error(error) from error
        except BaseException:
            await self.discard(staged)
            raise
        self.tmp_budget.release(staged.reserved)
        now = self.now_ms()
        manifest = Manifest(
            artifact_id=artifact_id,
            producer=address.producer.value,
            namespace_id=address.namespace,
            key=address.key,
            content_type=content_type,
            inline=False,
            blob_path=relative,
            size=staged.size,
            version_ms=version_ms if version_ms is not None else self.next_version(),
            created_at_ms=now,
            digest=digest,
        )
        return await self._apply(
            manifest,
            staged.data,
            policy,
            targets,
            fresh=version_ms is None,
            expected_digest=expected_digest,
        )

    def _place(self, staged_path: str, relative: str) -> None:
        """Move a durable staged file into ``blobs/`` and make the rename durable."""
        target = self.layout.absolute(relative)
        directory = os.path.dirname(target)
        make_directory_durably(directory)
        try:
            os.rename(staged_path, target)
        except OSError as error:
            if error.errno != 18:  # EXDEV: staging lives on another filesystem
                raise
            _copy_durably(staged_path, target)
            os.unlink(staged_path)
        try:
            fsync_directory(directory)
            self._failpoints.hit(AFTER_BYTES_DURABLE_BEFORE_METADATA)
        except BaseException:
            # Never committed: remove it now rather than at the next start-up.
            _unlink_quietly(target)
            raise

    async def put_inline(
        self,
        address: ArtifactAddress,
        value: bytes,
        *,
        content_type: str,
        policy: WritePolicy,
        version_ms: int | None = None,
        targets: Sequence[str] | None = None,
        expected_digest: str | None = None,
    ) -> PublishResult:
        """Store a small body inline in the metadata store (key-value entries).

        ``targets`` and ``expected_digest`` as for :meth:`publish_blob`; the
        value's SHA-256 is stored with it.

        Raises:
            DigestMismatch: ``value`` does not match ``expected_digest``.
        """
        if len(value) <= INLINE_HASH_BYTES:
            digest = sha256_of(value)
        else:
            digest = await self._runner.run(sha256_of, value)
        _check_digest(digest, expected_digest)
        manifest = Manifest(
            artifact_id=self.artifact_id(address),
            producer=address.producer.value,
            namespace_id=address.namespace,
            key=address.key,
            content_type=content_type,
            inline=True,
            blob_path=None,
            size=len(value),
            version_ms=version_ms if version_ms is not None else self.next_version(),
            created_at_ms=self.now_ms(),
            digest=digest,
        )
        return await self._apply(manifest, value, policy, targets, fresh=version_ms is None)

    async def _apply(
        self,
        manifest: Manifest,
        inline_value: bytes | None,
        policy: WritePolicy,
        targets: Sequence[str] | None = None,
        *,
        fresh: bool = False,
        expected_digest: str | None = None,
    ) -> PublishResult:
        """Commit ``manifest`` (``fresh``: a client's write, versioned here).

        ``inline_value`` is the body when it is kept in the database
        (``manifest.in_database``). A blob's body without a digest yet (one
        received in memory) is hashed in the transaction, on the storage
        thread, and refused there (:class:`DigestMismatch`) when it does not
        match ``expected_digest``.
        """
        # Replicated applies pass their own (empty) targets: a write that
        # arrived from a peer must not be queued to the peers again.
        targets = tuple(self._replication_targets.targets()) if targets is None else tuple(targets)
        hooks = self._write_hooks if fresh else None  # told of a client's writes only
        now = self.now_ms()
        capacity = self.capacity_bytes
        written = manifest

        hashes_body = inline_value is not None and manifest.digest is None

        def operation(conn: sqlite3.Connection) -> tuple[ApplyResult, list[Any]]:
            nonlocal written
            if hashes_body:
                assert inline_value is not None
                digest = hashlib.sha256(inline_value).hexdigest()
                _check_digest(digest, expected_digest)
                written = attrs.evolve(written, digest=digest)
                # Written, not yet durable: the commit's WAL fsync makes the
                # body and its manifest durable together.
                self._failpoints.hit(BEFORE_FSYNC)
            if fresh:
                # A client writing after a delete wins over its tombstone, even
                # one a peer whose clock runs ahead versioned.
                written = self.metadata.above_artifact_tombstone(conn, written)
            evicted: list[Any] = []
            if not manifest.inline:
                evicted = self.metadata.evict(
                    conn, capacity, manifest.size, keep=manifest.artifact_id
                )
            result = self.metadata.apply_artifact(conn, written, inline_value, policy, targets, now)
            if hooks is not None and result.outcome is Outcome.APPLIED:
                hooks.artifact_written(conn, written, now)
            return result, evicted

        try:
            result, evicted = await self._commit(
                operation,
                carries_body=inline_value is not None,
                queues_rows=bool(targets) or hooks is not None,
            )
        except BaseException:
            if manifest.blob_path is not None:
                await self._unlink([manifest.blob_path])
            raise
        self._failpoints.hit(AFTER_METADATA_COMMIT_BEFORE_ACK)
        garbage = list(result.unlink)
        for artifact_id, producer, blob_path, size in evicted:
            self._uncache(artifact_id)
            if blob_path is not None:
                garbage.append(blob_path)
            self._on_evicted(producer, size)
        if evicted:
            log.info(EVICTED, count=len(evicted), bytes=sum(e[3] for e in evicted))
        if result.outcome is Outcome.APPLIED:
            manifest = written
            self._last_version = max(self._last_version, manifest.version_ms)
            self._cache.put(manifest)
            if inline_value is not None:
                self.bodies.put(manifest, inline_value)
            else:  # a file now: an older version's body is of no use to anyone
                self.bodies.discard(manifest.artifact_id)
            self.outbox_depth += len(targets)
            current = manifest
        else:
            current = self._cache.get(manifest.artifact_id) or manifest
        if garbage:
            await self._unlink(garbage)
        return PublishResult(result.outcome, current)

    async def delete_namespace(
        self,
        namespace_id: str,
        version_ms: int | None = None,
        *,
        targets: Sequence[str] | None = None,
    ) -> Outcome:
        """Tombstone a namespace: every artifact in it older than the version goes.

        ``targets`` as for :meth:`publish_blob`.
        """
        version = version_ms if version_ms is not None else self.next_version()
        hooks = self._write_hooks if targets is None else None  # a client's clean
        targets = tuple(self._replication_targets.targets()) if targets is None else tuple(targets)
        now = self.now_ms()

        def operation(conn: sqlite3.Connection) -> ApplyResult:
            result = self.metadata.delete_namespace(conn, namespace_id, version, targets, now)
            if hooks is not None and result.outcome is Outcome.APPLIED:
                hooks.namespace_deleted(conn, namespace_id, version, now)
            return result

        result = await self._commit(operation)
        self._uncache_namespace(namespace_id)
        if result.outcome is Outcome.APPLIED:
            self.outbox_depth += len(targets)
        if result.unlink:
            await self._unlink(result.unlink)
        return result.outcome

    async def delete_artifact(
        self,
        artifact_id: str,
        namespace_id: str,
        version_ms: int | None = None,
        *,
        targets: Sequence[str] | None = None,
    ) -> Outcome:
        """Delete one artifact mesh-wide: drop it here and leave a tombstone.

        Without ``version_ms`` (a client's delete) the version is a fresh one
        above the stored version, so the delete always wins over what this
        node serves. The tombstone and one outbox row per target are written
        in the transaction that drops the manifest; ``targets`` as for
        :meth:`publish_blob` (replicated deletes pass ``()``). Outcomes as
        :meth:`MetadataStore.delete_artifact`.
        """
        if version_ms is None:
            current = await self.manifest(artifact_id)
            version = self.next_version()
            if current is not None and current.version_ms >= version:
                # A replica from a peer whose clock runs ahead: still delete it.
                version = self._last_version = current.version_ms + 1
        else:
            version = version_ms
        hooks = self._write_hooks if targets is None else None  # a client's delete
        targets = tuple(self._replication_targets.targets()) if targets is None else tuple(targets)
        now = self.now_ms()
        tombstone = ArtifactTombstone(artifact_id, namespace_id, version, min(version, now))

        def operation(conn: sqlite3.Connection) -> ApplyResult:
            result = self.metadata.delete_artifact(conn, tombstone, targets, now)
            if hooks is not None and result.outcome is Outcome.APPLIED:
                hooks.artifact_deleted(conn, tombstone, now)
            return result

        result = await self._commit(operation)
        if result.outcome is Outcome.APPLIED:
            self._uncache(artifact_id)
            self.outbox_depth += len(targets)
        if result.unlink:
            await self._unlink(result.unlink)
        return result.outcome

    async def purge_artifact_tombstones(self, deleted_before_ms: int, limit: int) -> int:
        """Forget up to ``limit`` tombstones of deletes before ``deleted_before_ms``."""
        return await self._commit(
            lambda conn: self.metadata.purge_artifact_tombstones(conn, deleted_before_ms, limit)
        )

    async def oldest_access_ms(self) -> int | None:
        """See :meth:`MetadataStore.oldest_access_ms` (read on a storage thread)."""
        return await self._runner.run(self.metadata.oldest_access_ms)

    async def artifact_tombstone_count(self) -> int:
        return await self._runner.run(self.metadata.artifact_tombstone_count)

    async def _unlink(self, relative_paths: Sequence[str]) -> None:
        paths = [self.layout.absolute(p) for p in relative_paths]
        await self._runner.run(_unlink_all, paths)

    # -- multipart -------------------------------------------------------------

    async def start_upload(
        self, *, tenant_id: str, namespace_id: str, category: str, hash: str, name: str
    ) -> str:
        """Record a new multipart upload and return its id.

        Every unfinished upload is a row, a parts directory and (with its
        parts) staging budget until it completes or expires, so their number
        is capped.

        Raises:
            TooManyRequests: ``max_unfinished_uploads`` uploads are unfinished
                (429; room returns as uploads complete or expire).
        """
        if self.unfinished_uploads >= self.max_unfinished_uploads:
            raise TooManyRequests("Too many unfinished multipart uploads")
        # Counted before the commit, so concurrent starts cannot overshoot.
        self.unfinished_uploads += 1
        upload = Upload(
            upload_id=uuid.uuid4().hex,
            tenant_id=tenant_id,
            namespace_id=namespace_id,
            category=category,
            hash=hash,
            name=name,
            created_at_ms=self.now_ms(),
            total_bytes=0,
            parts={},
        )
        try:
            await self._commit(lambda conn: self.metadata.create_upload(conn, upload))
        except BaseException:
            self.unfinished_uploads -= 1
            raise
        return upload.upload_id

    async def upload(self, upload_id: str) -> Upload | None:
        return await self._runner.run(self.metadata.get_upload, upload_id)

    async def put_part(
        self, upload_id: str, part_number: int, staged: StagedBody, total_limit: int
    ) -> None:
        """Keep a durable part of a multipart upload.

        The part stays in the staging budget until the upload completes or
        expires.

        Raises:
            KeyError: unknown upload.
            OverflowError: the upload would exceed ``total_limit`` bytes.
        """
        target = self.layout.part_path(upload_id, part_number)
        try:
            if staged.data is not None:
                await self._runner.run(_write_part, staged.data, target, self._failpoints)
            else:
                await self._runner.run(_place_part, staged.path, target)
            replaced = await self._commit(
                lambda conn: self.metadata.record_part(
                    conn, upload_id, part_number, staged.size, total_limit
                )
            )
        except BaseException:
            await self.discard(staged)
            raise
        # The part keeps its bytes reserved; a replaced part gives its share back.
        self.tmp_budget.release(staged.reserved - staged.size)
        if replaced is not None:
            self.tmp_budget.release(replaced)

    async def complete_upload(
        self, upload: Upload, parts: Sequence[int], address: ArtifactAddress, content_type: str
    ) -> PublishResult:
        """Assemble the listed parts, in order, into one artifact and publish it.

        The assembled copy is staged too, so it is reserved in the staging
        budget (``TmpBudgetExhausted`` when it does not fit; the upload is
        kept for a retry) until it is published.
        """
        staging = self.layout.new_upload_path()
        sources = [self.layout.part_path(upload.upload_id, n) for n in parts]
        size = sum(upload.parts[n] for n in parts)
        self.tmp_budget.reserve(size)
        try:
            digest = await self._runner.run(_assemble, sources, staging)
        except OSError as error:
            self.tmp_budget.release(size)
            await self._runner.run(_unlink_quietly, staging)
            raise translate_os_error(error) from error
        result = await self.publish_blob(
            address,
            StagedBody(staging, size, digest, reserved=size),
            content_type=content_type,
            policy=WritePolicy.WRITE_ONCE,
        )
        await self.abandon_upload(upload)
        return result

    async def abandon_upload(self, upload: Upload) -> None:
        """Forget an upload and delete its parts (completion or expiry)."""
        part_bytes = await self._commit(
            lambda conn: self.metadata.forget_upload(conn, upload.upload_id)
        )
        if part_bytes is not None:
            # Completion and expiry may both abandon one upload: only the one
            # that removed its row gives back its count and its parts' budget,
            # as recorded in that transaction (a part acknowledged after
            # ``upload`` was read included).
            self.unfinished_uploads -= 1
            self.tmp_budget.release(part_bytes)
        await self._runner.run(
            shutil.rmtree, os.path.join(self.layout.parts, upload.upload_id), True
        )

    async def expire_uploads(self, ttl_ms: int) -> int:
        """Abandon uploads older than ``ttl_ms``; return how many."""
        expired = await self._runner.run(self.metadata.expired_uploads, self.now_ms() - ttl_ms)
        for upload_id in expired:
            upload = await self.upload(upload_id)
            if upload is not None:
                await self.abandon_upload(upload)
        return len(expired)

    # -- outbox -------------------------------------------------------------------

    async def outbox_batch(self, after_seq: int, limit: int) -> list[OutboxMessage]:
        return await self._runner.run(self.metadata.outbox_batch, after_seq, limit)

    async def outbox_delete(self, seqs: Sequence[int]) -> None:
        deleted = await self._commit(lambda conn: self.metadata.delete_outbox(conn, seqs))
        self.outbox_depth = max(0, self.outbox_depth - deleted)

    # -- replication reads (receiver and catch-up) ------------------------------------

    async def apply_preview(
        self, artifact_id: str, namespace_id: str, version_ms: int
    ) -> Outcome | None:
        """What a last-writer-wins apply of ``version_ms`` would do, decided without a body.

        Read-only and advisory: the commit decides again under its
        transaction. Returns ``None`` when the write would apply, otherwise
        ``IGNORED_TOMBSTONE``, ``IGNORED_STALE`` or ``IGNORED_EQUAL`` (an
        existing version whose body is missing never wins).

        Raises:
            StorageFault: the metadata read failed.
        """
        try:
            return await self._runner.run(self._preview, artifact_id, namespace_id, version_ms)
        except sqlite3.Error as error:
            raise StorageFault(f"metadata read failed: {error}") from error

    def _preview(self, artifact_id: str, namespace_id: str, version_ms: int) -> Outcome | None:
        tombstone = self.metadata.tombstone_version(namespace_id)
        if tombstone is not None and tombstone >= version_ms:
            return Outcome.IGNORED_TOMBSTONE
        deleted = self.metadata.artifact_tombstone_version(artifact_id)
        if deleted is not None and deleted >= version_ms:
            return Outcome.IGNORED_TOMBSTONE
        current = self.metadata.get_manifest(artifact_id)
        if current is None:
            return None
        if current.blob_path is not None and not os.path.exists(
            self.layout.absolute(current.blob_path)
        ):
            return None
        if current.version_ms > version_ms:
            return Outcome.IGNORED_STALE
        if current.version_ms == version_ms:
            return Outcome.IGNORED_EQUAL
        return None

    async def manifests_page(self, after: str | None, limit: int) -> list[Manifest]:
        """Manifests in artifact-id order, strictly after ``after`` (catch-up paging)."""
        return await self._runner.run(self.metadata.manifests_page, after, limit)

    async def tombstones_page(self, after: str | None, limit: int) -> list[tuple[str, int]]:
        """Namespace tombstones in namespace order, strictly after ``after``."""
        return await self._runner.run(self.metadata.tombstones_page, after, limit)

    async def artifact_tombstones_page(
        self, after: str | None, limit: int
    ) -> list[ArtifactTombstone]:
        """Artifact tombstones in artifact-id order, strictly after ``after``."""
        return await self._runner.run(self.metadata.artifact_tombstones_page, after, limit)

    async def recent_manifests_page(
        self, before: tuple[int, str] | None, since_ms: int | None, limit: int
    ) -> list[Manifest]:
        """Manifests newest version first, strictly below the keyset cursor ``before``.

        Only versions strictly above ``since_ms`` (when given) are listed.
        """
        return await self._runner.run(self.metadata.recent_manifests_page, before, since_ms, limit)

    async def manifest_totals(self, since_ms: int | None) -> tuple[int, int]:
        """``(count, bytes)`` of the manifests a recency walk above ``since_ms`` lists."""
        return await self._runner.run(self.metadata.manifest_totals, since_ms)

    # -- catch-up watermarks -------------------------------------------------------------

    async def watermark(self, peer: str) -> str | None:
        """The durable catch-up state of ``peer`` (opaque JSON text), or ``None``."""
        try:
            return await self._runner.run(self.metadata.watermark, peer)
        except sqlite3.Error as error:
            raise StorageFault(f"metadata read failed: {error}") from error

    async def save_watermark(self, peer: str, state: str) -> None:
        """Durably record ``peer``'s catch-up state (joins the next group commit).

        Callers save it only after what it covers was committed, so a
        watermark is never ahead of what was durably applied.
        """
        now = self.now_ms()
        await self._commit(lambda conn: self.metadata.save_watermark(conn, peer, state, now))


def _take_batch(queue: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
    """The next commit's operations, in order, and what waits for the one after.

    Everything queued goes, except that one transaction stores at most
    :data:`MAX_BODIES_PER_COMMIT` bodies; the operations from the first body
    over the cap wait.
    """
    bodies = 0
    for index, pending in enumerate(queue):
        if pending.carries_body:
            bodies += 1
            if bodies > MAX_BODIES_PER_COMMIT:
                return queue[:index], queue[index:]
    return queue, []


@functools.lru_cache(maxsize=8192)
def _artifact_id(address: ArtifactAddress, node_tenant: str) -> str:
    # A SHA-256 per request otherwise; clients fetch the same artifacts again and again.
    return address.artifact_id(node_tenant)


def _as_domain_error(error: BaseException) -> BaseException:
    if isinstance(error, KuraError):
        return error
    if isinstance(error, OSError):
        return translate_os_error(error)
    if isinstance(error, sqlite3.Error):
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            # The metadata filesystem is full: retryable once space returns,
            # like a full data disk, not a server fault.
            return InsufficientStorage(f"metadata store is out of disk space: {error}")
        return StorageFault(f"metadata commit failed: {error}")
    return error


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unlink_all(paths: Sequence[str]) -> None:
    for path in paths:
        _unlink_quietly(path)


def _copy_durably(source: str, target: str) -> None:
    with open(source, "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)
        dst.flush()
        os.fsync(dst.fileno())


def _place_part(staged_path: str, target: str) -> None:
    directory = os.path.dirname(target)
    make_directory_durably(directory)
    os.replace(staged_path, target)
    fsync_directory(directory)


def _write_part(data: bytes, target: str, failpoints: Failpoints) -> None:
    """A part received in memory: written, fsynced and renamed into place."""
    directory = os.path.dirname(target)
    make_directory_durably(directory)
    staged = f"{target}.new"
    try:
        with open(staged, "wb") as handle:
            handle.write(data)
            handle.flush()
            failpoints.hit(BEFORE_FSYNC)
            os.fsync(handle.fileno())
        os.replace(staged, target)
    except BaseException:
        _unlink_quietly(staged)
        raise
    fsync_directory(directory)


def _assemble(sources: Sequence[str], target: str) -> str:
    """Concatenate ``sources`` into ``target``, fsync it, and return its SHA-256.

    The bytes pass through this thread once, to be hashed on their way (the
    digest of the assembled body is stored with it).
    """
    hasher = hashlib.sha256()
    buffer = bytearray(_ASSEMBLY_CHUNK)
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        for source in sources:
            with open(source, "rb", buffering=0) as part:
                remaining = os.fstat(part.fileno()).st_size
                while remaining:
                    count = part.readinto(buffer)
                    if not count:
                        raise OSError(errno.EIO, f"part {source} ended early")
                    view = memoryview(buffer)[: min(count, remaining)]
                    remaining -= len(view)
                    hasher.update(view)
                    while view:
                        view = view[os.write(out, view) :]
        os.fsync(out)
    finally:
        os.close(out)
    return hasher.hexdigest()


#: Bytes copied per read when a multipart upload is assembled.
_ASSEMBLY_CHUNK = 1024 * 1024


def _check_digest(digest: str, expected: str | None) -> None:
    """Raise :class:`DigestMismatch` unless ``digest`` is ``expected`` (or nothing is)."""
    if expected is not None and digest != expected:
        raise DigestMismatch("Body does not match its SHA-256 digest")

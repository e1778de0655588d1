"""The scrub: a paced background walk that re-reads every stored body.

Serving verifies a blob file when it is first opened and whenever its stamp
(inode, size, ctime, mtime) moved (:mod:`kura.storage.verify`); what never
moves a stamp, bytes rotting below the filesystem, is found here. The
:class:`ScrubService` walks the blobs (bodies in files, and the small bodies
kept in the metadata database, whose pages SQLite does not check by itself)
in artifact-id order, a page at a time, reads each body on a storage thread,
and

* checks it against its digest: a body that is missing, of another size or
  whose bytes do not match is damage, forgotten like any other
  (:meth:`~kura.storage.store.ArtifactStore.forget_damaged`: a miss from
  now on, counted, and fetched again from a peer that has it);
* fills in the digest of a body stored before metadata schema 2 (the
  upgrade path: from then on it is verified like every other);
* remembers a body found intact as verified, so serving it hashes nothing.

**Pacing.** After every read of ``n`` bytes the scrub waits
``n / KURA_SCRUB_BYTES_PER_SECOND`` seconds on the node's clock, so it never
reads faster than that on average; each body counts at least
:data:`MIN_CHARGE` bytes (opening a file costs something even when it is
empty). Small bodies are read together, up to :data:`UNIT_BYTES` per storage
thread hop; a large one :data:`UNIT_BYTES` at a time. The reactor only
schedules; every read and hash runs on the storage threads.

**Where it resumes.** After every page the cursor (the last artifact id
done) and the time the next pass may start are written to
``<data>/scrub.json`` (replaced atomically, not fsynced: a lost update only
means a page checked twice). A restarted node resumes the pass where it
stopped instead of starting over, so frequent restarts never starve the end
of the id space. When a pass ends the scrub waits ``KURA_SCRUB_INTERVAL_MS``
before the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kura.defer import shielded
from kura.domain.artifacts import Manifest
from kura.storage.interfaces import IBlockingRunner
from kura.storage.store import CORRUPT, MISSING, WRONG_SIZE, ArtifactStore
from kura.storage.verify import Stamp, trusted_stamp
from kura.telemetry.metrics import KuraMetrics

log = Logger(namespace="kura.scrub")

SCRUB_OFF = "scrub off (KURA_SCRUB_BYTES_PER_SECOND=0)"
SCRUB_STARTED = "scrub reading stored bodies at {rate} bytes/s, resuming after {after}"
PASS_DONE = (
    "scrub pass done: {artifacts} artifacts and {bytes} bytes checked, {damaged} damaged, "
    "{filled} digests filled in, in {seconds:.0f}s; next pass in {interval:.0f}s"
)
PAGE_FAILED = "scrub page failed; retrying in {delay:.0f}s"

#: Manifests read per page (and per cursor update).
PAGE_SIZE = 256
#: Bytes read per storage-thread hop: one chunk of a large body, or several small bodies.
UNIT_BYTES = 1024 * 1024
#: Small bodies read per hop at most.
MAX_FILES_PER_UNIT = 256
#: Bytes each body costs the pace at least.
MIN_CHARGE = 4096
#: Seconds before a failed page is tried again.
RETRY_SECONDS = 60.0

#: ``kura_scrub_damaged_artifacts_total`` reasons.
_REASON_LABELS = {CORRUPT: "corrupt", MISSING: "missing", WRONG_SIZE: "wrong_size"}


@attrs.define
class Tally:
    """What one pass has done so far (for its closing log line)."""

    artifacts: int = 0
    bytes: int = 0
    damaged: int = 0
    filled: int = 0


@attrs.frozen
class Scanned:
    """What reading one stored body found.

    Attributes:
        damage: :data:`~kura.storage.store.MISSING` or
            :data:`~kura.storage.store.WRONG_SIZE`, else ``None``.
        digest: the SHA-256 of the bytes read (when there was no damage).
        stamp: the file's stamp, when the bytes may be trusted under it.
        read: bytes read.
    """

    damage: str | None
    digest: str | None = None
    stamp: Stamp | None = None
    read: int = 0


def _scan_small(path: str, size: int, wall: Callable[[], float]) -> Scanned:
    """Read and hash the whole body at ``path`` (blocking)."""
    started = wall()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Scanned(MISSING)
    try:
        before = os.fstat(fd)
        if before.st_size != size:
            return Scanned(WRONG_SIZE)
        data = os.pread(fd, size, 0) if size else b""
        if len(data) != size:  # shrunk since the fstat
            return Scanned(WRONG_SIZE)
        digest = hashlib.sha256(data).hexdigest()
        return Scanned(None, digest, trusted_stamp(before, os.fstat(fd), started), size)
    finally:
        os.close(fd)


def _scan_stored(value: bytes | None, size: int) -> Scanned:
    """Hash a body kept in the metadata database (``None``: its row is gone)."""
    if value is None:
        return Scanned(MISSING)
    if len(value) != size:
        return Scanned(WRONG_SIZE)
    return Scanned(None, hashlib.sha256(value).hexdigest(), read=size)


def _scan_smalls(
    items: list[tuple[str | None, str, int]],
    wall: Callable[[], float],
    read_stored: Callable[[str], bytes | None],
) -> list[Scanned]:
    """Read and hash small bodies, each given as (the path of its file, or
    ``None`` for a body kept in the database; its artifact id; its size)
    (blocking)."""
    return [
        _scan_small(path, size, wall)
        if path is not None
        else _scan_stored(read_stored(artifact_id), size)
        for path, artifact_id, size in items
    ]


def _open(path: str, size: int) -> tuple[int, os.stat_result] | str:
    """Open a large body: its descriptor and ``fstat``, or the damage found."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return MISSING
    status = os.fstat(fd)
    if status.st_size != size:
        os.close(fd)
        return WRONG_SIZE
    return fd, status


def _hash_range(fd: int, hasher: Any, offset: int, length: int) -> int:
    """Hash ``length`` bytes of ``fd`` from ``offset``; return how many there were."""
    data = os.pread(fd, length, offset)
    hasher.update(data)
    return len(data)


def _load_state(path: str) -> tuple[str | None, float | None]:
    """The saved cursor and next pass time; nothing for a missing or unreadable file."""
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        after, next_pass = state.get("after"), state.get("next_pass_at")
    except (OSError, ValueError, AttributeError):
        return None, None
    return (
        after if isinstance(after, str) else None,
        float(next_pass) if isinstance(next_pass, int | float) else None,
    )


def _save_state(path: str, after: str | None, next_pass_at: float | None) -> None:
    temporary = f"{path}.new"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"after": after, "next_pass_at": next_pass_at}, handle)
    os.replace(temporary, path)


class ScrubService(Service):
    """The node's scrub (see the module docstring); started by the node once storage is open.

    Args:
        store: the node's store.
        runner: where bodies are read.
        clock: paces the reads and the passes.
        metrics: ``kura_scrub_*``.
        bytes_per_second: ``KURA_SCRUB_BYTES_PER_SECOND`` (0: off).
        interval_seconds: ``KURA_SCRUB_INTERVAL_MS`` in seconds.
        state_path: where the cursor is kept.
        wall: the wall clock file timestamps are compared with.
        page_size: manifests per page.
    """

    def __init__(
        self,
        *,
        store: ArtifactStore,
        runner: IBlockingRunner,
        clock: IReactorTime,
        metrics: KuraMetrics,
        bytes_per_second: int,
        interval_seconds: float,
        state_path: str,
        wall: Callable[[], float] = time.time,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._store = store
        self._runner = runner
        self._clock = clock
        self._metrics = metrics
        self._rate = bytes_per_second
        self._interval = interval_seconds
        self._state_path = state_path
        #: The wall clock file timestamps are compared with.
        self.wall = wall
        self._page_size = page_size
        self._unit = max(MIN_CHARGE, min(UNIT_BYTES, bytes_per_second))
        self._task: Deferred[None] | None = None
        self._tally = Tally()

    def begin(self) -> None:
        """Start scrubbing (storage is open); once."""
        if self._rate <= 0:
            log.info(SCRUB_OFF)
            return
        if self._task is None and self.running:
            self._task = Deferred.fromCoroutine(self._run())
            self._task.addErrback(lambda failure: failure.trap(CancelledError))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return None

    # -- the walk -----------------------------------------------------------------------

    async def _run(self) -> None:
        after, next_pass_at = await self._runner.run(_load_state, self._state_path)
        log.info(SCRUB_STARTED, rate=self._rate, after=after or "the start")
        while True:
            if next_pass_at is not None:
                await self._sleep(next_pass_at - self._clock.seconds())
                next_pass_at = None
            started = self._clock.seconds()
            self._tally = tally = Tally()
            while True:
                try:
                    page = await self._store.blobs_page(after, self._page_size)
                    await self._scrub_page(page)
                except CancelledError:
                    raise
                except Exception:
                    log.failure(PAGE_FAILED, delay=RETRY_SECONDS)
                    await self._sleep(RETRY_SECONDS)
                    continue
                after = page[-1].artifact_id if len(page) >= self._page_size else None
                if after is None:
                    next_pass_at = self._clock.seconds() + self._interval
                await self._runner.run(_save_state, self._state_path, after, next_pass_at)
                if after is None:
                    break
            self._metrics.scrub_passes.inc()
            log.info(
                PASS_DONE,
                artifacts=tally.artifacts,
                bytes=tally.bytes,
                damaged=tally.damaged,
                filled=tally.filled,
                seconds=self._clock.seconds() - started,
                interval=self._interval,
            )

    async def _scrub_page(self, page: list[Manifest]) -> None:
        batch: list[Manifest] = []
        charged = 0
        for manifest in page:
            if manifest.size > self._unit and not manifest.in_database:
                await self._scrub_batch(batch, charged)
                batch, charged = [], 0
                await self._scrub_large(manifest)
                continue
            batch.append(manifest)
            charged += max(MIN_CHARGE, manifest.size)
            if charged >= self._unit or len(batch) >= MAX_FILES_PER_UNIT:
                await self._scrub_batch(batch, charged)
                batch, charged = [], 0
        await self._scrub_batch(batch, charged)

    async def _scrub_batch(self, batch: list[Manifest], charged: int) -> None:
        if not batch:
            return
        items = [(None if m.in_database else self._path(m), m.artifact_id, m.size) for m in batch]
        found = await self._runner.run(
            _scan_smalls, items, self.wall, self._store.metadata.get_inline
        )
        for manifest, scanned in zip(batch, found, strict=True):
            await self._judge(manifest, scanned)
        await self._pace(charged)

    async def _scrub_large(self, manifest: Manifest) -> None:
        started = self.wall()
        opened = await self._runner.run(_open, self._path(manifest), manifest.size)
        if isinstance(opened, str):
            await self._judge(manifest, Scanned(opened))
            await self._pace(MIN_CHARGE)
            return
        fd, before = opened
        reading: Deferred[Any] | None = None
        owed = 0
        try:
            hasher = hashlib.sha256()
            offset = 0
            scanned: Scanned | None = None
            while offset < manifest.size:
                await self._pace(owed)  # for the chunk before
                length = min(self._unit, manifest.size - offset)
                reading = self._runner.run(_hash_range, fd, hasher, offset, length)
                read = await shielded(reading)
                offset += read
                owed = max(read, MIN_CHARGE)
                if read < length:
                    scanned = Scanned(WRONG_SIZE, read=offset)
                    break
            if scanned is None:
                reading = self._runner.run(os.fstat, fd)
                after = await shielded(reading)
                scanned = Scanned(
                    None, hasher.hexdigest(), trusted_stamp(before, after, started), offset
                )
        finally:
            # Never under a read still running on a storage thread (stopped
            # meanwhile): the number could be reused while it reads.
            if reading is not None and not reading.called:
                reading.addBoth(lambda _: os.close(fd))
            else:
                os.close(fd)
        await self._judge(manifest, scanned)
        await self._pace(owed)

    async def _judge(self, manifest: Manifest, scanned: Scanned) -> None:
        """Act on what reading ``manifest``'s body found."""
        metrics = self._metrics
        metrics.scrub_checked_artifacts.inc()
        metrics.scrub_checked_bytes.inc(scanned.read)
        self._tally.artifacts += 1
        self._tally.bytes += scanned.read
        if scanned.damage is None and manifest.digest in (None, scanned.digest):
            assert scanned.digest is not None
            if manifest.digest is None:
                if await self._store.fill_digest(manifest, scanned.digest) is None:
                    return  # replaced, removed or filled meanwhile
                metrics.scrub_filled_digests.inc()
                self._tally.filled += 1
            if scanned.stamp is not None and manifest.blob_path is not None:
                self._store.verifier.remember(manifest.blob_path, scanned.stamp)
            return
        # Damage, unless what is stored is no longer this version (replaced or
        # evicted while it was read: its body may be gone for a good reason).
        current = await self._store.manifest(manifest.artifact_id)
        if (
            current is None
            or current.version_ms != manifest.version_ms
            or current.blob_path != manifest.blob_path
        ):
            return
        reason = scanned.damage or CORRUPT
        metrics.scrub_damaged_artifacts.labels(_REASON_LABELS[reason]).inc()
        self._tally.damaged += 1
        await self._store.forget_damaged(current, reason)

    # -- time ---------------------------------------------------------------------------

    def _path(self, manifest: Manifest) -> str:
        assert manifest.blob_path is not None
        return self._store.layout.absolute(manifest.blob_path)

    async def _pace(self, charged: int) -> None:
        """Wait as long as reading ``charged`` bytes takes at the configured rate."""
        await self._sleep(charged / self._rate)

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await deferLater(self._clock, seconds)


def state_path(data_dir: str) -> str:
    """Where the scrub keeps its cursor under ``KURA_DATA_DIR``."""
    return os.path.join(data_dir, "scrub.json")

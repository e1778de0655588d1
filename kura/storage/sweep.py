"""The start-up sweep: orphaned blobs and stale staging, removed in the background.

A node opens its listeners before it looks at every file on disk (start-up
must not scale with the store); this sweep then runs on the storage runner,
one bounded batch per hop with a pause between hops, so a million blobs cost
public traffic one storage thread at a time and never the reactor.

What it removes:

* every entry of the upload staging directories set aside at start-up
  (:meth:`~kura.storage.layout.Layout.prepare`): nothing can be
  writing there any more, so they go whole, a batch of entries per hop;
* every file in ``blobs/`` that no manifest references (``blobs/lost+found``
  and subdirectories are left alone) **and** whose modification time is older
  than the cutoff: the moment the store started, less :data:`CLOCK_MARGIN`.
  A file written after start-up may belong to a publish whose metadata
  transaction has not committed yet (the batch writer and the staged path
  both place the file first), so it is never an orphan for this sweep, even
  though no manifest names it at the moment the sweep looks. A file older
  than the cutoff was written by a process that is gone (the writer lock
  guarantees one process per data directory), so if no manifest names it
  now, none ever will: manifests only ever name fresh paths.

Blob names start with their artifact id (:mod:`.layout`), so each batch asks
SQLite for exactly the manifests of its files (primary-key lookups) rather
than loading every blob path into memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kura.storage.interfaces import IBlockingRunner
from kura.storage.layout import Layout
from kura.storage.metadata import MetadataStore

log = Logger(namespace="kura.storage.sweep")

SWEEP_DONE = (
    "start-up sweep done in {seconds:.1f}s: removed {orphans} orphaned blob files and "
    "{staging} stale staging entries; {kept} unreferenced files newer than start-up kept"
)

#: File times come from the kernel's coarse clock, which may lag the wall
#: clock read at start-up by a tick: files this close to the start are kept.
CLOCK_MARGIN = 0.1
#: Directory entries handled per storage-thread hop.
BATCH = 512
#: Seconds the sweep yields between hops.
PAUSE = 0.002
#: Kept in ``blobs/`` whatever it holds (a fsck's recovered files).
LOST_AND_FOUND = "lost+found"


@attrs.define
class SweepResult:
    """What one sweep did."""

    orphans: int = 0
    staging: int = 0
    kept_recent: int = 0


class Stopped(Exception):
    """The sweep was asked to stop (the node is stopping)."""


class StartupSweep:
    """Removes orphans and stale staging in paced batches (see the module docstring).

    Args:
        layout: the data and staging directories.
        metadata: the open metadata store (read from storage threads).
        runner: where each batch runs.
        clock: paces the batches.
        cutoff: wall-clock seconds; only files modified before it are orphans.
        batch: entries per hop.
        pause: seconds between hops.

    Attributes:
        gate: called before every hop; when it returns a Deferred the hop
            waits for it (tests hold the sweep there).
        result: the counts so far.
    """

    def __init__(
        self,
        *,
        layout: Layout,
        metadata: MetadataStore,
        runner: IBlockingRunner,
        clock: IReactorTime,
        cutoff: float,
        batch: int = BATCH,
        pause: float = PAUSE,
    ) -> None:
        self._layout = layout
        self._metadata = metadata
        self._runner = runner
        self._clock = clock
        self._cutoff = cutoff - CLOCK_MARGIN
        self._batch = batch
        self._pause = pause
        self._stopping = False
        self.result = SweepResult()
        self.gate: Callable[[], Deferred[None] | None] = lambda: None

    def stop(self) -> None:
        """Make the sweep end at its next hop (what it removed so far stays removed)."""
        self._stopping = True

    async def run(self) -> SweepResult:
        """Sweep staging, then every shard of ``blobs/``; return the counts.

        Raises:
            Stopped: :meth:`stop` was called.
        """
        started = self._clock.seconds()
        for stale in await self._hop(self._layout.stale_staging):
            await self._sweep_staging(stale)
        shards = await self._hop(_listdir, self._layout.blobs)
        for shard in sorted(shards):
            if shard == LOST_AND_FOUND:
                continue
            await self._sweep_shard(shard)
        result = self.result
        log.info(
            SWEEP_DONE,
            seconds=self._clock.seconds() - started,
            orphans=result.orphans,
            staging=result.staging,
            kept=result.kept_recent,
        )
        return result

    async def _hop(self, f: Callable[..., Any], *args: object) -> Any:
        """One storage-thread hop, after a pause (raises :class:`Stopped` when stopping)."""
        gate = self.gate()
        if gate is not None:
            await gate
        if self._stopping:
            raise Stopped()
        found = await self._runner.run(f, *args)
        if self._pause:
            await deferLater(self._clock, self._pause, lambda: None)
        if self._stopping:
            raise Stopped()
        return found

    async def _sweep_staging(self, directory: str) -> None:
        while True:
            removed = await self._hop(_remove_some, directory, self._batch)
            self.result.staging += len(removed)
            if not removed:
                await self._hop(_remove_directory, directory)
                return

    async def _sweep_shard(self, shard: str) -> None:
        path = os.path.join(self._layout.blobs, shard)
        names = await self._hop(_listdir, path)
        if names is None:  # a stray file at the top of blobs/
            gone = await self._hop(self._remove_unreferenced, "", [shard])
            self.result.orphans += len(gone)
            return
        for start in range(0, len(names), self._batch):
            gone = await self._hop(
                self._remove_unreferenced, shard, names[start : start + self._batch]
            )
            self.result.orphans += len(gone)

    def _remove_unreferenced(self, shard: str, names: Sequence[str]) -> list[str]:
        """(Storage thread.) Unlink the old files of ``names`` no manifest references."""
        relative = [os.path.join("blobs", shard, name) for name in names]
        ids = {name.split("-", 1)[0] for name in names}
        known = self._metadata.blob_paths_for(sorted(ids))
        removed = []
        for path in relative:
            if path in known:
                continue
            absolute = self._layout.absolute(path)
            try:
                info = os.lstat(absolute)
            except FileNotFoundError:
                continue
            if os.path.isdir(absolute) and not os.path.islink(absolute):
                continue
            if info.st_mtime >= self._cutoff:
                # Possibly a publish in flight: its manifest commits after the file.
                self.result.kept_recent += 1
                continue
            try:
                os.unlink(absolute)
            except FileNotFoundError:
                continue
            removed.append(path)
        return removed


def _listdir(path: str) -> list[str] | None:
    """The names in ``path``; ``None`` when it is not a directory."""
    try:
        return os.listdir(path)
    except NotADirectoryError:
        return None
    except FileNotFoundError:
        return []


def _remove_some(directory: str, count: int) -> list[str]:
    """Remove up to ``count`` entries of ``directory`` (a subdirectory whole)."""
    removed = []
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return []
    with entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(entry.name)
            if len(removed) >= count:
                break
    return removed


def _remove_directory(directory: str) -> list[str]:
    shutil.rmtree(directory, ignore_errors=True)
    return []

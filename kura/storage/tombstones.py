"""The retention of artifact tombstones: a paced background purge.

A client's delete (ccache ``DELETE``) leaves a tombstone that keeps the
artifact deleted on every node: peers and catch-ups refuse any copy at or
below its version. It is kept ``KURA_TOMBSTONE_RETENTION_MS`` from the delete
(its ``deleted_at_ms``, the deleting node's clock, carried with the
tombstone's version so every node ages it alike), then forgotten: after
that, a node that still holds the entry and missed the delete could bring it
back (docs/replication.md says what an operator does about it).

The sweep runs every :func:`sweep_interval` seconds and purges in batches of
:data:`BATCH` rows, each its own short transaction on a storage thread, with
:data:`PAUSE_SECONDS` between batches so a large backlog never holds the
metadata writer for long. Eviction never writes a tombstone; only deletes
do.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from kura.storage.interfaces import IArtifactStore

log = Logger(namespace="kura.storage")

PURGED = "purged {count} artifact tombstones older than the retention ({retention_ms} ms)"

#: Tombstones forgotten per transaction.
BATCH = 1000
#: Seconds between two batches of one sweep.
PAUSE_SECONDS = 0.05
#: The longest wait between sweeps.
MAX_INTERVAL_SECONDS = 600.0


def sweep_interval(retention_ms: int) -> float:
    """A tenth of the retention (a tombstone outlives it by at most that), 1 s to 10 min."""
    return min(MAX_INTERVAL_SECONDS, max(1.0, retention_ms / 10_000))


class TombstoneSweeper:
    """Forgets artifact tombstones older than the retention (see the module docstring).

    Args:
        store: the node's store.
        clock: time source (the store's ``now_ms`` is the same clock).
        retention_ms: ``KURA_TOMBSTONE_RETENTION_MS``.
        on_purged: called with each batch's count (a counter).
        on_count: called with the tombstones left after each sweep (a gauge).
        batch: rows per transaction.
    """

    def __init__(
        self,
        *,
        store: IArtifactStore,
        clock: IReactorTime,
        retention_ms: int,
        on_purged: Callable[[int], None] = lambda count: None,
        on_count: Callable[[int], None] = lambda count: None,
        batch: int = BATCH,
    ) -> None:
        self._store = store
        self._clock = clock
        self._retention_ms = retention_ms
        self._on_purged = on_purged
        self._on_count = on_count
        self._batch = batch
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._stopping = False
        self._pause: Deferred[None] | None = None

    def start(self) -> None:
        self._loop.start(sweep_interval(self._retention_ms), now=True)

    def stop(self) -> None:
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        if self._pause is not None:
            self._pause.cancel()

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._guarded())

    async def _guarded(self) -> None:
        try:
            await self.sweep()
        except CancelledError:
            pass  # stopped between two batches
        except Exception:
            # A failed sweep (a metadata error) is retried at the next tick.
            log.failure("artifact tombstone sweep failed")

    async def sweep(self) -> int:
        """Purge every tombstone past the retention, batch by batch; return how many."""
        cutoff = int(self._clock.seconds() * 1000) - self._retention_ms
        total = 0
        while True:
            purged = await self._store.purge_artifact_tombstones(cutoff, self._batch)
            total += purged
            if purged:
                self._on_purged(purged)
            if purged < self._batch or self._stopping:
                break
            self._pause = deferLater(self._clock, PAUSE_SECONDS, lambda: None)
            try:
                await self._pause
            finally:
                self._pause = None
        if total:
            log.info(PURGED, count=total, retention_ms=self._retention_ms)
        self._on_count(await self._store.artifact_tombstone_count())
        return total

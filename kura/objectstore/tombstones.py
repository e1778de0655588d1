"""Following the store's tombstones: cleans and deletes made by any node sharing it.

Every ``KURA_OBJECT_STORE_TOMBSTONE_POLL_MS`` the follower lists the
tombstone keys written since the last one it saw (keys sort by the time
they were written, :mod:`kura.objectstore.naming`) and applies each to the
local store as a replicated delete would be applied: at its own version,
with no outbox rows and nothing queued for the store again. Applying is
idempotent (a tombstone already applied is ``ignored_older``), and newer
local writes survive an older tombstone (last writer wins).

The listing starts :data:`LOOKBACK_MS` before the newest tombstone seen, so
one written by a node whose clock runs behind, or whose upload was a little
late, is still found; keys seen in that window are remembered and not
applied twice. At start the follower lists every tombstone in the store:
a node that was away applies the cleans it missed.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kura.objectstore import naming
from kura.objectstore.calls import StoreCalls
from kura.objectstore.client import StoreError
from kura.storage.metadata import Outcome
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics

log = Logger(namespace="kura.objectstore")

#: How far before the newest tombstone seen each listing starts.
LOOKBACK_MS = 10 * 60 * 1000


class TombstoneFollower:
    """Applies the store's tombstones here (see the module docstring).

    Args:
        store: the node's artifact store.
        calls: metered store requests.
        prefix: the key prefix in the bucket.
        clock: schedules the polls.
        interval_seconds: ``KURA_OBJECT_STORE_TOMBSTONE_POLL_MS`` in seconds.
        metrics: counts the tombstones applied.
    """

    def __init__(
        self,
        *,
        store: ArtifactStore,
        calls: StoreCalls,
        prefix: str,
        clock: IReactorTime,
        interval_seconds: float,
        metrics: KuraMetrics,
    ) -> None:
        self._store = store
        self._calls = calls
        self._prefix = prefix
        self._interval = interval_seconds
        self._metrics = metrics
        self._newest_ms = 0
        self._seen: set[str] = set()
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.poll()))
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    async def poll(self) -> int:
        """List the new tombstones and apply them; returns how many changed this node.

        A store that cannot be listed is tried again at the next poll.
        """
        start = naming.written_floor(self._prefix, self._newest_ms - LOOKBACK_MS)
        prefix = naming.tombstones_prefix(self._prefix)
        client = self._calls.client
        try:
            keys = await self._calls("list", lambda: list(client.list_keys(prefix, start)))
        except StoreError as error:
            log.warn("listing the store's tombstones failed: {error}", error=str(error))
            return 0
        applied = 0
        for key in keys:
            tombstone = naming.parse_tombstone_key(self._prefix, key)
            if key in self._seen or tombstone is None:
                continue
            try:
                applied += await self._apply(tombstone)
            except Exception:
                log.failure("applying the store's tombstone {key} failed", key=key)
                return applied  # from the same place next time
            self._seen.add(key)
            self._newest_ms = max(self._newest_ms, tombstone.written_ms)
        self._forget_old()
        return applied

    async def _apply(self, tombstone: naming.Tombstone) -> int:
        if tombstone.artifact_id is None:
            outcome = await self._store.delete_namespace(
                tombstone.namespace_id, tombstone.version_ms, targets=()
            )
        else:
            outcome = await self._store.delete_artifact(
                tombstone.artifact_id, tombstone.namespace_id, tombstone.version_ms, targets=()
            )
        if outcome is Outcome.APPLIED:
            self._metrics.object_store_tombstones_applied.inc()
            return 1
        return 0

    def _forget_old(self) -> None:
        floor = naming.written_floor(self._prefix, self._newest_ms - LOOKBACK_MS)
        self._seen = {key for key in self._seen if key > floor}

"""Damaged artifacts fetched again from a peer that has them.

When the store forgets an artifact whose body no longer matched its digest
(or its size), found by a read or by the scrub, it is a miss here but most
likely intact on a peer. :class:`Repairs` asks the known peers for that
version one after the other, through the catch-up's body fetch
(``GET /_internal/bootstrap/artifacts/{id}``,
:meth:`~kura.replication.bootstrap.Bootstrapper.fetch_from`): paced by the
limiter, verified against the peer's declared digest, published without
outbox rows. A peer that answers 404, has another version or fails is
skipped; when no peer has it the artifact stays forgotten, which is a miss,
as a cache may answer.

Repairs run :data:`CONCURRENCY` at a time; at most :data:`MAX_PENDING` wait,
and more are dropped (counted): a disk that corrupts everything needs an
operator, not a queue without end.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger

from kura.domain.artifacts import Manifest
from kura.telemetry.metrics import KuraMetrics

from . import wire
from .bootstrap import Bootstrapper
from .membership import Membership

log = Logger(namespace="kura.replication.repair")

REPAIRED = "artifact {artifact_id} fetched again from {peer} after it was found damaged"
UNREPAIRED = "artifact {artifact_id} is damaged and no peer had its version; it stays forgotten"
PEER_FAILED = "repairing artifact {artifact_id} from {peer} failed: {error}"

#: Repairs running at once.
CONCURRENCY = 2
#: Repairs waiting at most; more are dropped.
MAX_PENDING = 1024

#: ``kura_artifact_repairs_total`` results.
FETCHED, UNAVAILABLE, DROPPED = "fetched", "unavailable", "dropped"


class Repairs:
    """Fetches damaged artifacts again from peers (see the module docstring).

    Args:
        bootstrap: fetches one version's body from one peer.
        membership: the peers to ask.
        metrics: ``kura_artifact_repairs_total``.
    """

    def __init__(
        self, *, bootstrap: Bootstrapper, membership: Membership, metrics: KuraMetrics
    ) -> None:
        self._bootstrap = bootstrap
        self._membership = membership
        self._metrics = metrics
        self._waiting: dict[str, Manifest] = {}
        self._running: dict[str, Deferred[None]] = {}
        self._stopping = False

    @property
    def pending(self) -> int:
        """Repairs waiting or running."""
        return len(self._waiting) + len(self._running)

    def request(self, manifest: Manifest) -> None:
        """Fetch ``manifest``'s version again from a peer, soon (once per artifact)."""
        artifact_id = manifest.artifact_id
        if self._stopping or artifact_id in self._waiting or artifact_id in self._running:
            return
        if len(self._waiting) >= MAX_PENDING:
            self._count(DROPPED)
            return
        self._waiting[artifact_id] = manifest
        self._pump()

    async def stop(self) -> None:
        """Drop what waits and abandon what runs (a later read finds a miss, as now)."""
        self._stopping = True
        self._waiting.clear()
        running = list(self._running.values())
        for d in running:
            d.cancel()
        await DeferredList(running, consumeErrors=True)

    def _pump(self) -> None:
        while self._waiting and len(self._running) < CONCURRENCY and not self._stopping:
            artifact_id, manifest = next(iter(self._waiting.items()))
            del self._waiting[artifact_id]
            placeholder: Deferred[None] = Deferred()
            self._running[artifact_id] = placeholder
            d = Deferred.fromCoroutine(self._repair(manifest))
            if artifact_id in self._running:  # still running (not done inline)
                self._running[artifact_id] = d

    async def _repair(self, manifest: Manifest) -> None:
        artifact_id = manifest.artifact_id
        result = UNAVAILABLE
        try:
            wanted = wire.PeerManifest.of(manifest)
            for peer in list(self._membership.known_peers):
                try:
                    fetched = await self._bootstrap.fetch_from(peer, wanted)
                except CancelledError:
                    raise
                except Exception as error:
                    log.warn(
                        PEER_FAILED,
                        artifact_id=artifact_id,
                        peer=peer,
                        error=f"{type(error).__name__}: {error}",
                    )
                    continue
                if fetched:
                    result = FETCHED
                    log.info(REPAIRED, artifact_id=artifact_id, peer=peer)
                    return
            log.warn(UNREPAIRED, artifact_id=artifact_id)
        except CancelledError:
            return
        finally:
            del self._running[artifact_id]
            if not self._stopping:
                self._count(result)
                self._pump()

    def _count(self, result: str) -> None:
        self._metrics.artifact_repairs.labels(result).inc()

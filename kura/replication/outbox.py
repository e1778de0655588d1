"""Outbox delivery: every durable outbox row reaches its peer, at least once.

A row is written in the same transaction as the data it describes (see
:mod:`kura.storage.metadata`), so the intent survives crashes and restarts.
The worker wakes on every commit and every :data:`RETRY_SECONDS`, reads the
rows committed since it last looked into per-target queues (only the worker
deletes rows, so a backlog for an unreachable peer is read once, not on every
wake), and delivers, in order, the rows whose target and message are not
backing off, at most :data:`MAX_INFLIGHT` at once (:data:`PER_TARGET_INFLIGHT`
per target, the starting target rotating between scans):

* ``upsert_artifact``: the *current* manifest is loaded (gone means done: a
  later delete or eviction made the row moot) and ``PUT
  {target}/_internal/replicate/artifact?...`` streams its body from the blob
  file through :class:`~kura.replication.bodies.PacedFileBody` (never loaded
  whole), with ``Content-Length`` set;
* ``delete_namespace``: ``DELETE {target}/_internal/replicate/namespace?...``;
* ``delete_artifact``: ``DELETE {target}/_internal/replicate/artifact?...``. A
  peer of a release before artifact tombstones answers 404 (it has no such
  route): the row is dropped, logged and counted (``dropped_unsupported``),
  so a long rolling upgrade cannot fill the outbox; that peer learns the
  tombstone from its catch-up once it runs this release (tombstones are
  paged before manifests, see :mod:`.bootstrap`), and serves its copy until
  then, as every release before served a deleted entry.

A 2xx deletes the row (and only a 2xx). Failures back off from 2 s,
doubling to 60 s, with jitter:

* the **target** backs off when it cannot be reached, an upload stalls (no
  byte progress for ``KURA_REPLICATION_UPLOAD_STALL_MS``; there is no total
  deadline), its acknowledgement is not signed by the mesh, or it answers
  401/403 (our credentials) or 429/503 (busy); a target that rejoins the peer
  view is retried at once;
* only the **message** backs off when the peer refuses it with any other
  status, so one poison message never holds back the rest of its target's
  queue, let alone other targets.

Rows whose target left the replication targets for good are dropped and
counted (``dropped_stale_target``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kura.domain.errors import KuraError
from kura.domain.failpoints import BEFORE_OUTBOX_DELETE_AFTER_PEER_ACK, Failpoints
from kura.storage.interfaces import IArtifactStore, IBlockingRunner
from kura.storage.metadata import OutboxMessage
from kura.telemetry.metrics import KuraMetrics

from . import wire
from .bodies import BytesBody, PacedFileBody, StallWatchdog
from .client import PeerClient, PeerResponse, drain, drain_verified
from .digests import BodyDigests
from .limiter import BandwidthLimiter
from .membership import Membership
from .peer_auth import sha256_hex

log = Logger(namespace="kura.replication.outbox")

DELIVERY_FAILED = "delivery of outbox row {seq} to {target} failed: {error}; retry in {delay:.1f}s"
DROPPED_STALE = "dropped {count} outbox rows for {target}, no longer a replication target"
POISON_DROPPED = "outbox row {seq} cannot be delivered ({error}); dropped"
UNSUPPORTED_DROPPED = (
    "{target} does not know artifact deletes (answered {status}: a release before them); "
    "outbox row {seq} dropped, the peer learns the delete when it catches up after its upgrade"
)

#: How a peer of a release without a route answers it.
UNKNOWN_ROUTE_STATUSES = frozenset({404, 405})

#: The worker also wakes this often (backoffs expire, peers come back).
RETRY_SECONDS = 2.0
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0
MAX_INFLIGHT = 8
PER_TARGET_INFLIGHT = 4
BATCH_SIZE = 256


#: Refusals that say the peer (not this message) cannot take anything now:
#: busy, or not accepting our credentials (a secret being rotated).
TARGET_STATUSES = frozenset({401, 403, 429, 503})


class Refused(Exception):
    """The peer answered with a non-2xx status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"peer answered {status}")
        self.status = status


class Unreachable(Exception):
    """The peer could not be reached, or the transfer stalled."""


class Undeliverable(Exception):
    """The row itself is malformed; no retry can ever deliver it."""


@attrs.define
class Backoff:
    failures: int = 0
    retry_at: float = 0.0
    #: The target's membership epoch when it failed (a rejoin clears it).
    epoch: int = 0


class OutboxWorker:
    """Delivers outbox rows to peers (see the module docstring).

    Args:
        store: the outbox and the artifacts.
        client: the peer client.
        membership: stale-target decisions and peer epochs.
        limiter: paces upload bodies.
        clock: time source.
        metrics: delivery counters.
        runner: blocking file reads.
        digests: the bodies' SHA-256, which signed uploads declare.
        failpoints: crash points (``before_outbox_delete_after_peer_ack``).
        stall_seconds: ``KURA_REPLICATION_UPLOAD_STALL_MS`` in seconds.
        jitter: returns a number in [0, 1) (injected for tests).
    """

    def __init__(
        self,
        *,
        store: IArtifactStore,
        client: PeerClient,
        membership: Membership,
        limiter: BandwidthLimiter,
        clock: IReactorTime,
        metrics: KuraMetrics,
        runner: IBlockingRunner,
        digests: BodyDigests,
        failpoints: Failpoints,
        stall_seconds: float,
        jitter: Callable[[], float] = random.random,
        max_inflight: int = MAX_INFLIGHT,
        per_target_inflight: int = PER_TARGET_INFLIGHT,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._store = store
        self._client = client
        self._membership = membership
        self._limiter = limiter
        self._clock = clock
        self._metrics = metrics
        self._runner = runner
        self._digests = digests
        self._failpoints = failpoints
        self._stall = stall_seconds
        self._jitter = jitter
        self._max_inflight = max_inflight
        self._per_target = per_target_inflight
        self._batch = batch_size
        self._inflight: dict[int, Deferred[None]] = {}
        self._target_inflight: dict[str, int] = {}
        self._targets: dict[str, Backoff] = {}
        self._messages: dict[int, Backoff] = {}
        #: Undelivered rows by target, in sequence order (a mirror of the table).
        self._queues: dict[str, dict[int, OutboxMessage]] = {}
        self._max_seq = 0
        self._turn = 0
        self._scanning = False
        self._again = False
        # Until start(): the store's commits poke the worker from construction on.
        self._stopping = True
        self._scan_d: Deferred[None] | None = None
        self._poked: IDelayedCall | None = None
        self._loop = LoopingCall(self.wake)
        self._loop.clock = clock

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._loop.start(RETRY_SECONDS, now=True)

    async def stop(self) -> None:
        """Stop waking, abort deliveries in flight (their rows stay queued)."""
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        if self._poked is not None and self._poked.active():
            self._poked.cancel()
        pending = list(self._inflight.values())
        for d in pending:
            d.cancel()
        if self._scan_d is not None:
            pending.append(self._scan_d)
        await DeferredList(pending, consumeErrors=True)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- scanning -------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake on the next reactor turn (the store calls this inside its commit).

        Scanning from inside the store's commit callback would run deliveries
        (and their own commits) before the committing writer has resumed.
        Ignored while the worker is not running (before :meth:`start`, after
        :meth:`stop`).
        """
        if self._stopping:
            return
        if self._poked is None or not self._poked.active():
            self._poked = self._clock.callLater(0, self.wake)

    def wake(self) -> None:
        """Look for deliverable rows now (coalesced with a scan under way)."""
        if self._stopping:
            return
        if self._scanning:
            self._again = True
            return
        d = Deferred.fromCoroutine(self._scan_loop())
        if not d.called:
            self._scan_d = d

    async def _scan_loop(self) -> None:
        self._scanning = True
        try:
            while True:
                self._again = False
                await self._scan()
                if not self._again or self._stopping:
                    break
        except Exception:
            log.failure("outbox scan failed; retrying on the next wake")
        finally:
            self._scanning = False
            self._scan_d = None

    async def _load_new_rows(self) -> None:
        """Add rows committed since the last look to the per-target queues.

        Only the worker deletes rows, and sequence numbers only grow, so after
        the first full read each scan reads just the new tail: a long backlog
        for an unreachable peer costs nothing while it waits.
        """
        while True:
            rows = await self._store.outbox_batch(self._max_seq, self._batch)
            for row in rows:
                self._queues.setdefault(row.target, {})[row.seq] = row
                self._max_seq = row.seq
            if len(rows) < self._batch:
                return

    async def _scan(self) -> None:
        await self._load_new_rows()
        for target in [t for t in self._queues if self._membership.is_stale_target(t)]:
            await self._drop_stale(target)
        now = self._clock.seconds()
        targets = sorted(self._queues)
        # Rotate the starting target so no target always goes first.
        self._turn = (self._turn + 1) % max(1, len(targets))
        for target in targets[self._turn :] + targets[: self._turn]:
            if not self._target_waiting(target, now):
                for row in self._pick(target, now):
                    self._start(row)

    def _pick(self, target: str, now: float) -> list[OutboxMessage]:
        """The next rows of ``target`` to deliver, within the in-flight limits.

        Walks the queue only as far as it must (a delivery may finish, and
        change the queue, as soon as it starts, so rows are picked first).
        """
        room = min(
            self._max_inflight - len(self._inflight),
            self._per_target - self._target_inflight.get(target, 0),
        )
        picked: list[OutboxMessage] = []
        for seq, row in self._queues.get(target, {}).items():
            if len(picked) >= room:
                break
            if seq in self._inflight:
                continue
            message = self._messages.get(seq)
            if message is None or message.retry_at <= now:
                picked.append(row)
        return picked

    async def _drop_stale(self, target: str) -> None:
        queue = self._queues.get(target, {})
        rows = [row for seq, row in queue.items() if seq not in self._inflight]
        if not rows:
            return
        await self._store.outbox_delete([row.seq for row in rows])
        for row in rows:
            queue.pop(row.seq, None)
            self._messages.pop(row.seq, None)
            operation = str(row.operation.get("type", "unknown"))
            self._metrics.replication_requests.labels(
                wire.target_label(target), operation, "dropped_stale_target"
            ).inc()
        if not queue:
            self._queues.pop(target, None)
        log.info(DROPPED_STALE, count=len(rows), target=target)

    def _target_waiting(self, target: str, now: float) -> bool:
        state = self._targets.get(target)
        return (
            state is not None
            and state.retry_at > now
            and state.epoch == self._membership.epoch(target)
        )

    def _start(self, row: OutboxMessage) -> None:
        self._target_inflight[row.target] = self._target_inflight.get(row.target, 0) + 1
        placeholder: Deferred[None] = Deferred()
        self._inflight[row.seq] = placeholder
        d = Deferred.fromCoroutine(self._deliver(row))
        if not d.called:
            self._inflight[row.seq] = d

    # -- delivery -------------------------------------------------------------------------

    async def _deliver(self, row: OutboxMessage) -> None:
        operation = str(row.operation.get("type", "unknown"))
        label = wire.target_label(row.target)
        started = self._clock.seconds()
        try:
            sent = await self._send(row, operation)
            if sent:
                self._metrics.replication_requests.labels(label, operation, "ok").inc()
                self._metrics.replication_request_duration.labels(operation).observe(
                    self._clock.seconds() - started
                )
            self._failpoints.hit(BEFORE_OUTBOX_DELETE_AFTER_PEER_ACK)
            await self._store.outbox_delete([row.seq])
            self._forget(row)
            self._targets.pop(row.target, None)
        except CancelledError:
            if not self._stopping:
                log.failure("outbox delivery cancelled unexpectedly")
        except Undeliverable as error:
            log.error(POISON_DROPPED, seq=row.seq, error=str(error))
            self._metrics.replication_requests.labels(label, operation, "error").inc()
            await self._store.outbox_delete([row.seq])
            self._forget(row)
        except Refused as error:
            self._metrics.replication_requests.labels(label, operation, "error").inc()
            delay = self._fail_message(row)
            if error.status in TARGET_STATUSES:
                delay = self._fail_target(row.target)
            log.info(DELIVERY_FAILED, seq=row.seq, target=row.target, error=error, delay=delay)
        except KuraError as error:
            # Local storage trouble reading the artifact: only this row waits.
            self._metrics.replication_requests.labels(label, operation, "error").inc()
            delay = self._fail_message(row)
            log.warn(DELIVERY_FAILED, seq=row.seq, target=row.target, error=error, delay=delay)
        except Exception as error:
            if self._stopping:
                return
            self._metrics.replication_requests.labels(label, operation, "error").inc()
            delay = self._fail_target(row.target)
            log.info(
                DELIVERY_FAILED,
                seq=row.seq,
                target=row.target,
                error=f"{type(error).__name__}: {error}",
                delay=delay,
            )
        finally:
            self._inflight.pop(row.seq, None)
            count = self._target_inflight.get(row.target, 1) - 1
            if count:
                self._target_inflight[row.target] = count
            else:
                self._target_inflight.pop(row.target, None)
        if not self._stopping:
            self.wake()

    async def _send(self, row: OutboxMessage, operation: str) -> bool:
        """Deliver one row; returns ``False`` when there was nothing to send."""
        if operation == "upsert_artifact":
            artifact_id = row.operation.get("artifact_id")
            if not isinstance(artifact_id, str):
                raise Undeliverable("upsert without an artifact_id")
            return await self._send_upsert(row.target, artifact_id)
        if operation == "delete_namespace":
            namespace, version = row.operation.get("namespace_id"), row.operation.get("version_ms")
            if not isinstance(namespace, str) or not isinstance(version, int):
                raise Undeliverable("delete without namespace_id or version_ms")
            message = wire.DeleteMessage(namespace, version)
            d = self._client.request(
                "DELETE", row.target, wire.REPLICATE_NAMESPACE_PATH, message.params()
            )
            await self._exchange(d, BytesBody(b""))
            return True
        if operation == "delete_artifact":
            return await self._send_artifact_delete(row)
        raise Undeliverable(f"unknown operation {operation!r}")

    async def _send_artifact_delete(self, row: OutboxMessage) -> bool:
        """Deliver one artifact tombstone; ``False`` when the peer cannot take it (dropped)."""
        fields = row.operation
        artifact_id, namespace, version = (
            fields.get(n) for n in ("artifact_id", "namespace_id", "version_ms")
        )
        if not (
            isinstance(artifact_id, str) and isinstance(namespace, str) and isinstance(version, int)
        ):
            raise Undeliverable("artifact delete without artifact_id, namespace_id or version_ms")
        message = wire.ArtifactDeleteMessage(artifact_id, namespace, version)
        d = self._client.request(
            "DELETE", row.target, wire.REPLICATE_ARTIFACT_PATH, message.params()
        )
        try:
            await self._exchange(d, BytesBody(b""))
        except Refused as error:
            if error.status not in UNKNOWN_ROUTE_STATUSES:
                raise
            log.warn(UNSUPPORTED_DROPPED, target=row.target, status=error.status, seq=row.seq)
            self._metrics.replication_requests.labels(
                wire.target_label(row.target), "delete_artifact", "dropped_unsupported"
            ).inc()
            return False
        return True

    async def _send_upsert(self, target: str, artifact_id: str) -> bool:
        manifest = await self._store.manifest(artifact_id)
        if manifest is None:
            return False  # deleted or evicted since: nothing left to replicate
        try:
            message = wire.UpsertMessage.from_manifest(manifest)
        except ValueError:
            raise Undeliverable(f"unknown producer {manifest.producer!r}") from None
        body: PacedFileBody | BytesBody
        if manifest.in_database:
            value = await self._store.read_inline(manifest)
            if value is None:
                return False
            await self._limiter.wait(len(value))
            body = BytesBody(value)
            digest = manifest.digest or sha256_hex(value)
        else:
            # Only a body that still matches its digest is sent (a damaged
            # one is forgotten here, and fetched again from a peer).
            fd = await self._store.open_intact(manifest)
            if fd is None:
                return False  # damaged: forgotten, nothing to replicate
            try:
                # The peer verifies the body against this before it publishes it.
                digest = await self._digests.of_file(manifest, fd)
            except BaseException:
                os.close(fd)
                raise
            body = PacedFileBody(
                fd=fd,
                length=manifest.size,
                runner=self._runner,
                clock=self._clock,
                limiter=self._limiter,
                on_bytes=self._metrics.replication_body_bytes.labels("sent").inc,
            )
        try:
            d = self._client.request(
                "PUT",
                target,
                wire.REPLICATE_ARTIFACT_PATH,
                message.params(),
                body=body,
                body_sha256=digest,
            )
            await self._exchange(d, body)
        finally:
            body.close()
        return True

    async def _exchange(
        self, request: Deferred[PeerResponse], body: PacedFileBody | BytesBody
    ) -> None:
        """Await the response under the stall watchdog; raise unless it is a signed 2xx."""
        started = self._clock.seconds()
        watchdog = StallWatchdog(
            self._clock,
            self._stall,
            lambda: max(started, body.last_progress),
            request.cancel,
        ).start()
        try:
            response = await request
            status = int(response.code)
            if 200 <= status < 300:
                # An acknowledgement that is not the peer's would drop the row.
                await drain_verified(response)
            else:
                await drain(response)
        except Exception:
            # Cancellation surfaces as the client's own error types.
            if watchdog.stalled:
                raise Unreachable(f"no progress for {self._stall:.0f}s") from None
            raise
        finally:
            watchdog.stop()
        if not 200 <= status < 300:
            raise Refused(status)

    def _forget(self, row: OutboxMessage) -> None:
        """The row is gone from the table: drop it from the queues too."""
        self._messages.pop(row.seq, None)
        queue = self._queues.get(row.target)
        if queue is not None:
            queue.pop(row.seq, None)
            if not queue:
                del self._queues[row.target]

    # -- backoff --------------------------------------------------------------------------

    def _delay(self, failures: int) -> float:
        base = BACKOFF_BASE_SECONDS * float(2 ** min(failures - 1, 16))
        return min(BACKOFF_MAX_SECONDS, base * (0.8 + 0.4 * self._jitter()))

    def _fail_message(self, row: OutboxMessage) -> float:
        state = self._messages.setdefault(row.seq, Backoff())
        state.failures += 1
        delay = self._delay(state.failures)
        state.retry_at = self._clock.seconds() + delay
        return delay

    def _fail_target(self, target: str) -> float:
        state = self._targets.setdefault(target, Backoff())
        epoch = self._membership.epoch(target)
        if state.epoch != epoch:
            state.failures = 0
            state.epoch = epoch
        state.failures += 1
        delay = self._delay(state.failures)
        state.retry_at = self._clock.seconds() + delay
        return delay

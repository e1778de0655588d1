"""Catch-up (bootstrap): pull what this node lacks from every known peer.

For each known peer that is neither caught up nor being caught up, a run
(at most ``KURA_BOOTSTRAP_MAX_CONCURRENT_PEERS`` at once):

1. pages through the peer's **tombstones**, every kind in
   :data:`TOMBSTONE_KINDS`: its namespace tombstones, then its artifact
   tombstones (deleted artifacts; a peer of a release without them answers
   404 and that kind is skipped), and applies them first, so nothing the
   mesh deleted can be resurrected by step 3;
2. pages through its **manifests newest version first**
   (``order=recent``), resuming from the peer's durable watermark
   (:mod:`.watermark`): the first pass lists everything, later passes only
   what changed since the previous one, less the allowed clock skew. A peer
   of an earlier release answers artifact-id-ordered pages instead (no
   ``order`` field), and the run falls back to the whole id walk it knows;
3. for every manifest whose version would apply here (decided without the
   body, as the receiver does), fetches ``/_internal/bootstrap/artifacts/{id}``
   into staging, paced by the bandwidth limiter, checks its length, version
   and digest (the response's ``X-Kura-Content-Sha256``, else the page's),
   and publishes it durably without outbox rows.

A per-artifact gate makes each body download once even when several peers
offer it: the second waiter re-decides after the first finished and finds
the version present. A page's cursor advances, and the watermark is saved
(a commit right after the items' own), only once the whole page was
resolved, so it is never ahead of what is durable; a failed run is retried
on the next membership round and resumes from its cursor, and so does a
restarted node. A run fails after ``KURA_BOOTSTRAP_TIMEOUT_MS`` *without
progress* (pages, items or body bytes), never for merely taking long.

Progress is visible: per-peer gauges of items and bytes walked and
remaining, the readiness reason (``bootstrap in progress: peer X 12/50
items``) and a log line every :data:`PROGRESS_SECONDS` while runs are going.

A run that ends after its peer left (or left and rejoined) is discarded:
readiness only counts catch-ups of the peer's current membership epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    DeferredSemaphore,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kura.domain.artifacts import ArtifactAddress, Producer, is_digest
from kura.domain.errors import BadFraming
from kura.storage.interfaces import IArtifactStore
from kura.storage.metadata import Outcome
from kura.telemetry.metrics import KuraMetrics

from . import wire
from .bodies import StagingSink, Stalled, StallWatchdog
from .client import PeerClient, PeerError, PeerResponse, drain
from .limiter import BandwidthLimiter
from .membership import Membership
from .peer_auth import DIGEST_HEADER
from .receiver import (
    ITEM_ARTIFACT,
    ITEM_ARTIFACT_DELETE,
    ITEM_NAMESPACE,
    SOURCE_BOOTSTRAP,
    Receiver,
)
from .watermark import RECENT, Watermark

log = Logger(namespace="kura.replication.bootstrap")

CAUGHT_UP = "caught up with {peer}: {items} items applied in {seconds:.1f}s"
CATCH_UP_FAILED = "catch-up from {peer} failed ({error}); retrying on the next round"
SKIPPED = "catch-up from {peer} skipped artifact {artifact_id}: {reason}"
SKIPPED_TOMBSTONE = (
    "catch-up from {peer} skipped the tombstone of namespace {namespace!r}: its version is "
    "further ahead than KURA_MAX_CLOCK_SKEW_MS"
)
SKIPPED_ARTIFACT_TOMBSTONE = (
    "catch-up from {peer} skipped the tombstone of artifact {artifact_id}: its version is "
    "further ahead than KURA_MAX_CLOCK_SKEW_MS"
)
NO_TOMBSTONES = "{peer} serves no {kind} (a release before them); catching up without them"
PROGRESS = (
    "catch-up from {peer}: {done}/{total} items, {done_bytes}/{total_bytes} bytes walked "
    "({order} order, {segments} segment(s))"
)
ID_ORDER_FALLBACK = (
    "peer {peer} answers manifest pages in artifact-id order (an earlier release): "
    "catching up with a whole id-order walk"
)

#: Bodies fetched at once within one page of one peer.
FETCH_CONCURRENCY = 4
#: Seconds between progress log lines while catch-ups run.
PROGRESS_SECONDS = 10.0


@attrs.frozen
class TombstoneKind:
    """One kind of tombstone a catch-up pages through before any manifest.

    Attributes:
        path: the peer's page route (``limit``/``after`` paging).
        field: the page's list of items.
        apply: ``apply(bootstrapper, peer, item)`` applies one item and says
            whether it changed anything here (raises ``PeerError`` for an
            invalid item).
        optional: a peer may not have the route yet (a previous release):
            a 404 means it has none of this kind.
    """

    path: str
    field: str
    apply: Callable[[Bootstrapper, str, Any], Awaitable[bool]]
    optional: bool = False


async def _apply_namespace_tombstone(bootstrapper: Bootstrapper, peer: str, item: Any) -> bool:
    return await bootstrapper.apply_namespace_tombstone(peer, item)


async def _apply_artifact_tombstone(bootstrapper: Bootstrapper, peer: str, item: Any) -> bool:
    return await bootstrapper.apply_artifact_tombstone(peer, item)


#: Every kind, in the order they are applied (all before the manifests).
TOMBSTONE_KINDS: tuple[TombstoneKind, ...] = (
    TombstoneKind(wire.TOMBSTONES_PATH, "tombstones", _apply_namespace_tombstone),
    TombstoneKind(
        wire.ARTIFACT_TOMBSTONES_PATH,
        "artifact_tombstones",
        _apply_artifact_tombstone,
        optional=True,
    ),
)


@attrs.define
class _Session:
    """A peer's catch-up state within one membership epoch of it."""

    epoch: int
    key: str
    watermark: Watermark
    applied: int = 0


class KeyedLock:
    """One :class:`DeferredLock` per key, dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[DeferredLock, int]] = {}

    async def acquire(self, key: str) -> None:
        lock, users = self._locks.get(key, (DeferredLock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave(key)
            raise

    def release(self, key: str) -> None:
        lock, _ = self._locks[key]
        lock.release()
        self._leave(key)

    def _leave(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class Bootstrapper:
    """Runs catch-ups against known peers (see the module docstring).

    Args:
        store: the local store.
        client: the peer client.
        membership: known peers, epochs and catch-up bookkeeping.
        receiver: applies fetched items (same rules as replication).
        limiter: paces fetched bodies.
        clock: time source.
        metrics: bootstrap counters.
        max_concurrent_peers: ``KURA_BOOTSTRAP_MAX_CONCURRENT_PEERS``.
        timeout_seconds: ``KURA_BOOTSTRAP_TIMEOUT_MS`` in seconds (no progress).
        stall_seconds: a body fetch with no byte progress this long fails.
        max_inline_bytes: ``KURA_MAX_KEYVALUE_BYTES``.
        max_clock_skew_ms: ``KURA_MAX_CLOCK_SKEW_MS``: how far below a
            watermark the next pass starts.
        page_limit: manifests and tombstones per page.
    """

    def __init__(
        self,
        *,
        store: IArtifactStore,
        client: PeerClient,
        membership: Membership,
        receiver: Receiver,
        limiter: BandwidthLimiter,
        clock: IReactorTime,
        metrics: KuraMetrics,
        max_concurrent_peers: int,
        timeout_seconds: float,
        stall_seconds: float,
        max_inline_bytes: int,
        max_clock_skew_ms: int,
        page_limit: int = wire.DEFAULT_PAGE_LIMIT,
    ) -> None:
        self._store = store
        self._client = client
        self._membership = membership
        self._receiver = receiver
        self._limiter = limiter
        self._clock = clock
        self._metrics = metrics
        self._timeout = timeout_seconds
        self._stall = stall_seconds
        self._max_inline = max_inline_bytes
        self._skew_ms = max_clock_skew_ms
        self._page_limit = page_limit
        self._slots = DeferredSemaphore(max_concurrent_peers)
        self._fetch_gate = KeyedLock()
        self._tasks: dict[str, Deferred[None]] = {}
        self._sessions: dict[str, _Session] = {}
        self._progress: dict[str, float] = {}
        self._stopping = False
        self._reporter = LoopingCall(self._report)
        self._reporter.clock = clock

    # -- scheduling ------------------------------------------------------------------------

    def kick(self) -> None:
        """Start a catch-up for every known peer not caught up and not in progress."""
        if self._stopping:
            return
        caught_up = set(self._membership.bootstrapped_peers)
        for peer in self._membership.known_peers:
            if peer in caught_up or peer in self._tasks:
                continue
            placeholder: Deferred[None] = Deferred()
            self._tasks[peer] = placeholder
            d = Deferred.fromCoroutine(self._run(peer))
            if not d.called:
                self._tasks[peer] = d
        if self._tasks and not self._reporter.running:
            self._reporter.start(PROGRESS_SECONDS, now=False)

    async def stop(self) -> None:
        """Abort every catch-up in progress (resumable after a restart: idempotent)."""
        self._stopping = True
        if self._reporter.running:
            self._reporter.stop()
        pending = list(self._tasks.values())
        for d in pending:
            d.cancel()
        await DeferredList(pending, consumeErrors=True)

    @property
    def running(self) -> list[str]:
        return sorted(self._tasks)

    # -- one run ---------------------------------------------------------------------------

    async def _run(self, peer: str) -> None:
        epoch = self._membership.epoch(peer)
        try:
            await self._slots.acquire()
        except CancelledError:
            self._tasks.pop(peer, None)
            return
        try:
            if not self._membership.is_known(peer) or self._membership.epoch(peer) != epoch:
                return
            await self._attempt(peer, epoch)
        finally:
            self._slots.release()
            self._tasks.pop(peer, None)
            if not self._tasks and self._reporter.running:
                self._reporter.stop()

    async def _attempt(self, peer: str, epoch: int) -> None:
        self._membership.bootstrap_started(peer)
        started = self._clock.seconds()
        self._progress[peer] = started
        work = Deferred.fromCoroutine(self._catch_up(peer, epoch))
        watchdog = StallWatchdog(
            self._clock, self._timeout, lambda: self._progress.get(peer, started), work.cancel
        ).start()
        result = "error"
        try:
            applied = await work
            result = "ok"
        except Exception as error:
            # A cancelled request surfaces as the client's own error type
            # (ResponseNeverReceived, ...), so ask the watchdog what happened.
            if watchdog.stalled:
                result = "timeout"
                log.warn(CATCH_UP_FAILED, peer=peer, error="no progress within the timeout")
            elif self._stopping:
                result = "aborted"
                raise
            else:
                log.warn(CATCH_UP_FAILED, peer=peer, error=f"{type(error).__name__}: {error}")
        finally:
            watchdog.stop()
            self._progress.pop(peer, None)
            counted = self._membership.bootstrap_finished(peer, epoch, result == "ok")
            if result == "ok" and not counted:
                result = "discarded"
            self._metrics.bootstrap_runs.labels(result).inc()
        if result == "ok":
            seconds = self._clock.seconds() - started
            self._metrics.bootstrap_duration.observe(seconds)
            log.info(CAUGHT_UP, peer=peer, items=applied, seconds=seconds)

    def _touch(self, peer: str) -> None:
        if peer in self._progress:
            self._progress[peer] = self._clock.seconds()

    async def _catch_up(self, peer: str, epoch: int) -> int:
        session = await self._session(peer, epoch)
        state = session.watermark
        self._publish_progress(peer, state)
        for kind in TOMBSTONE_KINDS:
            session.applied += await self._tombstones(peer, kind)
        while state.segments:
            segment = state.segments[0]
            order = segment.mode
            if order == RECENT:
                request = wire.PageRequest(
                    self._page_limit, segment.after, wire.ORDER_RECENT, segment.since
                )
            else:
                request = wire.PageRequest(self._page_limit, segment.after)
            page = await self._page(peer, wire.MANIFESTS_PATH, request)
            if order == RECENT and page.get("order") != wire.ORDER_RECENT:
                # A previous release ignored order=: this is an id-ordered page.
                log.info(ID_ORDER_FALLBACK, peer=peer)
                state.fall_back_to_id_order()
                continue
            if order == RECENT and segment.after is None:
                segment.total_items = _count(page, "total_items")
                segment.total_bytes = _count(page, "total_bytes")
            manifests = []
            for item in _items(page, "manifests"):
                try:
                    manifests.append(wire.PeerManifest.from_json(item))
                except ValueError as error:
                    raise PeerError(f"invalid manifest page: {error}") from None
            session.applied += await self._sync_page(peer, manifests)
            state.page_done(_next_after(page), len(manifests), sum(m.size for m in manifests))
            # After the page's own commits: the watermark never runs ahead of them.
            await self._store.save_watermark(session.key, state.to_json())
            self._metrics.bootstrap_walked_items.labels(order).inc(len(manifests))
            self._publish_progress(peer, state)
        applied, session.applied = session.applied, 0
        return applied

    async def _session(self, peer: str, epoch: int) -> _Session:
        """The peer's state: continued within an epoch, else loaded and resumed."""
        session = self._sessions.get(peer)
        now_ms = int(self._clock.seconds() * 1000)
        if session is not None and session.epoch == epoch:
            session.watermark.begin(now_ms, self._skew_ms, resumed=False)
            return session
        key = self._membership.node_url_of(peer)
        watermark = Watermark.from_json(await self._store.watermark(key))
        watermark.begin(now_ms, self._skew_ms, resumed=True)
        session = self._sessions[peer] = _Session(epoch, key, watermark)
        return session

    async def _tombstones(self, peer: str, kind: TombstoneKind) -> int:
        """Page through one kind of the peer's tombstones and apply them; return how many."""
        applied = 0
        after: str | None = None
        while True:
            request = wire.PageRequest(self._page_limit, after)
            try:
                page = await self._page(peer, kind.path, request)
            except PeerError as error:
                if kind.optional and error.status == 404:
                    log.info(NO_TOMBSTONES, peer=peer, kind=kind.field.replace("_", " "))
                    return applied
                raise
            for item in _items(page, kind.field):
                applied += int(await kind.apply(self, peer, item))
                self._touch(peer)
            after = _next_after(page)
            if after is None:
                return applied

    async def apply_namespace_tombstone(self, peer: str, item: Any) -> bool:
        """Apply one namespace tombstone of a peer's page; return whether it applied."""
        message = _tombstone(item)
        if self._receiver.version_ahead(message.version_ms):
            # It would refuse every later write to the namespace.
            log.warn(SKIPPED_TOMBSTONE, peer=peer, namespace=message.namespace_id)
            return False
        outcome = await self._receiver.apply_delete(message, source=SOURCE_BOOTSTRAP)
        if outcome is Outcome.APPLIED:
            self._metrics.bootstrap_applied_items.labels(ITEM_NAMESPACE).inc()
            return True
        return False

    async def apply_artifact_tombstone(self, peer: str, item: Any) -> bool:
        """Apply one artifact tombstone of a peer's page; return whether it applied.

        Applied before the manifests, so a deleted artifact that another peer
        still offers is refused (``ignored_tombstone``) instead of fetched.
        """
        try:
            message = wire.ArtifactDeleteMessage.from_json(item)
        except ValueError as error:
            raise PeerError(f"invalid artifact tombstone page: {error}") from None
        if self._receiver.version_ahead(message.version_ms):
            log.warn(SKIPPED_ARTIFACT_TOMBSTONE, peer=peer, artifact_id=message.artifact_id)
            return False
        outcome = await self._receiver.apply_artifact_delete(message, source=SOURCE_BOOTSTRAP)
        if outcome is Outcome.APPLIED:
            self._metrics.bootstrap_applied_items.labels(ITEM_ARTIFACT_DELETE).inc()
            return True
        return False

    async def _page(self, peer: str, path: str, page: wire.PageRequest) -> Any:
        data = await self._client.get_json(peer, path, page.params())
        self._touch(peer)
        if not isinstance(data, dict):
            raise PeerError(f"{path} answered something other than an object")
        return data

    # -- progress -----------------------------------------------------------------------

    def _publish_progress(self, peer: str, state: Watermark) -> None:
        done, done_bytes, left, left_bytes = state.progress()
        label = wire.target_label(peer)
        self._metrics.bootstrap_peer_items.labels(label, "done").set(done)
        self._metrics.bootstrap_peer_bytes.labels(label, "done").set(done_bytes)
        for gauge, value in (
            (self._metrics.bootstrap_peer_items, left),
            (self._metrics.bootstrap_peer_bytes, left_bytes),
        ):
            if value is None:
                with contextlib.suppress(KeyError):
                    gauge.remove(label, "remaining")
            else:
                gauge.labels(label, "remaining").set(value)
        total = None if left is None else done + left
        self._membership.bootstrap_progressed(peer, done, total)

    def _report(self) -> None:
        """The steady progress line of every catch-up under way."""
        for peer in sorted(self._tasks):
            session = self._sessions.get(peer)
            if session is None or peer not in self._progress:
                continue
            state = session.watermark
            done, done_bytes, left, left_bytes = state.progress()
            log.info(
                PROGRESS,
                peer=peer,
                done=done,
                total="?" if left is None else done + left,
                done_bytes=done_bytes,
                total_bytes="?" if left_bytes is None else done_bytes + left_bytes,
                order=state.segments[0].mode if state.segments else RECENT,
                segments=len(state.segments),
            )

    async def _sync_page(self, peer: str, manifests: list[wire.PeerManifest]) -> int:
        """Resolve every manifest of a page; raise the first failure after all ended."""
        slots = DeferredSemaphore(FETCH_CONCURRENCY)
        results = await DeferredList(
            [slots.run(self._sync_one_deferred, peer, m) for m in manifests],
            consumeErrors=True,
        )
        applied = 0
        for ok, result in results:
            outcome: Any = result  # a Failure when not ok (DeferredList's typing says bool)
            if not ok:
                assert isinstance(outcome, Failure)
                outcome.raiseException()
            applied += int(bool(outcome))
        return applied

    def _sync_one_deferred(self, peer: str, manifest: wire.PeerManifest) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._sync_one(peer, manifest))

    async def _sync_one(self, peer: str, manifest: wire.PeerManifest) -> bool:
        """Bring one manifest's version here if it would apply; return whether it did."""
        try:
            producer = Producer(manifest.producer)
        except ValueError:
            log.warn(
                SKIPPED, peer=peer, artifact_id=manifest.artifact_id, reason="unknown producer"
            )
            return False
        address = ArtifactAddress(producer, manifest.namespace_id, manifest.key)
        if self._store.artifact_id(address) != manifest.artifact_id:
            log.warn(SKIPPED, peer=peer, artifact_id=manifest.artifact_id, reason="id mismatch")
            return False
        if self._receiver.version_ahead(manifest.version_ms):
            # Its sender's outbox delivers it once our clock has caught up.
            log.warn(SKIPPED, peer=peer, artifact_id=manifest.artifact_id, reason="clock skew")
            return False
        await self._fetch_gate.acquire(manifest.artifact_id)
        try:
            decided = await self._store.apply_preview(
                manifest.artifact_id, manifest.namespace_id, manifest.version_ms
            )
            if decided is not None:
                self._receiver.count(SOURCE_BOOTSTRAP, ITEM_ARTIFACT, decided)
                return False
            outcome = await self._fetch(peer, manifest, address)
        finally:
            self._fetch_gate.release(manifest.artifact_id)
        self._touch(peer)
        if outcome is Outcome.APPLIED:
            self._metrics.bootstrap_applied_items.labels(ITEM_ARTIFACT).inc()
            return True
        return False

    async def fetch_from(self, peer: str, manifest: wire.PeerManifest) -> bool:
        """Bring ``manifest``'s version from ``peer`` now, if it would apply here.

        A damaged artifact's repair (:mod:`.repair`) takes the catch-up's own
        way: one fetch per artifact at a time, decided without the body,
        staged, verified against its digest and published without outbox rows.

        Raises:
            Exception: the fetch failed (unreachable peer, refused body).
        """
        return await self._sync_one(peer, manifest)

    async def _fetch(
        self, peer: str, manifest: wire.PeerManifest, address: ArtifactAddress
    ) -> Outcome:
        if manifest.inline and manifest.size > self._max_inline:
            raise PeerError(f"inline artifact {manifest.artifact_id} exceeds the inline limit")
        request = self._client.request("GET", peer, f"{wire.ARTIFACTS_PATH}/{manifest.artifact_id}")
        started = self._clock.seconds()
        sink = StagingSink(
            limiter=self._limiter,
            clock=self._clock,
            expected=manifest.size,
            on_bytes=lambda size: self._fetched(peer, size),
        )
        progress = lambda: max(started, sink.last_progress)  # noqa: E731
        watchdog = StallWatchdog(
            self._clock, self._stall, progress, lambda: _stop(request, sink)
        ).start()
        try:
            return await self._receive(peer, manifest, address, request, sink)
        finally:
            watchdog.stop()

    def _fetched(self, peer: str, size: int) -> None:
        self._metrics.replication_body_bytes.labels("fetched").inc(size)
        self._touch(peer)

    async def _receive(
        self,
        peer: str,
        manifest: wire.PeerManifest,
        address: ArtifactAddress,
        request: Deferred[PeerResponse],
        sink: StagingSink,
    ) -> Outcome:
        response = await request
        if response.code == 404:
            await drain(response)
            self._receiver.count(SOURCE_BOOTSTRAP, ITEM_ARTIFACT, Outcome.IGNORED_STALE)
            return Outcome.IGNORED_STALE
        if response.code != 200:
            await drain(response)
            raise PeerError(f"artifact fetch answered {response.code}", response.code)
        version = response.headers.getRawHeaders(wire.VERSION_HEADER, [b""])[0]
        if version != b"%d" % manifest.version_ms or response.length != manifest.size:
            # Replaced since the page was read: the newer version arrives on its
            # own (outbox or a later catch-up); do not store it under this one.
            response.deliverBody(_Discard())
            self._receiver.count(SOURCE_BOOTSTRAP, ITEM_ARTIFACT, Outcome.IGNORED_STALE)
            return Outcome.IGNORED_STALE
        staging = self._store.stage(
            limit=manifest.size,
            expected_length=manifest.size,
            hashed=True,
            on_pressure=sink.pressure,
        )
        sink.staging = staging
        response.deliverBody(sink)
        try:
            received = await sink.done
            if received != manifest.size:
                raise BadFraming(f"artifact body ended after {received} of {manifest.size} bytes")
        except BaseException:
            await staging.abort()
            raise
        staged = await staging.finish()
        try:
            # Only a body the peer signed is published, and only the body it
            # declared (the store checks it against this digest).
            digest = _declared_digest(response) or manifest.digest
            response.verify(digest or "")
        except BaseException:
            await self._store.discard(staged)
            raise
        message = wire.UpsertMessage.from_manifest(manifest)
        return await self._receiver.publish(
            address, message, staged, source=SOURCE_BOOTSTRAP, digest=digest
        )


class _Discard(Protocol):
    """Drops a response body by closing its connection."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.stopProducing()


def _declared_digest(response: PeerResponse) -> str | None:
    """The body digest a catch-up response names (``X-Kura-Content-Sha256``), if any.

    Raises:
        PeerError: it is repeated or malformed.
    """
    values: list[bytes] | None = response.headers.getRawHeaders(DIGEST_HEADER)
    if not values:
        return None
    digest = values[0].decode("latin-1")
    if len(values) != 1 or not is_digest(digest):
        raise PeerError("catch-up body has an invalid X-Kura-Content-Sha256")
    return digest


def _stop(request: Deferred[Any], sink: StagingSink) -> None:
    if not request.called:
        request.cancel()
    else:
        sink.fail(Stalled("catch-up body made no progress"))


def _items(page: Any, name: str) -> list[Any]:
    items = page.get(name)
    if not isinstance(items, list):
        raise PeerError(f"page lacks a {name} list")
    return items


def _next_after(page: Any) -> str | None:
    value = page.get("next_after")
    if value is not None and not isinstance(value, str):
        raise PeerError("page has an invalid next_after")
    return value


def _count(page: Any, name: str) -> int | None:
    """A total a recency page announces (``None`` when absent or invalid: unknown)."""
    value = page.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _tombstone(item: Any) -> wire.DeleteMessage:
    if not isinstance(item, dict):
        raise PeerError("tombstone must be an object")
    namespace, version = item.get("namespace_id"), item.get("version_ms")
    if not isinstance(namespace, str) or not isinstance(version, int) or version < 1:
        raise PeerError("tombstone lacks namespace_id or version_ms")
    return wire.DeleteMessage(namespace, version)

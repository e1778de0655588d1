"""Read-through: a local miss is answered from the store, then kept locally.

:meth:`ReadThrough.fetch` fetches the artifact's object into the staging
area (on the tier's threads, hashed as it arrives, fsynced), checks its
bytes against the digest in its metadata, and publishes it through the
store's ordinary publish path with the object's version and no replication
targets (every node can read the store itself), so local tombstones and
last-writer-wins apply to it as to a replicated write. Then the caller
serves it like any local hit.

Concurrent misses of one artifact share one fetch (single flight). Each
caller waits at most the read deadline; whatever goes wrong (the store is
down or slow, the object is missing, its bytes do not match its digest, it
was deleted here) is a miss (``None``), never an error, so a client that
fails its build on a 5xx never sees one because of the store. A fetch that
outlives its callers' deadline still completes and publishes, for the next
reader.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kura.domain.artifacts import ArtifactAddress, Manifest, safe_content_type
from kura.objectstore import naming
from kura.objectstore.calls import StoreCalls
from kura.objectstore.client import Fetched, ObjectMissing, StoreError
from kura.storage.interfaces import IBlockingRunner
from kura.storage.metadata import Outcome, WritePolicy
from kura.storage.staging import StagedBody
from kura.storage.store import ArtifactStore

log = Logger(namespace="kura.objectstore")

#: Asks the object store for a local miss: the manifest once published here, or
#: ``None`` (a miss); never raises (:meth:`ReadThrough.fetch`).
ReadThroughFetch = Callable[[ArtifactAddress], Awaitable[Manifest | None]]

CORRUPT_OBJECT = (
    "object {key} does not match its digest (got {actual}, metadata says {expected}); "
    "answered as a miss"
)


class ReadThrough:
    """Fetches local misses from the store (see the module docstring).

    Args:
        store: the node's artifact store.
        calls: metered store requests.
        prefix: the key prefix in the bucket.
        storage: the storage threads (reading a fetched key-value body).
        clock: the deadline's clock.
        deadline_seconds: how long a caller waits (``KURA_OBJECT_STORE_READ_DEADLINE_MS``).
        max_clock_skew_ms: ``KURA_MAX_CLOCK_SKEW_MS``: an object versioned further
            ahead of this node's clock is refused (a miss), as a replicated write
            would be: last writer wins must not be won by a clock gone wrong.
        on_result: called with each fetch's result label (metrics).
    """

    def __init__(
        self,
        *,
        store: ArtifactStore,
        calls: StoreCalls,
        prefix: str,
        storage: IBlockingRunner,
        clock: IReactorTime,
        deadline_seconds: float,
        max_clock_skew_ms: int,
        on_result: Callable[[str], None] = lambda result: None,
    ) -> None:
        self._max_skew_ms = max_clock_skew_ms
        self._store = store
        self._calls = calls
        self._prefix = prefix
        self._storage = storage
        self._clock = clock
        self._deadline = deadline_seconds
        self._on_result = on_result
        self._flights: dict[str, Deferred[Manifest | None]] = {}

    @property
    def in_flight(self) -> int:
        """Fetches under way."""
        return len(self._flights)

    async def fetch(self, address: ArtifactAddress) -> Manifest | None:
        """The manifest of ``address`` once read through and published, or ``None`` (a miss)."""
        artifact_id = self._store.artifact_id(address)
        flight = self._flights.get(artifact_id)
        if flight is None:
            flight = Deferred.fromCoroutine(self._fetch(address, artifact_id))
            self._flights[artifact_id] = flight

            def landed(result: Manifest | None) -> Manifest | None:
                del self._flights[artifact_id]
                return result

            flight.addBoth(landed)
        answer: Deferred[Manifest | None] = Deferred()

        def settle(result: Manifest | None) -> Manifest | None:
            if not answer.called:
                answer.callback(result)
            return result

        flight.addCallback(settle)

        def expire() -> None:
            if not answer.called:
                self._on_result("deadline")
                answer.callback(None)

        timer = self._clock.callLater(self._deadline, expire)
        try:
            return await answer
        finally:
            if timer.active():
                timer.cancel()

    async def _fetch(self, address: ArtifactAddress, artifact_id: str) -> Manifest | None:
        """One fetch; never raises (every failure is a miss, counted and logged)."""
        key = naming.artifact_key(self._prefix, address.namespace, artifact_id)
        path = self._store.layout.new_upload_path()
        try:
            fetched = await self._calls("get", self._calls.client.get_to_file, key, path)
        except ObjectMissing:
            self._on_result("miss")
            return None
        except (StoreError, OSError) as error:
            log.warn("read-through of {key} failed: {error}", key=key, error=str(error))
            self._on_result("error")
            return None
        try:
            return await self._publish(address, key, path, fetched)
        except Exception:
            log.failure("read-through of {key} could not be published", key=key)
            self._on_result("error")
            return None
        finally:
            # Published bodies were moved away; anything left is garbage.
            await self._storage.run(_unlink_if_there, path)

    async def _publish(
        self, address: ArtifactAddress, key: str, path: str, fetched: Fetched
    ) -> Manifest | None:
        try:
            stored = naming.parse_metadata(fetched.metadata)
        except ValueError as error:
            log.warn("object {key} is not kura's: {error}", key=key, error=str(error))
            self._on_result("error")
            return None
        if stored.version_ms > self._clock.seconds() * 1000 + self._max_skew_ms:
            log.warn(
                "object {key} is versioned {version} ms, more than {skew} ms ahead; a miss",
                key=key,
                version=stored.version_ms,
                skew=self._max_skew_ms,
            )
            self._on_result("future")
            return None
        if fetched.sha256 != stored.digest:
            log.error(CORRUPT_OBJECT, key=key, actual=fetched.sha256, expected=stored.digest)
            self._on_result("corrupt")
            return None
        # The object's version and no targets: what replicas get (every node
        # reads the store itself), so tombstones and LWW apply alike.
        content_type = safe_content_type(stored.content_type)
        policy = WritePolicy.LAST_WRITER_WINS
        if stored.inline:
            value = await self._storage.run(_read, path)
            result = await self._store.put_inline(
                address,
                value,
                content_type=content_type,
                policy=policy,
                version_ms=stored.version_ms,
                targets=(),
                expected_digest=stored.digest,
            )
        else:
            result = await self._store.publish_blob(
                address,
                StagedBody(path, fetched.size, fetched.sha256, reserved=0),
                content_type=content_type,
                policy=policy,
                version_ms=stored.version_ms,
                targets=(),
                expected_digest=stored.digest,
            )
        if result.outcome is Outcome.APPLIED:
            self._on_result("hit")
            return result.manifest
        if result.outcome is Outcome.IGNORED_TOMBSTONE:
            self._on_result("stale")  # deleted or cleaned here after it was written
            return None
        # A version as new or newer landed here meanwhile: serve that.
        self._on_result("hit")
        return await self._store.manifest(result.manifest.artifact_id)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _unlink_if_there(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

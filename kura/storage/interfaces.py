"""The storage layer's seams, as zope interfaces.

``verifyObject`` tests keep the implementations honest: see
``tests/storage/test_storage_interfaces.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # the store's own modules import this one
    import sqlite3

    from kura.domain.artifacts import ArtifactAddress, Manifest
    from kura.storage.metadata import (
        ArtifactTombstone,
        OutboxMessage,
        Outcome,
        Upload,
        WritePolicy,
    )
    from kura.storage.staging import StagedBody, StagingFile
    from kura.storage.store import PublishResult

P = ParamSpec("P")
T = TypeVar("T")


class IBlockingRunner(Interface):
    """Runs blocking work (file writes, fsync, SQLite) off the reactor thread.

    Implemented by :class:`kura.storage.runner.ThreadPoolRunner` (a bounded
    pool) and, for deterministic tests, by
    :class:`kura.storage.runner.ImmediateRunner` and
    :class:`kura.testing.ControlledRunner` (inline on the calling thread).
    """

    def run(f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Call ``f(*args, **kwargs)`` somewhere it may block; fire with its result.

        The Deferred fires on the reactor thread, with ``f``'s exception as
        a failure when it raises.
        """


class IReplicationTargets(Interface):
    """Where a write must be replicated, asked at write time.

    The store queues one outbox row per target in the transaction of the
    write itself. Implemented by the mesh's membership
    (:class:`kura.replication.membership.Membership`) and, for a store
    without peers, by :class:`kura.storage.store.StaticTargets`.
    """

    def targets() -> Sequence[str]:
        """The internal base URLs of the peers a write made now must reach."""


class IWriteHooks(Interface):
    """What the store tells a tier behind it about client writes and deletes.

    Each method runs on the storage thread that commits, inside the metadata
    transaction of the write it hears of (after it applied), on the writer
    connection ``conn``: what it records commits or rolls back with that
    write. Raising refuses the write (its changes roll back and the caller
    gets the error). Only writes and deletes a client asked of this node are
    told: replicated ones, and those the tier itself applies, are not.
    Implemented by :class:`kura.objectstore.queue.UploadQueue`.
    """

    def artifact_written(conn: sqlite3.Connection, manifest: Manifest, now_ms: int) -> None:
        """``manifest`` was published."""

    def namespace_deleted(
        conn: sqlite3.Connection, namespace_id: str, version_ms: int, now_ms: int
    ) -> None:
        """``namespace_id`` was cleaned at ``version_ms``."""

    def artifact_deleted(
        conn: sqlite3.Connection, tombstone: ArtifactTombstone, now_ms: int
    ) -> None:
        """One artifact was deleted (``tombstone`` recorded)."""


class IArtifactStore(Interface):
    """Durable artifacts: what the serving paths and replication ask of the store.

    Implemented by :class:`kura.storage.store.ArtifactStore` (its docstring
    states the durable publish order). Every coroutine fails with a
    :class:`~kura.domain.errors.KuraError` (``InsufficientStorage``,
    ``StorageFault``, ...) when storage does; a read of an artifact whose
    body is missing or not the published one forgets it and answers as a
    miss. Its lifecycle (``start``, ``stop``) and gauges belong to the node,
    which holds the concrete store.
    """

    outbox_depth = Attribute("Outbox rows not yet delivered (write shedding reads it).")

    # -- identity and reads -------------------------------------------------------------

    def artifact_id(address: ArtifactAddress) -> str:
        """The id of the artifact at ``address`` on this node's tenant."""

    def cached_manifest(artifact_id: str) -> Manifest | None:
        """The manifest if it is in memory; ``None`` means *unknown*, not absent."""

    async def manifest(artifact_id: str) -> Manifest | None:
        """The current manifest of ``artifact_id``, or ``None`` when not stored."""

    async def manifests(artifact_ids: Sequence[str]) -> dict[str, Manifest]:
        """The current manifests of many ids at once, keyed by id; absent ones left out."""

    async def stored(artifact_id: str) -> Manifest | None:
        """The manifest of an artifact whose body is really there, else ``None``."""

    async def read_inline(manifest: Manifest) -> bytes | None:
        """The body of an artifact kept in the database (``manifest.in_database``:
        key-value entries, small blobs), or ``None`` when gone or damaged."""

    def open_body(manifest: Manifest) -> int:
        """Open a file-backed artifact's body (the caller closes it); ``OSError`` if it cannot."""

    async def open_intact(manifest: Manifest) -> int | None:
        """Open the body if it is the published one (the caller closes it), else ``None``.

        Missing, of another size or not matching its digest: the artifact is
        forgotten as damaged. Raises ``OSError`` when the file exists but
        cannot be opened or read.
        """

    def record_access(artifact_id: str) -> None:
        """Note a read for the LRU order."""

    async def remove_local(manifest: Manifest) -> bool:
        """Remove one artifact version from this node only; whether it was stored."""

    # -- writes ---------------------------------------------------------------------------

    def stage(
        *,
        limit: int,
        expected_length: int | None = None,
        hashed: bool = True,
        on_pressure: Callable[[bool], None] | None = None,
    ) -> StagingFile:
        """Start receiving a body into staging, counted against ``limit`` and the budget."""

    async def discard(staged: StagedBody) -> None:
        """Throw away a finished staged body that will not be published."""

    async def publish_blob(
        address: ArtifactAddress,
        staged: StagedBody,
        *,
        content_type: str,
        policy: WritePolicy,
        version_ms: int | None = None,
        targets: Sequence[str] | None = None,
        expected_digest: str | None = None,
    ) -> PublishResult:
        """Publish a staged body durably; ``targets`` overrides the replication targets.

        Raises:
            DigestMismatch: the body's SHA-256 is not ``expected_digest``;
                nothing was stored.
        """

    async def put_inline(
        address: ArtifactAddress,
        value: bytes,
        *,
        content_type: str,
        policy: WritePolicy,
        version_ms: int | None = None,
        targets: Sequence[str] | None = None,
    ) -> PublishResult:
        """Store a small body inline (key-value entries); ``targets`` as for publish_blob."""

    async def delete_namespace(
        namespace_id: str, version_ms: int | None = None, *, targets: Sequence[str] | None = None
    ) -> Outcome:
        """Tombstone a namespace: every artifact in it older than the version goes."""

    async def delete_artifact(
        artifact_id: str,
        namespace_id: str,
        version_ms: int | None = None,
        *,
        targets: Sequence[str] | None = None,
    ) -> Outcome:
        """Drop one artifact and tombstone it (a client's delete, or a peer's replicated)."""

    async def purge_artifact_tombstones(deleted_before_ms: int, limit: int) -> int:
        """Forget up to ``limit`` artifact tombstones older than the retention; how many went."""

    async def oldest_access_ms() -> int | None:
        """When the least recently used blob was last used (``None``: none)."""

    async def artifact_tombstone_count() -> int:
        """How many artifact tombstones are kept."""

    def add_commit_listener(listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every commit that may have queued rows for the
        tiers beside the store (outbox, write hooks); it must not commit synchronously."""

    # -- multipart uploads ------------------------------------------------------------------

    async def start_upload(
        *, tenant_id: str, namespace_id: str, category: str, hash: str, name: str
    ) -> str:
        """Record a new multipart upload and return its id (``TooManyRequests`` at the cap)."""

    async def upload(upload_id: str) -> Upload | None:
        """The unfinished multipart upload ``upload_id``, or ``None``."""

    async def put_part(
        upload_id: str, part_number: int, staged: StagedBody, total_limit: int
    ) -> None:
        """Keep a durable part of a multipart upload."""

    async def complete_upload(
        upload: Upload, parts: Sequence[int], address: ArtifactAddress, content_type: str
    ) -> PublishResult:
        """Assemble the listed parts, in order, into one artifact and publish it."""

    # -- replication ------------------------------------------------------------------------

    async def apply_preview(artifact_id: str, namespace_id: str, version_ms: int) -> Outcome | None:
        """What a last-writer-wins apply of ``version_ms`` would do, decided without a body."""

    async def outbox_batch(after_seq: int, limit: int) -> list[OutboxMessage]:
        """Undelivered outbox rows after ``after_seq``, in sequence order."""

    async def outbox_delete(seqs: Sequence[int]) -> None:
        """Forget delivered outbox rows."""

    async def manifests_page(after: str | None, limit: int) -> list[Manifest]:
        """Manifests in artifact-id order, strictly after ``after`` (catch-up paging)."""

    async def tombstones_page(after: str | None, limit: int) -> list[tuple[str, int]]:
        """Namespace tombstones in namespace order, strictly after ``after``."""

    async def artifact_tombstones_page(after: str | None, limit: int) -> list[ArtifactTombstone]:
        """Artifact tombstones in artifact-id order, strictly after ``after``."""

    async def recent_manifests_page(
        before: tuple[int, str] | None, since_ms: int | None, limit: int
    ) -> list[Manifest]:
        """Manifests newest version first, strictly below the cursor ``(version_ms, id)``."""

    async def manifest_totals(since_ms: int | None) -> tuple[int, int]:
        """``(count, bytes)`` of the manifests with a version strictly above ``since_ms``."""

    async def watermark(peer: str) -> str | None:
        """The durable catch-up state of ``peer`` (opaque JSON text), or ``None``."""

    async def save_watermark(peer: str, state: str) -> None:
        """Durably record ``peer``'s catch-up state (after what it covers was committed)."""

"""The REAPI cache on the artifact store: what the gRPC handlers ask of it.

Every method here runs on the reactor thread (the handlers reach it through
:class:`kura.reapi.bridge.ReactorBridge`). Blobs and action results are
ordinary artifacts (producer ``reapi``, the instance's namespace, keys from
:mod:`kura.reapi.names`), so durable publish, eviction, capacity, metrics
and replication are the store's. Blob writes are write-once and verified
(hash and size) before they are published; action results are
last-writer-wins, like the Bazel HTTP cache's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, TypeVar

from twisted.internet.defer import Deferred, gatherResults, succeed

from kura.domain.artifacts import OCTET_STREAM, ArtifactAddress, Manifest
from kura.domain.errors import DigestMismatch as StoreDigestMismatch
from kura.objectstore.readthrough import ReadThroughFetch
from kura.storage.interfaces import IArtifactStore
from kura.storage.metadata import WritePolicy
from kura.storage.staging import StagedBody, StagingFile

from .names import Digest, InvalidName, action_address, blob_address

T = TypeVar("T")

#: A blob opened for reading: a descriptor (the caller closes it) or an inline body.
Opened = int | bytes


class DigestMismatch(InvalidName):
    """The uploaded bytes are not the digest's (``INVALID_ARGUMENT``; nothing stored)."""


class BlobUpload:
    """One blob being received into staging, chunk by chunk (reactor thread).

    Args:
        digest: what the body must turn out to be.
        stage: opens the staging file (hashing as it writes), given the
            callback that pauses and resumes this upload.
    """

    def __init__(
        self, digest: Digest, stage: Callable[[Callable[[bool], None]], StagingFile]
    ) -> None:
        self.digest = digest
        self._resumed: Deferred[None] | None = None
        self._paused = False
        self.staging = stage(self.on_pressure)

    def on_pressure(self, paused: bool) -> None:
        self._paused = paused
        if not paused and self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)

    def write(self, data: bytes) -> Deferred[None]:
        """Take ``data``; fires once the staging file wants more (back-pressure).

        Raises:
            InvalidName: more bytes than the digest's size.
        """
        if self.staging.received + len(data) > self.digest.size:
            raise DigestMismatch(f"more than the {self.digest.size} bytes of digest {self.digest}")
        self.staging.write(data)
        if not self._paused:
            return succeed(None)
        self._resumed = Deferred()
        return self._resumed

    def abort(self) -> Deferred[None]:
        return self.staging.abort()


class ReapiCache:
    """REAPI operations on the store (see the module docstring).

    Args:
        store: the node's artifact store.
        on_blob_read: called with ``(result, size)`` for every blob looked
            up for reading (``ok``/``not_found``): the artifact read metrics.
        on_blob_write: called with ``(result, size)`` for every blob write.
        read_through: asks the object store for a blob or action result
            missing here (reads only: ``FindMissingBlobs`` answers from this
            node, so a client uploads again what only the store holds).
    """

    def __init__(
        self,
        store: IArtifactStore,
        *,
        on_blob_read: Callable[[str, int], None] = lambda result, size: None,
        on_blob_write: Callable[[str, int], None] = lambda result, size: None,
        read_through: ReadThroughFetch | None = None,
    ) -> None:
        self._store = store
        self._read_through = read_through
        self._on_read = on_blob_read
        self._on_write = on_blob_write

    # -- reads --------------------------------------------------------------------------

    async def missing(self, namespace: str, digests: Sequence[Digest]) -> list[Digest]:
        """The digests of ``digests`` this instance does not hold (the empty blob it always does).

        A present blob's access time is refreshed, as a read would: a build
        that only asks is still using it.
        """
        ids = {
            digest: self._store.artifact_id(blob_address(namespace, digest))
            for digest in digests
            if not digest.empty
        }
        found = await self._store.manifests(list(ids.values()))
        missing = []
        for digest, artifact_id in ids.items():
            manifest = found.get(artifact_id)
            if manifest is None or manifest.size != digest.size:
                missing.append(digest)
            else:
                self._store.record_access(artifact_id)
        return missing

    async def missing_after_read_through(
        self, namespace: str, digests: Sequence[Digest]
    ) -> list[Digest]:
        """As :meth:`missing`, but blobs missing here are read through from the
        object store first (concurrently); only what neither holds is missing.

        For the outputs of an action result about to be served: the client
        downloads them next, so fetching them now costs nothing extra.
        ``FindMissingBlobs`` keeps :meth:`missing` (a client about to upload
        must not make the node download).
        """
        missing = await self.missing(namespace, digests)
        fetch = self._read_through
        if not missing or fetch is None:
            return missing
        fetched = await gatherResults(
            [
                Deferred.fromCoroutine(_awaited(fetch(blob_address(namespace, digest))))
                for digest in missing
            ]
        )
        return [
            digest
            for digest, manifest in zip(missing, fetched, strict=True)
            if manifest is None or manifest.size != digest.size
        ]

    async def _manifest(self, address: ArtifactAddress, size: int | None) -> Manifest | None:
        artifact_id = self._store.artifact_id(address)
        manifest = self._store.cached_manifest(artifact_id) or await self._store.manifest(
            artifact_id
        )
        if manifest is None and self._read_through is not None:
            manifest = await self._read_through(address)
        if manifest is None or (size is not None and manifest.size != size):
            return None
        return manifest

    async def _open(self, manifest: Manifest) -> Opened | None:
        if manifest.in_database:
            return await self._store.read_inline(manifest)
        return await self._store.open_intact(manifest)

    async def open_blob(self, namespace: str, digest: Digest) -> Opened | None:
        """Open blob ``digest`` for reading, or ``None`` when this instance lacks it."""
        if digest.empty:
            return b""
        manifest = await self._manifest(blob_address(namespace, digest), digest.size)
        opened = None if manifest is None else await self._open(manifest)
        if manifest is None or opened is None:
            self._on_read("not_found", 0)
            return None
        self._store.record_access(manifest.artifact_id)
        self._on_read("ok", digest.size)
        return opened

    async def open_action_result(self, namespace: str, action: Digest) -> Opened | None:
        """Open the stored action result of ``action`` (not yet validated), or ``None``."""
        manifest = await self._manifest(action_address(namespace, action), None)
        opened = None if manifest is None else await self._open(manifest)
        if manifest is None or opened is None:
            self._on_read("not_found", 0)
            return None
        self._store.record_access(manifest.artifact_id)
        self._on_read("ok", manifest.size)
        return opened

    # -- writes -------------------------------------------------------------------------

    async def put_blob(self, namespace: str, digest: Digest, data: bytes) -> None:
        """Store verified bytes (the caller checked the hash) as blob ``digest``."""
        if digest.empty:
            return
        await self._put(blob_address(namespace, digest), data, WritePolicy.WRITE_ONCE)
        self._on_write("ok", len(data))

    async def put_action_result(self, namespace: str, action: Digest, data: bytes) -> None:
        """Store a serialized ``ActionResult`` for ``action`` (last writer wins)."""
        await self._put(action_address(namespace, action), data, WritePolicy.LAST_WRITER_WINS)
        self._on_write("ok", len(data))

    async def _put(self, address: ArtifactAddress, data: bytes, policy: WritePolicy) -> None:
        staging = self._store.stage(limit=len(data), expected_length=len(data))
        try:
            staging.write(data)
        except BaseException:
            await staging.abort()
            raise
        staged = await staging.finish()
        await self._store.publish_blob(address, staged, content_type=OCTET_STREAM, policy=policy)

    def start_upload(self, digest: Digest) -> BlobUpload:
        """Start receiving blob ``digest`` in chunks (ByteStream ``Write``)."""
        return BlobUpload(
            digest,
            lambda on_pressure: self._store.stage(
                limit=digest.size,
                expected_length=digest.size,
                hashed=True,
                on_pressure=on_pressure,
            ),
        )

    def _mismatch(self, message: str) -> NoReturn:
        self._on_write("digest_mismatch", 0)
        raise DigestMismatch(message)

    async def finish_upload(self, namespace: str, upload: BlobUpload) -> None:
        """Verify the received body against its digest and publish it.

        Raises:
            DigestMismatch: wrong size or hash; nothing is stored.
        """
        staged: StagedBody = await upload.staging.finish()
        digest = upload.digest
        if staged.size != digest.size:
            await self._store.discard(staged)
            self._mismatch(f"uploaded data ({staged.size} bytes) does not match digest {digest}")
        try:
            # The store checks the hash, computed as the body was staged or as
            # its batch was written, before anything is published.
            await self._store.publish_blob(
                blob_address(namespace, digest),
                staged,
                content_type=OCTET_STREAM,
                policy=WritePolicy.WRITE_ONCE,
                expected_digest=digest.hash,
            )
        except StoreDigestMismatch:
            self._mismatch(f"uploaded data does not match the sha256 of digest {digest}")
        self._on_write("ok", staged.size)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable

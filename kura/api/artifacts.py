"""The steps every protocol's artifact routes share: find, open, serve, publish, count.

Protocol handlers (:mod:`kura.api.protocols`) compose an
:class:`ArtifactService`; only what is specific to a protocol stays in its
module. The service works on the request's admission, so the artifact it
acts on is the one the hooks were shown (:func:`kura.api.routes.resolve_target`).

Reads (:meth:`ArtifactService.download`):

* a missing manifest is asked of the object store first, when the tier is
  on (read-through: it answers within its deadline, a manifest now stored
  here or a miss, never an error);
* a missing manifest is the route's 404 (``RouteSpec.not_found_message``);
* a storage fault is a 503, or a miss for clients that fail a whole build on
  a 5xx (``RouteSpec.misses_on_fault``);
* a blob file that is gone, has another size than its manifest or bytes that
  do not hash to its digest is damage: the artifact is forgotten and the read
  (GET, HEAD or a range) is a miss
  (:meth:`~kura.storage.store.ArtifactStore.open_intact`);
* status and headers come from :func:`kura.web.download.artifact_head`, the
  function the accelerator uses too; a file-backed body is returned as a
  :class:`StreamedBody`, sent once the response head is final, and a body
  kept in the database (a small blob) as its bytes, checked against its
  digest when read back (:meth:`~kura.storage.store.ArtifactStore.read_inline`).

Writes (:meth:`ArtifactService.publish`) follow the route's write policy:
write-once (an artifact already stored wins; the gate answers most of those
from the head, body unread) or last writer wins (``RouteSpec.overwrites``).

Every read and write is counted once, by producer and result, in
``kura_artifact_reads_total``/``kura_artifact_writes_total`` (and their byte
counters); a streamed body is counted when its transfer ends
(:class:`kura.web.accounting.Egress`).
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from kura.defer import shielded
from kura.domain.artifacts import OCTET_STREAM, ArtifactAddress, Manifest, Producer
from kura.domain.errors import (
    KuraError,
    NotFound,
    ServiceUnavailable,
    TombstonedWrite,
)
from kura.objectstore.readthrough import ReadThroughFetch
from kura.storage.interfaces import IBlockingRunner
from kura.storage.metadata import Outcome, WritePolicy
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics
from kura.web.accounting import producer_label
from kura.web.download import (
    CHUNK_BYTES,
    H2_CHUNK_BYTES,
    SMALL_BODY_BYTES,
    ArtifactHead,
    FileBodyProducer,
    SmallFileBody,
    TransferFailed,
    artifact_head,
)
from kura.web.ranges import BodySlice
from kura.web.request import KuraRequest
from kura.web.routing import RouteSpec

from .handling import admission_of, header

log = Logger(namespace="kura.api")


@attrs.define
class StreamedBody:
    """A file-backed artifact body whose response head is already set.

    It owns ``fd`` until :meth:`send` hands it to a producer or
    :meth:`discard` closes it; exactly one of the two must be called.
    Sending is left to the caller so that the head can still change (the
    extension's response headers) before the first byte goes out.
    """

    fd: int
    body: BodySlice
    spec: RouteSpec
    runner: IBlockingRunner

    def discard(self) -> None:
        """Close the file without sending anything."""
        os.close(self.fd)

    async def send(self, request: KuraRequest) -> bytes:
        """Stream the body; returns once it was delivered or the transfer ended.

        The transfer is counted when it ends, whatever its result. A body
        that ends short or stalls leaves the connection unusable: it is
        closed (an HTTP/2 stream that stalls is reset).
        """
        site = request.kura_site
        started = site.clock.seconds()
        if self.body.length <= SMALL_BODY_BYTES:
            small = SmallFileBody(
                request=request, fd=self.fd, offset=self.body.offset, length=self.body.length
            )
            try:
                small.send()
            except TransferFailed as failure:
                self._account(site, failure.result, small.sent, started)
                self._ended_early(request, failure)
            except Exception:
                self._account(site, "error", small.sent, started)
                raise
            else:
                self._account(site, "ok", small.sent, started)
            return b""
        body = FileBodyProducer(
            request=request,
            fd=self.fd,
            offset=self.body.offset,
            length=self.body.length,
            runner=self.runner,
            clock=site.clock,
            send_timeout=site.send_timeout,
            chunk_bytes=H2_CHUNK_BYTES if request.clientproto == b"HTTP/2" else CHUNK_BYTES,
        )

        def account(result: object) -> object:
            # On the transfer itself, not on the awaiting: a cancelled
            # request is counted once, when its transfer really ends.
            error = result.value if isinstance(result, Failure) else None
            label = (
                error.result
                if isinstance(error, TransferFailed)
                else "error"
                if isinstance(result, Failure)
                else "ok"
            )
            self._account(site, label, body.sent, started)
            return result

        transfer: Deferred[Any] = body.start()
        transfer.addBoth(account)
        try:
            await shielded(transfer)
        except TransferFailed as failure:
            self._ended_early(request, failure)
        return b""

    def _account(self, site: Any, result: str, sent: int, started: float) -> None:
        site.egress.record(producer_label(self.spec), result, sent, site.clock.seconds() - started)

    def _ended_early(self, request: KuraRequest, failure: TransferFailed) -> None:
        channel: Any = request.channel
        if channel is not None:
            # A short or stalled body must not leave the connection reusable.
            channel.persistent = False
            if failure.result == "write_timeout":
                # An HTTP/2 stream is its own transport (its .transport
                # is None): it is reset, the connection's others go on.
                (channel.transport or channel).abortConnection()
        if failure.result == "incomplete":
            log.error("artifact body ended early; connection closed", route=self.spec.template)


#: What a download answers: an inline body (or none, for HEAD), or a file to stream.
Body = bytes | StreamedBody


class ArtifactService:
    """The shared artifact steps of the public routes (see the module docstring).

    Args:
        store: the node's artifact store.
        metrics: where reads, writes and the serving path are counted.
        runner: the storage threads file bodies are read on.
        read_through: asks the object store for a local miss; none without the tier.
    """

    def __init__(
        self,
        *,
        store: ArtifactStore,
        metrics: KuraMetrics,
        runner: IBlockingRunner,
        read_through: ReadThroughFetch | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._runner = runner
        self._read_through = read_through

    # -- counting -------------------------------------------------------------------

    def count_write(self, producer: Producer | None, result: str, size: int = 0) -> None:
        """Count one write of ``producer`` with ``result`` (and its bytes)."""
        if producer is not None:
            self._metrics.artifact_writes.labels(producer.value, result).inc()
            if size:
                self._metrics.artifact_write_bytes.labels(producer.value, result).inc(size)

    def count_read(self, producer: Producer | None, result: str, size: int = 0) -> None:
        """Count one read of ``producer`` with ``result`` (and its bytes)."""
        if producer is not None:
            self._metrics.artifact_reads.labels(producer.value, result).inc()
            if size:
                self._metrics.artifact_read_bytes.labels(producer.value, result).inc(size)

    # -- reads ----------------------------------------------------------------------

    async def download(self, request: KuraRequest) -> Body:
        """Answer a GET or HEAD of the admitted artifact.

        Sets status and headers. Returns the inline body (``b""`` for a
        HEAD), or the file-backed body to send once the head is final.

        Raises:
            NotFound: not stored, damaged, or (``misses_on_fault``) a fault.
            ServiceUnavailable: a storage fault.
            RangeNotSatisfiable: the range starts past the end.
        """
        admitted = await admission_of(request)
        spec = admitted.spec
        address = admitted.address
        assert address is not None
        manifest = await self.find(spec, address)
        if manifest.inline:
            return await self._inline(request, spec, manifest)
        if manifest.in_database:
            return await self._stored_in_database(request, spec, manifest)
        fd = await self._open(spec, manifest)
        try:
            head = self._head(request, spec, manifest)
        except KuraError:
            os.close(fd)
            raise
        if self._answered_head(request, spec, manifest, head):
            os.close(fd)
            return b""
        self._metrics.serving_paths.labels("fallback").inc()
        return StreamedBody(fd, head.body, spec, self._runner)

    def _head(self, request: KuraRequest, spec: RouteSpec, manifest: Manifest) -> ArtifactHead:
        """The response head of a blob, for the request's Range and If-Range."""
        try:
            return artifact_head(manifest, header(request, b"range"), header(request, b"if-range"))
        except KuraError as error:
            if error.status == 416:
                self.count_read(spec.producer, "range_not_satisfiable")
            raise

    def _answered_head(
        self, request: KuraRequest, spec: RouteSpec, manifest: Manifest, head: ArtifactHead
    ) -> bool:
        """Record the read and set the response's status and headers from
        ``head``; whether that answered the request (a ``HEAD``: no body)."""
        self._store.record_access(manifest.artifact_id)
        request.setResponseCode(head.status)
        for name, value in head.headers:
            request.setHeader(name, value)
        if request.method == b"HEAD":
            self.count_read(spec.producer, "ok")
            return True
        return False

    async def _stored_in_database(
        self, request: KuraRequest, spec: RouteSpec, manifest: Manifest
    ) -> bytes:
        """A small blob kept in the metadata database: the head of any blob
        (ranges, validators), its bytes from memory or one storage read,
        counted as a transfer that ends as it is written (as a small file's)."""
        site = request.kura_site
        started = site.clock.seconds()
        head = self._head(request, spec, manifest)
        value = await self._read_inline(spec, manifest)
        if self._answered_head(request, spec, manifest, head):
            return b""
        body = head.body
        site.egress.record(producer_label(spec), "ok", body.length, site.clock.seconds() - started)
        self._metrics.serving_paths.labels("fallback").inc()
        return value[body.offset : body.offset + body.length]

    async def find(self, spec: RouteSpec, address: ArtifactAddress) -> Manifest:
        """The manifest of ``address`` (read through on a local miss); a miss or a
        fault is counted and raised."""
        try:
            manifest = await self._store.manifest(self._store.artifact_id(address))
        except KuraError as error:
            self.count_read(spec.producer, "error")
            raise self._read_fault(spec, error.message) from error
        if manifest is None and self._read_through is not None:
            manifest = await self._read_through(address)
        if manifest is None:
            self.count_read(spec.producer, "not_found")
            raise NotFound(spec.not_found_message)
        return manifest

    async def _open(self, spec: RouteSpec, manifest: Manifest) -> int:
        """The open body file of ``manifest``, its bytes verified (the caller closes it)."""
        try:
            fd = await self._store.open_intact(manifest)
        except OSError as error:
            self.count_read(spec.producer, "error")
            raise self._read_fault(spec, f"cannot open artifact: {error.strerror}") from error
        if fd is None:
            # Damage: forgotten (even if the client left meanwhile), and a miss.
            self.count_read(spec.producer, "not_found")
            raise NotFound(spec.not_found_message)
        return fd

    async def _inline(self, request: KuraRequest, spec: RouteSpec, manifest: Manifest) -> bytes:
        value = await self._read_inline(spec, manifest)
        self._store.record_access(manifest.artifact_id)
        self.count_read(spec.producer, "ok", len(value))
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", manifest.content_type.encode("ascii", "replace"))
        request.setHeader(b"Content-Length", b"%d" % len(value))
        return value

    async def _read_inline(self, spec: RouteSpec, manifest: Manifest) -> bytes:
        """The body of ``manifest`` kept in the database; a miss or a fault is
        counted and raised."""
        try:
            value = await self._store.read_inline(manifest)
        except KuraError as error:
            self.count_read(spec.producer, "error")
            raise self._read_fault(spec, error.message) from error
        if value is None:
            self.count_read(spec.producer, "not_found")
            raise NotFound(spec.not_found_message)
        return value

    def _read_fault(self, spec: RouteSpec, detail: str) -> KuraError:
        """A storage fault on a read: 503, or a miss for clients that die on 5xx."""
        log.error("artifact read failed: {detail}", detail=detail, route=spec.template)
        if spec.misses_on_fault:
            return NotFound(spec.not_found_message)
        return ServiceUnavailable(f"Artifact storage unavailable: {detail}")

    # -- writes ---------------------------------------------------------------------

    async def publish(self, request: KuraRequest) -> bool:
        """Store the admitted upload under the route's write policy.

        Write-once by default: an artifact already stored wins and the upload
        stores nothing. ``RouteSpec.overwrites`` routes replace it (last
        writer wins). A ``verify_digest`` route's body must hash to its key.

        Returns:
            Whether this upload was stored (``False``: it was already there).

        Raises:
            DigestMismatch: the body does not match its SHA-256 digest (400).
            TombstonedWrite: the namespace was cleaned while the body arrived.
            KuraError: staging or storage refused the write.
        """
        admitted = await admission_of(request)
        spec = admitted.spec
        if admitted.existing is not None:
            self.count_write(spec.producer, "ok")
            return False
        assert admitted.address is not None and request.staging is not None
        policy = WritePolicy.LAST_WRITER_WINS if spec.overwrites else WritePolicy.WRITE_ONCE
        # A content-addressed key names the body's SHA-256: the store refuses
        # (DigestMismatch, 400) a body that does not match it.
        expected = admitted.address.key.rsplit("/", 1)[-1] if spec.verify_digest else None
        try:
            staged = await request.staging.finish()
            result = await shielded(
                Deferred.fromCoroutine(
                    self._store.publish_blob(
                        admitted.address,
                        staged,
                        content_type=OCTET_STREAM,
                        policy=policy,
                        expected_digest=expected,
                    )
                )
            )
        except KuraError:
            self.count_write(spec.producer, "error")
            raise
        if result.outcome is Outcome.IGNORED_TOMBSTONE:
            self.count_write(spec.producer, "error")
            raise TombstonedWrite("namespace was cleaned after this write began; retry")
        self.count_write(spec.producer, "ok", staged.size)
        return result.outcome is Outcome.APPLIED

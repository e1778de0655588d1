"""REAPI v2 over gRPC: the handlers, the admission of every RPC, and the listener.

``grpcio`` serves ``KURA_GRPC_PORT`` with its own thread pool
(``KURA_GRPC_THREADS``). A handler runs on one of those threads and may
block; whatever touches the store, the authorizer or a metric runs on the
reactor thread through :class:`~kura.reapi.bridge.ReactorBridge` (one hop per
step, bounded by the RPC's deadline). Blob bytes are read from the published
file and hashed, compressed or decompressed on the handler thread, so the
reactor only ever opens files and commits metadata.

Every RPC is admitted once, before it acts (:meth:`ReapiServer.admit`):

1. draining: ``UNAVAILABLE``;
2. a write (``UpdateActionResult``, ``BatchUpdateBlobs``, ``Write``) while
   memory is critical or replication is behind (``KURA_OUTBOX_MAX_DEPTH``):
   ``UNAVAILABLE`` with ``RetryInfo`` (1 s);
3. the node's authorizer (extension hooks or built-in tokens), with a
   context whose transport is ``grpc``, route the full RPC method, method
   ``POST``, operation ``artifact.read``/``artifact.write``, namespace the
   instance's (:mod:`kura.reapi.names`), producer ``reapi``, and
   ``artifact_key``/``artifact_hash`` the digest's hash for single-blob RPCs
   (unset for batches: they are authorized per namespace). Credentials are
   the call's metadata (``authorization: Bearer ...``).

Errors map to gRPC codes in :func:`status_of`. More RPCs than
``KURA_GRPC_MAX_CONCURRENT_RPCS`` are refused by grpcio at once with
``RESOURCE_EXHAUSTED``; a step the reactor does not answer before the
deadline is ``UNAVAILABLE``: no RPC hangs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import IO, Any, NoReturn, TypeVar, cast

import attrs
import grpc
import zstandard
from google.protobuf import any_pb2
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from kura.api.authorization import RequestAuthorization
from kura.api.protocols.neighbour import NEIGHBOUR_BODY_LIMIT
from kura.api.routes import TENANTLESS
from kura.auth import HookContext
from kura.config.node import GrpcConfig, TlsFiles
from kura.domain.errors import KuraError, ServiceUnavailable
from kura.lifecycle import NodeState
from kura.memory import Pressure
from kura.objectstore.readthrough import ReadThroughFetch
from kura.storage.interfaces import IArtifactStore
from kura.telemetry.metrics import KuraMetrics
from kura.tls import Reloading, public_server_options

from .bridge import BridgeTimeout, ReactorBridge
from .cache import BlobUpload, DigestMismatch, Opened, ReapiCache
from .names import Digest, InvalidName, namespace_of, parse_resource
from .proto import bs_pb2, error_details_pb2, re_pb2, semver_pb2, status_pb2

log = Logger(namespace="kura.reapi")

RPC_FAILED = "gRPC {method} failed unexpectedly"
GRPC_LISTENING = "REAPI v2 gRPC ({scheme}) on port {port}"

T = TypeVar("T")

RE = "build.bazel.remote.execution.v2"
CAPABILITIES = f"/{RE}.Capabilities/GetCapabilities"
GET_ACTION_RESULT = f"/{RE}.ActionCache/GetActionResult"
UPDATE_ACTION_RESULT = f"/{RE}.ActionCache/UpdateActionResult"
FIND_MISSING = f"/{RE}.ContentAddressableStorage/FindMissingBlobs"
BATCH_UPDATE = f"/{RE}.ContentAddressableStorage/BatchUpdateBlobs"
BATCH_READ = f"/{RE}.ContentAddressableStorage/BatchReadBlobs"
GET_TREE = f"/{RE}.ContentAddressableStorage/GetTree"
BS = "google.bytestream.ByteStream"
READ = f"/{BS}/Read"
WRITE = f"/{BS}/Write"
QUERY_WRITE_STATUS = f"/{BS}/QueryWriteStatus"

READ_OP = "artifact.read"
WRITE_OP = "artifact.write"

#: ByteStream.Read message size (gRPC clients accept 4 MiB by default).
READ_CHUNK = 1 << 20
#: Write bytes gathered on the handler thread before one reactor hop.
WRITE_HOP_BYTES = 1 << 20
#: The largest blob (as the Bazel HTTP route's body limit).
MAX_BLOB_BYTES = NEIGHBOUR_BODY_LIMIT
#: Unfinished resumable uploads kept, and for how long without a write.
MAX_SESSIONS = 1024
SESSION_IDLE_SECONDS = 600.0
#: Directories per GetTree response.
TREE_PAGE = 1000
#: Compression level of compressed-blobs reads (fast: most blobs are build outputs).
ZSTD_LEVEL = 1
#: Decompressed output is produced (and bounded) in pieces of this size.
ZSTD_PIECE = 256 * 1024
RETRY_SECONDS = 1


class RpcAbort(Exception):
    """End the RPC with ``code`` and ``message`` (and RetryInfo when retryable)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    416: grpc.StatusCode.OUT_OF_RANGE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(error: BaseException) -> RpcAbort:
    """The gRPC answer to ``error``.

    ====================================  ==================================
    error                                 code
    ====================================  ==================================
    a bad name, digest or request         ``INVALID_ARGUMENT``
    data that does not match its digest   ``INVALID_ARGUMENT``
    401 / 403 (authorizer)                ``UNAUTHENTICATED`` / ``PERMISSION_DENIED``
    503 (draining, shedding, budgets)     ``UNAVAILABLE`` + RetryInfo
    429, 507 (caps, disk full)            ``RESOURCE_EXHAUSTED`` + RetryInfo
    the reactor did not answer in time    ``UNAVAILABLE`` + RetryInfo
    anything else                         ``INTERNAL``
    ====================================  ==================================
    """
    if isinstance(error, RpcAbort):
        return error
    if isinstance(error, InvalidName):
        return RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, BridgeTimeout):
        return RpcAbort(grpc.StatusCode.UNAVAILABLE, str(error), retry_after=RETRY_SECONDS)
    if isinstance(error, KuraError):
        code = _HTTP_TO_GRPC.get(error.status, grpc.StatusCode.INTERNAL)
        retry = error.retry_after
        if retry is None and code is grpc.StatusCode.UNAVAILABLE:
            retry = RETRY_SECONDS
        return RpcAbort(code, error.message, retry_after=retry)
    return RpcAbort(grpc.StatusCode.INTERNAL, "internal error")


def _abort(context: grpc.ServicerContext, abort: RpcAbort) -> NoReturn:
    if abort.retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.seconds = abort.retry_after
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=abort.code.value[0], message=abort.message)
        status.details.append(detail)
        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(abort.code, abort.message)


def _credentials(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    """The call's text metadata (binary ``-bin`` entries left out)."""
    return [
        (str(key), value)
        for key, value in context.invocation_metadata()
        if isinstance(value, str) and not str(key).endswith("-bin")
    ]


def _digest(message: Any) -> Digest:
    return Digest.of(message.hash, message.size_bytes)


def _read_all(opened: Opened, offset: int = 0, limit: int | None = None) -> bytes:
    """The bytes of an opened blob (closing its descriptor)."""
    if isinstance(opened, bytes):
        return opened[offset : None if limit is None else offset + limit]
    try:
        size = os.fstat(opened).st_size if limit is None else limit
        parts = []
        position = offset
        end = offset + size
        while position < end:
            chunk = os.pread(opened, min(end - position, 8 << 20), position)
            if not chunk:
                break
            parts.append(chunk)
            position += len(chunk)
        return b"".join(parts)
    finally:
        os.close(opened)


def _close(opened: Opened | None) -> None:
    if isinstance(opened, int):
        os.close(opened)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Bounded:
    """Where a zstd stream decompresses to: refuses to grow past ``size`` bytes.

    The decompressor writes its output here in pieces of at most
    :data:`ZSTD_PIECE` bytes, so a small frame that claims (or expands to)
    gigabytes is refused after one piece, not after allocating it all.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._received = 0
        self._pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._received += len(data)
        if self._received > self._size:
            raise DigestMismatch(f"zstd data decompresses to more than {self._size} bytes")
        self._pieces.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._pieces)
        self._pieces.clear()
        return data

    @property
    def received(self) -> int:
        return self._received


class _ZstdStream:
    """Incremental, bounded zstd decompression of one upload (handler thread)."""

    def __init__(self, size: int) -> None:
        self._sink = _Bounded(size)
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], self._sink), write_size=ZSTD_PIECE, write_return_read=True
        )

    def feed(self, data: bytes) -> bytes:
        """The bytes ``data`` decompresses to (so far)."""
        try:
            self._writer.write(data)
        except zstandard.ZstdError as error:
            raise InvalidName(f"invalid zstd data: {error}") from error
        return self._sink.take()


def _decompress(data: bytes, size: int) -> bytes:
    stream = _ZstdStream(size)
    out = stream.feed(data)
    if len(out) != size:
        raise DigestMismatch(f"zstd data decompresses to {len(out)} bytes, not {size}")
    return out


@attrs.define
class _Session:
    """A resumable upload in progress (handler threads, under the sessions' lock)."""

    namespace: str
    upload: BlobUpload
    committed: int = 0
    touched: float = attrs.field(factory=time.monotonic)
    busy: bool = False


@attrs.define
class _RpcScope:
    method: str
    started: float


class ReapiServer:
    """The REAPI services on one node (see the module docstring).

    Args:
        store: the node's artifact store.
        state: draining and memory pressure.
        authorization: the node's authorizer, as the HTTP paths use it.
        metrics: the node's metrics.
        reactor: the reactor (handler threads call into it).
        config: the gRPC section of the configuration.
        node_tenant: ``server_tenant_id`` of every hook context.
        outbox_max_depth: writes are shed at this replication backlog.
        read_through: asks the object store for what is missing here.
    """

    def __init__(
        self,
        *,
        store: IArtifactStore,
        state: NodeState,
        authorization: RequestAuthorization,
        metrics: KuraMetrics,
        reactor: IReactorFromThreads,
        config: GrpcConfig,
        node_tenant: str,
        outbox_max_depth: int,
        read_through: ReadThroughFetch | None = None,
    ) -> None:
        self._store = store
        self._state = state
        self._authorization = authorization
        self._metrics = metrics
        self._bridge = ReactorBridge(reactor)
        self._config = config
        self._tenant = node_tenant
        self._outbox_max_depth = outbox_max_depth
        reads = metrics.artifact_reads
        writes = metrics.artifact_writes
        self.cache = ReapiCache(
            store,
            on_blob_read=lambda result, size: reads.labels("reapi", result).inc(),
            on_blob_write=lambda result, size: writes.labels("reapi", result).inc(),
            read_through=read_through,
        )
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        metrics.grpc_inflight_requests.set_function(lambda: float(self._inflight))

    # -- the plumbing of every RPC ------------------------------------------------------

    def _call(self, context: grpc.ServicerContext, f: Callable[[], Any]) -> Any:
        """One reactor hop, bounded by the RPC's deadline."""
        return self._bridge.call(f, timeout=context.time_remaining())

    def _finish(self, scope: _RpcScope, code: grpc.StatusCode) -> None:
        elapsed = time.monotonic() - scope.started
        name = code.name

        def record() -> None:
            self._metrics.grpc_requests.labels(scope.method, name).inc()
            self._metrics.grpc_request_duration.labels(scope.method).observe(elapsed)

        self._bridge.post(record)

    def _count_bytes(self, direction: str, size: int) -> None:
        if size:
            self._bridge.post(lambda: self._metrics.grpc_blob_bytes.labels(direction).inc(size))

    @property
    def inflight(self) -> int:
        """gRPC calls in progress."""
        return self._inflight

    def _enter(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta

    def _failed(self, method: str, error: Exception, context: grpc.ServicerContext) -> RpcAbort:
        """The answer to ``error``; a client gone away is ``CANCELLED``, not a fault."""
        if isinstance(error, grpc.RpcError) or not context.is_active():
            return RpcAbort(grpc.StatusCode.CANCELLED, "the client cancelled the call")
        abort = status_of(error)
        if abort.code is grpc.StatusCode.INTERNAL and not isinstance(error, RpcAbort):
            log.failure(RPC_FAILED, method=method)
        return abort

    def unary(
        self, method: str, handler: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        """Wrap a unary-response handler: metrics, in-flight count, error mapping."""

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            scope = _RpcScope(method, time.monotonic())
            self._enter(1)
            code = grpc.StatusCode.OK
            try:
                return handler(request, context)
            except Exception as error:
                abort = self._failed(method, error, context)
                code = abort.code
                if code is grpc.StatusCode.CANCELLED:
                    return None
                _abort(context, abort)
            finally:
                self._enter(-1)
                self._finish(scope, code)

        return run

    def streaming(
        self, method: str, handler: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        """Wrap a streaming-response handler like :meth:`unary`."""

        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            scope = _RpcScope(method, time.monotonic())
            self._enter(1)
            code = grpc.StatusCode.OK
            try:
                yield from handler(request, context)
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                abort = self._failed(method, error, context)
                code = abort.code
                if code is not grpc.StatusCode.CANCELLED:
                    _abort(context, abort)
            finally:
                self._enter(-1)
                self._finish(scope, code)

        return run

    def admit(
        self,
        context: grpc.ServicerContext,
        *,
        method: str,
        operation: str,
        namespace: str,
        key: str | None = None,
    ) -> None:
        """Admit one RPC, once, before it acts (see the module docstring)."""
        write = operation == WRITE_OP
        state = self._state
        if state.draining:
            raise ServiceUnavailable("server is draining")
        if write and state.memory_pressure is Pressure.CRITICAL:
            raise ServiceUnavailable("server is shedding writes due to memory pressure")
        if write and self._store.outbox_depth >= self._outbox_max_depth:
            raise ServiceUnavailable("server is shedding writes while replication catches up")
        authorizer = self._authorization.authorizer
        if not authorizer.checks(operation):
            return
        ctx = HookContext(
            transport="grpc",
            route=method,
            method="POST",
            operation=operation,
            server_tenant_id=self._tenant,
            tenant_id=TENANTLESS,
            namespace_id=namespace,
            producer="reapi",
            artifact_key=key,
            artifact_hash=key,
            headers=_credentials(context),
        )
        self._call(context, lambda: self._authorization.check(ctx))

    def _writes_allowed(self, context: grpc.ServicerContext, namespace: str) -> bool:
        """Whether this caller may write (GetCapabilities' ``update_enabled``).

        Built-in authorizers decide synchronously, without running any hook;
        with an extension writes are reported enabled and each write is
        still authorized on its own.
        """
        decide = getattr(self._authorization.authorizer, "decide", None)
        if decide is None or not self._authorization.authorizer.checks(WRITE_OP):
            return True
        ctx = HookContext(
            transport="grpc",
            route=UPDATE_ACTION_RESULT,
            method="POST",
            operation=WRITE_OP,
            server_tenant_id=self._tenant,
            tenant_id=TENANTLESS,
            namespace_id=namespace,
            producer="reapi",
            headers=_credentials(context),
        )
        try:
            decide(ctx)
        except KuraError:
            return False
        return True

    # -- Capabilities ---------------------------------------------------------------------

    def get_capabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        namespace = namespace_of(request.instance_name)
        self.admit(context, method=CAPABILITIES, operation=READ_OP, namespace=namespace)
        compressors = [re_pb2.Compressor.ZSTD]
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=[re_pb2.DigestFunction.SHA256],
                action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                    update_enabled=self._writes_allowed(context, namespace)
                ),
                max_batch_total_size_bytes=self._config.max_batch_bytes,
                symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
                supported_compressors=compressors,
                supported_batch_update_compressors=compressors,
                max_cas_blob_size_bytes=MAX_BLOB_BYTES,
            ),
            deprecated_api_version=semver_pb2.SemVer(major=2),
            low_api_version=semver_pb2.SemVer(major=2),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )

    # -- ActionCache ----------------------------------------------------------------------

    def get_action_result(self, request: Any, context: grpc.ServicerContext) -> Any:
        namespace = namespace_of(request.instance_name)
        action = _digest(request.action_digest)
        self.admit(
            context,
            method=GET_ACTION_RESULT,
            operation=READ_OP,
            namespace=namespace,
            key=action.hash,
        )
        opened = self._call(
            context,
            lambda: self.cache.open_action_result(namespace, action),
        )
        if opened is None:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"no action result for {action}")
        result = re_pb2.ActionResult.FromString(_read_all(opened))
        referenced = self._referenced(context, namespace, result)
        missing: list[Digest] = referenced and self._call(
            context, lambda: self.cache.missing_after_read_through(namespace, referenced)
        )
        if missing:
            # Served as a miss: a hit whose outputs are gone would fail the build.
            raise RpcAbort(
                grpc.StatusCode.NOT_FOUND,
                f"action result for {action} references {len(missing)} missing blobs",
            )
        return result

    def _referenced(
        self, context: grpc.ServicerContext, namespace: str, result: Any
    ) -> list[Digest]:
        """Every blob ``result`` needs: outputs, std streams, trees and the files in them."""
        digests = [_digest(f.digest) for f in result.output_files]
        digests += [
            _digest(d)
            for d in (result.stdout_digest, result.stderr_digest)
            if d.hash or d.size_bytes
        ]
        for directory in result.output_directories:
            tree_digest = _digest(directory.tree_digest)
            digests.append(tree_digest)
            opened = self._call(
                context, functools.partial(self.cache.open_blob, namespace, tree_digest)
            )
            if opened is None:
                continue  # reported missing with the tree digest itself
            tree = re_pb2.Tree.FromString(_read_all(opened))
            for node in [tree.root, *tree.children]:
                digests += [_digest(f.digest) for f in node.files]
        return digests

    def _missing(
        self, context: grpc.ServicerContext, namespace: str, digests: list[Digest]
    ) -> list[Digest]:
        if not digests:
            return []
        missing: list[Digest] = self._call(context, lambda: self.cache.missing(namespace, digests))
        return missing

    def update_action_result(self, request: Any, context: grpc.ServicerContext) -> Any:
        namespace = namespace_of(request.instance_name)
        action = _digest(request.action_digest)
        self.admit(
            context,
            method=UPDATE_ACTION_RESULT,
            operation=WRITE_OP,
            namespace=namespace,
            key=action.hash,
        )
        data = request.action_result.SerializeToString()
        if len(data) > self._config.max_batch_bytes:
            raise InvalidName(f"action result of {len(data)} bytes is too large")
        self._call(context, lambda: self.cache.put_action_result(namespace, action, data))
        return request.action_result

    # -- ContentAddressableStorage --------------------------------------------------------

    def find_missing_blobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        namespace = namespace_of(request.instance_name)
        digests = [_digest(d) for d in request.blob_digests]
        self.admit(context, method=FIND_MISSING, operation=READ_OP, namespace=namespace)
        missing = self._missing(context, namespace, digests)
        return re_pb2.FindMissingBlobsResponse(
            missing_blob_digests=[
                re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in dict.fromkeys(missing)
            ]
        )

    def _check_batch(self, total: int) -> None:
        if total > self._config.max_batch_bytes:
            raise InvalidName(
                f"batch of {total} bytes exceeds max_batch_total_size_bytes "
                f"({self._config.max_batch_bytes}); use ByteStream"
            )

    def batch_update_blobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        namespace = namespace_of(request.instance_name)
        self._check_batch(sum(len(r.data) for r in request.requests))
        self.admit(context, method=BATCH_UPDATE, operation=WRITE_OP, namespace=namespace)
        responses = []
        verified: list[tuple[int, Digest, bytes]] = []
        for index, item in enumerate(request.requests):
            response = re_pb2.BatchUpdateBlobsResponse.Response(digest=item.digest)
            responses.append(response)
            try:
                digest = _digest(item.digest)
                data = item.data
                if item.compressor == re_pb2.Compressor.ZSTD:
                    data = _decompress(data, digest.size)
                elif item.compressor != re_pb2.Compressor.IDENTITY:
                    raise InvalidName(f"unsupported compressor {item.compressor}")
                if len(data) != digest.size or _sha256(data) != digest.hash:
                    raise DigestMismatch(f"data does not match digest {digest}")
            except InvalidName as error:
                response.status.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                response.status.message = str(error)
                continue
            verified.append((index, digest, data))
        outcomes: list[BaseException | None] = self._call(
            context, lambda: self._put_all(namespace, verified)
        )
        stored = 0
        for (index, digest, _), outcome in zip(verified, outcomes, strict=True):
            if outcome is None:
                stored += digest.size
                continue
            abort = status_of(outcome)
            responses[index].status.code = abort.code.value[0]
            responses[index].status.message = abort.message
        self._count_bytes("write", stored)
        return re_pb2.BatchUpdateBlobsResponse(responses=responses)

    async def _put_all(
        self, namespace: str, blobs: list[tuple[int, Digest, bytes]]
    ) -> list[BaseException | None]:
        """Publish every blob concurrently (their commits share transactions)."""

        async def one(digest: Digest, data: bytes) -> BaseException | None:
            try:
                await self.cache.put_blob(namespace, digest, data)
            except Exception as error:
                return error
            return None

        results = [Deferred.fromCoroutine(one(digest, data)) for _, digest, data in blobs]
        return [await d for d in results]

    def batch_read_blobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        namespace = namespace_of(request.instance_name)
        digests = [_digest(d) for d in request.digests]
        self._check_batch(sum(d.size for d in digests))
        self.admit(context, method=BATCH_READ, operation=READ_OP, namespace=namespace)
        opened: list[Opened | None] = self._call(
            context, lambda: self._open_all(namespace, digests)
        )
        responses = []
        served = 0
        for digest, handle in zip(digests, opened, strict=True):
            response = re_pb2.BatchReadBlobsResponse.Response(
                digest=re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)
            )
            if handle is None:
                response.status.code = grpc.StatusCode.NOT_FOUND.value[0]
                response.status.message = f"blob {digest} not found"
            else:
                response.data = _read_all(handle)
                served += len(response.data)
            responses.append(response)
        self._count_bytes("read", served)
        return re_pb2.BatchReadBlobsResponse(responses=responses)

    async def _open_all(self, namespace: str, digests: list[Digest]) -> list[Opened | None]:
        return [await self.cache.open_blob(namespace, digest) for digest in digests]

    def get_tree(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        namespace = namespace_of(request.instance_name)
        root = _digest(request.root_digest)
        self.admit(context, method=GET_TREE, operation=READ_OP, namespace=namespace, key=root.hash)
        page_size = request.page_size if request.page_size > 0 else TREE_PAGE
        pending = [root]
        seen = {root}
        page: list[Any] = []
        while pending:
            digest = pending.pop(0)
            opened = self._call(context, functools.partial(self.cache.open_blob, namespace, digest))
            if opened is None:
                if digest == root:
                    raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"root directory {root} not found")
                continue  # a missing part of the tree is left out (as the REAPI allows)
            directory = re_pb2.Directory.FromString(_read_all(opened))
            page.append(directory)
            for child in directory.directories:
                child_digest = _digest(child.digest)
                if child_digest not in seen:
                    seen.add(child_digest)
                    pending.append(child_digest)
            if len(page) >= page_size:
                yield re_pb2.GetTreeResponse(directories=page)
                page = []
        if page:
            yield re_pb2.GetTreeResponse(directories=page)

    # -- ByteStream -----------------------------------------------------------------------

    def read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        resource = parse_resource(request.resource_name, write=False)
        namespace = namespace_of(resource.instance)
        digest = resource.digest
        self.admit(context, method=READ, operation=READ_OP, namespace=namespace, key=digest.hash)
        offset, limit = request.read_offset, request.read_limit
        if offset < 0 or offset > digest.size:
            raise RpcAbort(
                grpc.StatusCode.OUT_OF_RANGE, f"read_offset {offset} outside 0..{digest.size}"
            )
        if limit < 0:
            raise InvalidName(f"negative read_limit {limit}")
        if resource.compressor is not None and limit != 0:
            raise InvalidName("read_limit must be 0 for compressed-blobs reads")
        opened = self._call(
            context,
            lambda: self.cache.open_blob(namespace, digest),
        )
        if opened is None:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"blob {digest} not found")
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        chunks = self._chunks(opened, offset, end)
        sent = 0
        if resource.compressor is None:
            for chunk in chunks:
                sent += len(chunk)
                yield bs_pb2.ReadResponse(data=chunk)
        else:
            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj(size=end - offset)
            for chunk in chunks:
                sent += len(chunk)
                compressed = compressor.compress(chunk)
                if compressed:
                    yield bs_pb2.ReadResponse(data=compressed)
            yield bs_pb2.ReadResponse(data=compressor.flush())
        self._count_bytes("read", sent)

    def _chunks(self, opened: Opened, offset: int, end: int) -> Iterator[bytes]:
        if isinstance(opened, bytes):
            for position in range(offset, end, READ_CHUNK):
                yield opened[position : min(end, position + READ_CHUNK)]
            return
        try:
            position = offset
            while position < end:
                chunk = os.pread(opened, min(READ_CHUNK, end - position), position)
                if not chunk:
                    raise RpcAbort(grpc.StatusCode.DATA_LOSS, "blob shorter than its digest")
                position += len(chunk)
                yield chunk
        finally:
            os.close(opened)

    def _session_key(self, namespace: str, upload: str | None, digest: Digest) -> str:
        return f"{namespace}/{upload}/{digest}"

    def _expire_sessions(self) -> list[_Session]:
        """Take sessions idle too long (and the oldest past the cap) out of the table."""
        now = time.monotonic()
        with self._sessions_lock:
            stale = [
                key
                for key, session in self._sessions.items()
                if not session.busy and now - session.touched > SESSION_IDLE_SECONDS
            ]
            idle = sorted((s.touched, key) for key, s in self._sessions.items() if not s.busy)
            excess = len(self._sessions) - MAX_SESSIONS + 1
            stale += [key for _, key in idle[: max(0, excess)] if key not in stale]
            return [self._sessions.pop(key) for key in stale]

    def _abort_uploads(self, context: grpc.ServicerContext, sessions: list[_Session]) -> None:
        for session in sessions:
            self._call(context, session.upload.abort)

    def write(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first = next(requests, None)
        if first is None:
            raise InvalidName("Write without a request")
        resource = parse_resource(first.resource_name, write=True)
        namespace = namespace_of(resource.instance)
        digest = resource.digest
        self.admit(context, method=WRITE, operation=WRITE_OP, namespace=namespace, key=digest.hash)
        if digest.size > MAX_BLOB_BYTES:
            raise InvalidName(f"blob of {digest.size} bytes exceeds {MAX_BLOB_BYTES}")
        compressed = resource.compressor is not None
        done = bs_pb2.WriteResponse(committed_size=-1 if compressed else digest.size)
        if not self._missing(context, namespace, [digest]):
            return done  # already stored (or the empty blob): finish early
        self._abort_uploads(context, self._expire_sessions())
        if compressed:
            return self._write_compressed(first, requests, context, namespace, digest)
        return self._write_plain(first, requests, context, namespace, resource.upload, digest)

    def _write_compressed(
        self,
        first: Any,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        namespace: str,
        digest: Digest,
    ) -> Any:
        """A ``compressed-blobs/zstd`` upload: not resumable (it always starts at 0)."""
        if first.write_offset != 0:
            raise InvalidName("compressed uploads are not resumable: write_offset must be 0")
        decompressor = _ZstdStream(digest.size)
        upload: BlobUpload = self._call(context, lambda: self._start_upload(digest))
        received = 0
        finished = False
        try:
            for request in self._stream(first, requests):
                if request.write_offset != received:
                    raise InvalidName(f"write_offset {request.write_offset}, expected {received}")
                received += len(request.data)
                self._send(context, upload, decompressor.feed(request.data))
                if request.finish_write:
                    finished = True
                    break
            if not finished:
                raise InvalidName("the stream ended without finish_write")
            self._call(context, lambda: self.cache.finish_upload(namespace, upload))
        except BaseException:
            self._call_quietly(context, upload.abort)
            raise
        self._count_bytes("write", digest.size)
        return bs_pb2.WriteResponse(committed_size=received)

    def _call_quietly(self, context: grpc.ServicerContext, f: Callable[[], Any]) -> None:
        try:
            self._bridge.call(f, timeout=max(5.0, context.time_remaining() or 5.0))
        except Exception:
            log.failure("aborting an upload failed")

    async def _start_upload(self, digest: Digest) -> BlobUpload:
        return self.cache.start_upload(digest)

    def _send(self, context: grpc.ServicerContext, upload: BlobUpload, data: bytes) -> None:
        for position in range(0, len(data), WRITE_HOP_BYTES):
            piece = data[position : position + WRITE_HOP_BYTES]
            self._call(context, functools.partial(upload.write, piece))

    @staticmethod
    def _stream(first: Any, requests: Iterator[Any]) -> Iterable[Any]:
        yield first
        yield from requests

    def _write_plain(
        self,
        first: Any,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        namespace: str,
        upload_id: str | None,
        digest: Digest,
    ) -> Any:
        """A ``blobs/`` upload: resumable at the committed size (``QueryWriteStatus``)."""
        key = self._session_key(namespace, upload_id, digest)
        stale: list[_Session] = []
        with self._sessions_lock:
            session = self._sessions.get(key)
            if session is not None and session.busy:
                raise RpcAbort(grpc.StatusCode.ABORTED, "this upload is being written already")
            if first.write_offset == 0 and session is not None:
                stale.append(self._sessions.pop(key))
                session = None
            if first.write_offset != 0 and (
                session is None or session.committed != first.write_offset
            ):
                committed = 0 if session is None else session.committed
                raise InvalidName(
                    f"write_offset {first.write_offset} is not the committed size {committed}"
                )
            if session is not None:
                session.busy = True
        self._abort_uploads(context, stale)
        if session is None:
            upload: BlobUpload = self._call(context, lambda: self._start_upload(digest))
            session = _Session(namespace, upload, busy=True)
            with self._sessions_lock:
                self._sessions[key] = session
        pending: list[bytes] = []
        pending_bytes = 0
        finished = False
        try:
            offset = session.committed
            for request in self._stream(first, requests):
                if request.write_offset != offset:
                    raise InvalidName(f"write_offset {request.write_offset}, expected {offset}")
                pending.append(request.data)
                pending_bytes += len(request.data)
                offset += len(request.data)
                if pending_bytes >= WRITE_HOP_BYTES or request.finish_write:
                    self._send(context, session.upload, b"".join(pending))
                    session.committed += pending_bytes
                    pending, pending_bytes = [], 0
                if request.finish_write:
                    finished = True
                    break
            if pending:
                self._send(context, session.upload, b"".join(pending))
                session.committed += pending_bytes
            if not finished:
                raise InvalidName("the stream ended without finish_write")
        except (DigestMismatch, RpcAbort):
            self._drop(context, key, session)
            raise
        except Exception:
            # The client went away or broke the stream: keep what was
            # committed for a resumed Write (QueryWriteStatus reports it).
            with self._sessions_lock:
                session.busy = False
                session.touched = time.monotonic()
            raise
        try:
            self._call(context, lambda: self.cache.finish_upload(namespace, session.upload))
        finally:
            with self._sessions_lock:
                if self._sessions.get(key) is session:
                    del self._sessions[key]
        self._count_bytes("write", digest.size)
        return bs_pb2.WriteResponse(committed_size=session.committed)

    def _drop(self, context: grpc.ServicerContext, key: str, session: _Session) -> None:
        with self._sessions_lock:
            if self._sessions.get(key) is session:
                del self._sessions[key]
        self._call_quietly(context, session.upload.abort)

    def query_write_status(self, request: Any, context: grpc.ServicerContext) -> Any:
        resource = parse_resource(request.resource_name, write=True)
        namespace = namespace_of(resource.instance)
        digest = resource.digest
        self.admit(
            context,
            method=QUERY_WRITE_STATUS,
            operation=WRITE_OP,
            namespace=namespace,
            key=digest.hash,
        )
        if not self._missing(context, namespace, [digest]):
            return bs_pb2.QueryWriteStatusResponse(committed_size=digest.size, complete=True)
        if resource.compressor is None:
            key = self._session_key(namespace, resource.upload, digest)
            with self._sessions_lock:
                session = self._sessions.get(key)
                committed = None if session is None else session.committed
            if committed is not None:
                return bs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)
        raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"no upload of {digest} in progress")

    # -- the service table --------------------------------------------------------------

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The generic handlers of every served service."""
        unary, streaming = self.unary, self.streaming

        def uu(
            method: str, f: Callable[[Any, grpc.ServicerContext], Any], req: Any, res: Any
        ) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                unary(method, f),
                request_deserializer=req.FromString,
                response_serializer=res.SerializeToString,
            )

        services: dict[str, dict[str, Any]] = {
            f"{RE}.Capabilities": {
                "GetCapabilities": uu(
                    CAPABILITIES,
                    self.get_capabilities,
                    re_pb2.GetCapabilitiesRequest,
                    re_pb2.ServerCapabilities,
                ),
            },
            f"{RE}.ActionCache": {
                "GetActionResult": uu(
                    GET_ACTION_RESULT,
                    self.get_action_result,
                    re_pb2.GetActionResultRequest,
                    re_pb2.ActionResult,
                ),
                "UpdateActionResult": uu(
                    UPDATE_ACTION_RESULT,
                    self.update_action_result,
                    re_pb2.UpdateActionResultRequest,
                    re_pb2.ActionResult,
                ),
            },
            f"{RE}.ContentAddressableStorage": {
                "FindMissingBlobs": uu(
                    FIND_MISSING,
                    self.find_missing_blobs,
                    re_pb2.FindMissingBlobsRequest,
                    re_pb2.FindMissingBlobsResponse,
                ),
                "BatchUpdateBlobs": uu(
                    BATCH_UPDATE,
                    self.batch_update_blobs,
                    re_pb2.BatchUpdateBlobsRequest,
                    re_pb2.BatchUpdateBlobsResponse,
                ),
                "BatchReadBlobs": uu(
                    BATCH_READ,
                    self.batch_read_blobs,
                    re_pb2.BatchReadBlobsRequest,
                    re_pb2.BatchReadBlobsResponse,
                ),
                "GetTree": grpc.unary_stream_rpc_method_handler(
                    streaming(GET_TREE, self.get_tree),
                    request_deserializer=re_pb2.GetTreeRequest.FromString,
                    response_serializer=re_pb2.GetTreeResponse.SerializeToString,
                ),
            },
            BS: {
                "Read": grpc.unary_stream_rpc_method_handler(
                    streaming(READ, self.read),
                    request_deserializer=bs_pb2.ReadRequest.FromString,
                    response_serializer=bs_pb2.ReadResponse.SerializeToString,
                ),
                "Write": grpc.stream_unary_rpc_method_handler(
                    unary(WRITE, self.write),
                    request_deserializer=bs_pb2.WriteRequest.FromString,
                    response_serializer=bs_pb2.WriteResponse.SerializeToString,
                ),
                "QueryWriteStatus": uu(
                    QUERY_WRITE_STATUS,
                    self.query_write_status,
                    bs_pb2.QueryWriteStatusRequest,
                    bs_pb2.QueryWriteStatusResponse,
                ),
            },
        }
        return [
            grpc.method_handlers_generic_handler(service, methods)
            for service, methods in services.items()
        ]


def _identity_pair(files: TlsFiles) -> tuple[bytes, bytes]:
    """``(key, chain)`` PEM bytes of the public identity, checked as HTTPS checks them."""
    public_server_options(files)  # raises on a bad or mismatched pair
    with open(files.key_path, "rb") as key, open(files.cert_path, "rb") as cert:
        return key.read(), cert.read()


class ReloadingGrpcCredentials:
    """grpcs credentials that follow the public TLS files (``KURA_TLS_RELOAD_INTERVAL_MS``).

    grpcio asks :meth:`fetch` before each new handshake (from its own
    threads); it answers a new configuration only when the files changed
    since the last one, as the HTTPS listener's :class:`~kura.tls.Reloading`
    does, and ``None`` (keep the current one) otherwise.
    """

    def __init__(self, files: TlsFiles, clock: IReactorTime, interval: float) -> None:
        self._lock = threading.Lock()
        self._reloading = Reloading(lambda: _identity_pair(files), files.paths, clock, interval)
        self._served = self._reloading.get()

    def fetch(self) -> Any:
        with self._lock:
            current = self._reloading.get()
            if current is self._served:
                return None
            self._served = current
        return grpc.ssl_server_certificate_configuration([current])

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([self._served]), self.fetch
        )


class GrpcListener:
    """``KURA_GRPC_PORT``: a ``grpc.server`` carrying :class:`ReapiServer`.

    Args:
        reapi: the services.
        config: threads, concurrency cap, message limits.
        tls: the public TLS identity: when set the port speaks grpcs only,
            reloading the files as the HTTPS listener does.
    """

    def __init__(
        self, reapi: ReapiServer, config: GrpcConfig, tls: ReloadingGrpcCredentials | None
    ) -> None:
        self._reapi = reapi
        self._config = config
        self._tls = tls
        self._server: grpc.Server | None = None
        self.port = 0

    def start(self, host: str) -> int:
        """Bind and serve; returns the bound port."""
        # Room for a full batch plus its framing; bigger messages are
        # refused by grpcio itself (RESOURCE_EXHAUSTED).
        max_message = self._config.max_batch_bytes + (1 << 20)
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._config.threads, thread_name_prefix="kura-grpc"
            ),
            handlers=self._reapi.handlers(),
            maximum_concurrent_rpcs=self._config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                ("grpc.so_reuseport", 0),
            ],
        )
        address = f"[{host}]:{self._config.port}" if ":" in host else f"{host}:{self._config.port}"
        if self._tls is not None:
            port = server.add_secure_port(address, self._tls.credentials())
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        server.start()
        self._server = server
        self.port = port
        log.info(GRPC_LISTENING, scheme="grpcs" if self._tls else "grpc", port=port)
        return port

    def stop(self, grace: float) -> threading.Event:
        """Stop accepting; RPCs in flight get ``grace`` seconds. The event is set when done."""
        if self._server is None:
            done = threading.Event()
            done.set()
            return done
        server, self._server = self._server, None
        return server.stop(grace)

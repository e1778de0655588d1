"""The public HTTP API: every cache route, the probes and ``/metrics``.

Routes are declared once, on :attr:`PublicAPI.app`; each carries a
:class:`~kura.api.routes.RouteSpec` (see :func:`route`). By the time a handler
runs, its request has been admitted from the head (:mod:`.gate`) and any
upload body has been streamed into staging (:mod:`.http`); handlers only do
the work and choose the status.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from typing import Any, cast

import attrs
from klein import KleinRenderable
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from kura.config import KuraConfig
from kura.config.access import token_digest
from kura.defer import shielded
from kura.domain.artifacts import JSON, OCTET_STREAM, ArtifactAddress, Manifest, Producer
from kura.domain.errors import (
    BadRequest,
    KuraError,
    NotFound,
    ServiceUnavailable,
    StorageFault,
    TmpBudgetExhausted,
    TombstonedWrite,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from kura.lifecycle import NodeState
from kura.storage.metadata import Outcome, Upload, WritePolicy
from kura.storage.runner import BlockingRunner
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics
from kura.web.admission import Admission
from kura.web.download import (
    CHUNK_BYTES,
    H2_CHUNK_BYTES,
    FileBodyProducer,
    TransferFailed,
    artifact_head,
)
from kura.web.errors import as_seen_by_client, classify_failure, respond_with_error
from kura.web.http import KuraRequest
from kura.web.routing import BodyKind, GiB, MiB, Operation, Query, RouteSpec

from .audit import audit_delete
from .authorization import RequestAuthorization
from .neighbours import NeighbourRoutes
from .registry import _SPECS, _app, route
from .routes import (
    fixed_namespace,
    keyvalue_address,
    keyvalue_get,
    module_artifact,
    module_key,
    tenant_scoped,
    xcode_cas,
)

log = Logger(namespace="kura.api")

#: Tuist CLIs from this version understand 204 from module start.
MODULE_START_204_VERSION = (4, 202, 0)
MAX_MULTIPART_BYTES = 2 * GiB
MAX_PART_NUMBER = 2**32 - 1


def header(request: KuraRequest, name: bytes) -> str | None:
    """A request header as text (latin-1, as HTTP header bytes are)."""
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def require_bearer(request: KuraRequest, digest: bytes | None) -> None:
    """Refuse a probe-like route unless it carries the configured bearer token.

    Raises:
        Unauthorized: a token is configured and the request lacks it.
    """
    if digest is None:
        return
    value = header(request, b"authorization") or ""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), digest):
        raise Unauthorized("This endpoint needs its bearer token", challenge='Bearer realm="kura"')


def _check_part_number(query: Query) -> None:
    text = query.single("part_number")
    if text is None or not text.isdigit() or int(text) > MAX_PART_NUMBER:
        raise BadRequest("Invalid part_number")


def _cli_version(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    core = value.strip().lstrip("v").split("-", 1)[0].split("+", 1)[0]
    try:
        return tuple(int(part) for part in core.split(".")[:3])
    except ValueError:
        return None


class PublicAPI(NeighbourRoutes):
    """The public Klein application of one node."""

    app = _app

    def __init__(
        self,
        *,
        config: KuraConfig,
        store: ArtifactStore,
        state: NodeState,
        metrics: KuraMetrics,
        runner: BlockingRunner,
        authorization: RequestAuthorization,
    ) -> None:
        self._config = config
        self._authorization = authorization
        self._store = store
        self._state = state
        self._metrics = metrics
        self._runner = runner
        self.specs: Mapping[str, RouteSpec] = {
            **_SPECS,
            "keyvalue_put": attrs.evolve(
                _SPECS["keyvalue_put"], body_limit=config.max_keyvalue_bytes
            ),
        }

    def resource(self) -> IResource:
        return self.app.resource()

    # -- shared steps ---------------------------------------------------------------

    async def _admission(self, request: KuraRequest) -> Admission:
        """The request's admission; raises whatever refused it."""
        assert request.admission is not None
        admission = await request.admission
        if request.rejection is not None:
            raise request.rejection
        return admission

    async def _extension_headers(self, request: KuraRequest) -> None:
        """Add the extension's ``response_headers`` before the head goes out."""
        admission = request.admitted
        if request.startedWriting or admission is None or admission.caller is None:
            return
        extra = await self._authorization.response_headers(
            admission.hook_context, admission.caller, request.code
        )
        for name, value in extra:
            request.setHeader(name, value)

    def _empty(self, request: KuraRequest, status: int) -> bytes:
        request.setResponseCode(status)
        if status != 204:
            request.setHeader(b"Content-Length", b"0")
        return b""

    def _json(self, request: KuraRequest, status: int, payload: object) -> bytes:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", JSON.encode())
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _count_write(self, producer: Producer | None, result: str, size: int = 0) -> None:
        if producer is not None:
            self._metrics.artifact_writes.labels(producer.value, result).inc()
            if size:
                self._metrics.artifact_write_bytes.labels(producer.value, result).inc(size)

    def _count_read(self, producer: Producer | None, result: str, size: int = 0) -> None:
        if producer is not None:
            self._metrics.artifact_reads.labels(producer.value, result).inc()
            if size:
                self._metrics.artifact_read_bytes.labels(producer.value, result).inc(size)

    # -- uploads --------------------------------------------------------------------

    async def _upload(
        self, request: KuraRequest, *, new_status: int, existing_status: int
    ) -> bytes:
        admission = await self._admission(request)
        spec = admission.spec
        if admission.existing is not None:
            self._count_write(spec.producer, "ok")
            return self._empty(request, existing_status)
        assert admission.address is not None and request.staging is not None
        try:
            staged = await request.staging.finish()
            if spec.verify_digest and staged.sha256 != admission.address.key.rsplit("/", 1)[-1]:
                await self._store.discard(staged)
                raise BadRequest("Body does not match its SHA-256 digest")
            result = await shielded(
                Deferred.fromCoroutine(
                    self._store.publish_blob(
                        admission.address,
                        staged,
                        content_type=OCTET_STREAM,
                        policy=WritePolicy.WRITE_ONCE,
                    )
                )
            )
        except KuraError:
            self._count_write(spec.producer, "error")
            raise
        if result.outcome is Outcome.IGNORED_TOMBSTONE:
            self._count_write(spec.producer, "error")
            raise TombstonedWrite("namespace was cleaned after this write began; retry")
        self._count_write(spec.producer, "ok", staged.size)
        applied = result.outcome is Outcome.APPLIED
        return self._empty(request, new_status if applied else existing_status)

    # -- downloads ------------------------------------------------------------------

    async def _download(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        spec = admission.spec
        assert admission.address is not None
        manifest = await self._find(spec, admission.address)
        if manifest.inline:
            return await self._download_inline(request, spec, manifest)
        try:
            opened = await shielded(Deferred.fromCoroutine(self._store.open_intact(manifest)))
        except OSError as error:
            self._count_read(spec.producer, "error")
            raise self._read_fault(spec, f"cannot open artifact: {error.strerror}") from error
        if opened is None:
            self._count_read(spec.producer, "not_found")
            raise NotFound(spec.not_found_message)
        fd = opened
        try:
            head = artifact_head(manifest, header(request, b"range"), header(request, b"if-range"))
        except KuraError as error:
            os.close(fd)
            if error.status == 416:
                self._count_read(spec.producer, "range_not_satisfiable")
            raise
        self._store.record_access(manifest.artifact_id)
        request.setResponseCode(head.status)
        for name, value in head.headers:
            request.setHeader(name, value)
        if request.method == b"HEAD":
            os.close(fd)
            self._count_read(spec.producer, "ok")
            return b""
        self._metrics.serving_paths.labels("fallback").inc()
        try:
            await self._extension_headers(request)
        except BaseException:
            os.close(fd)
            raise
        return await self._stream(request, spec, fd, head.body.offset, head.body.length)

    async def _stream(
        self, request: KuraRequest, spec: RouteSpec, fd: int, offset: int, length: int
    ) -> bytes:
        site = request.kura_site
        producer_label = spec.producer.value if spec.producer else "unknown"
        started = site.clock.seconds()
        body = FileBodyProducer(
            request=request,
            fd=fd,
            offset=offset,
            length=length,
            runner=self._runner,
            clock=site.clock,
            send_timeout=site.send_timeout,
            chunk_bytes=H2_CHUNK_BYTES if request.clientproto == b"HTTP/2" else CHUNK_BYTES,
        )

        def account(result: object) -> object:
            error = result.value if isinstance(result, Failure) else None
            label = (
                error.result
                if isinstance(error, TransferFailed)
                else "error"
                if isinstance(result, Failure)
                else "ok"
            )
            site.egress.record(producer_label, label, body.sent, site.clock.seconds() - started)
            return result

        transfer: Deferred[Any] = body.start()
        transfer.addBoth(account)
        try:
            await shielded(transfer)
        except TransferFailed as failure:
            channel: Any = request.channel
            if channel is not None:
                # A short or stalled body must not leave the connection reusable.
                channel.persistent = False
                if failure.result == "write_timeout":
                    # An HTTP/2 stream is its own transport (its .transport
                    # is None): it is reset, the connection's others go on.
                    (channel.transport or channel).abortConnection()
            if failure.result == "incomplete":
                log.error("artifact body ended early; connection closed", route=spec.template)
        return b""

    async def _download_inline(
        self, request: KuraRequest, spec: RouteSpec, manifest: Manifest
    ) -> bytes:
        try:
            value = await self._store.read_inline(manifest)
        except KuraError as error:
            self._count_read(spec.producer, "error")
            raise self._read_fault(spec, error.message) from error
        if value is None:
            self._count_read(spec.producer, "not_found")
            raise NotFound(spec.not_found_message)
        self._store.record_access(manifest.artifact_id)
        self._count_read(spec.producer, "ok", len(value))
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", manifest.content_type.encode("ascii", "replace"))
        request.setHeader(b"Content-Length", b"%d" % len(value))
        return value

    async def _find(self, spec: RouteSpec, address: ArtifactAddress) -> Manifest:
        try:
            manifest = await self._store.manifest(self._store.artifact_id(address))
        except KuraError as error:
            self._count_read(spec.producer, "error")
            raise self._read_fault(spec, error.message) from error
        if manifest is None:
            self._count_read(spec.producer, "not_found")
            raise NotFound(spec.not_found_message)
        return manifest

    def _read_fault(self, spec: RouteSpec, detail: str) -> KuraError:
        """A storage fault on a read: 503, or a miss for clients that die on 5xx."""
        log.error("artifact read failed: {detail}", detail=detail, route=spec.template)
        if spec.misses_on_fault:
            return NotFound(spec.not_found_message)
        return ServiceUnavailable(f"Artifact storage unavailable: {detail}")

    # -- Xcode CAS ----------------------------------------------------------------------

    @route(
        "/api/cache/cas/<id>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.XCODE,
        address=xcode_cas,
        accelerable=True,
    )
    async def xcode_cas_get(self, request: KuraRequest, id: str) -> bytes:
        return await self._download(request)

    @route(
        "/api/cache/cas/<id>",
        methods=["POST"],
        operation=Operation.WRITE,
        producer=Producer.XCODE,
        address=xcode_cas,
        body=BodyKind.STAGED,
        body_limit=256 * MiB,
    )
    async def xcode_cas_post(self, request: KuraRequest, id: str) -> bytes:
        return await self._upload(request, new_status=204, existing_status=204)

    # -- key-value ----------------------------------------------------------------------

    @route(
        "/api/cache/keyvalue",
        methods=["PUT"],
        operation=Operation.WRITE,
        producer=Producer.XCODE,
        tenant_required=True,
        namespaced=True,
        body=BodyKind.MEMORY,
        too_large_message="Failed to read key-value request body: length limit exceeded",
        key_in_body=True,
    )
    async def keyvalue_put(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        raw = request.body_bytes.getvalue()
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("expected a JSON object")
            cas_id = payload.get("cas_id")
            entries = payload.get("entries")
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("value"), str) for e in entries
            ):
                raise ValueError("entries must be a list of objects with a string value")
            query_cas_id = admission.query.single("cas_id")
            if cas_id is None:
                cas_id = query_cas_id
            if not isinstance(cas_id, str):
                raise ValueError("cas_id must be a string")
            if query_cas_id is not None and query_cas_id != cas_id:
                raise ValueError("cas_id in the query and the body differ")
        except (ValueError, UnicodeDecodeError) as error:
            self._count_write(Producer.XCODE, "error")
            raise BadRequest(f"Invalid key-value payload: {error}") from None
        namespace = admission.target.namespace
        assert namespace is not None
        address = keyvalue_address(cas_id, namespace)
        if admission.authorize_after_body and admission.hook_context is not None:
            # The key came with the body: the hooks see it before anything is stored.
            ctx = attrs.evolve(admission.hook_context, artifact_key=address.key)
            caller = await self._authorization.check(ctx)
            request.admitted = attrs.evolve(
                admission,
                target=attrs.evolve(admission.target, key=address.key),
                caller=caller,
                hook_context=ctx,
            )
        value = json.dumps(
            {"entries": [{"value": e["value"]} for e in entries]}, separators=(",", ":")
        ).encode("utf-8")
        await shielded(
            Deferred.fromCoroutine(
                self._store.put_inline(
                    address, value, content_type=JSON, policy=WritePolicy.LAST_WRITER_WINS
                )
            )
        )
        self._count_write(Producer.XCODE, "ok", len(value))
        return self._empty(request, 204)

    @route(
        "/api/cache/keyvalue/<cas_id>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.XCODE,
        address=keyvalue_get,
        not_found_message="Key-value entry not found",
    )
    async def keyvalue_get(self, request: KuraRequest, cas_id: str) -> bytes:
        return await self._download(request)

    # -- Gradle -------------------------------------------------------------------------

    @route(
        "/api/cache/gradle/<cache_key>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.GRADLE,
        address=tenant_scoped(Producer.GRADLE, "cache_key"),
        accelerable=True,
        # Gradle turns the remote cache off for the build on a 5xx read.
        misses_on_fault=True,
    )
    async def gradle_get(self, request: KuraRequest, cache_key: str) -> bytes:
        return await self._download(request)

    @route(
        "/api/cache/gradle/<cache_key>",
        methods=["PUT"],
        operation=Operation.WRITE,
        producer=Producer.GRADLE,
        address=tenant_scoped(Producer.GRADLE, "cache_key"),
        body=BodyKind.STAGED,
        body_limit=100 * MiB,
    )
    async def gradle_put(self, request: KuraRequest, cache_key: str) -> bytes:
        return await self._upload(request, new_status=201, existing_status=200)

    # -- module multipart -----------------------------------------------------------------

    @route(
        "/api/cache/module/start",
        methods=["POST"],
        operation=Operation.WRITE,
        producer=Producer.MODULE,
        address=module_artifact,
    )
    async def module_start(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        assert admission.address is not None
        existing = await self._store.stored(self._store.artifact_id(admission.address))
        if existing is not None:
            version = _cli_version(header(request, b"x-tuist-cli-version"))
            if version is not None and version >= MODULE_START_204_VERSION:
                return self._empty(request, 204)
            return self._json(request, 200, {"upload_id": None})
        category, hash_, name = admission.address.key.split("/", 2)
        try:
            upload_id = await shielded(
                Deferred.fromCoroutine(
                    self._store.start_upload(
                        tenant_id=admission.target.tenant or "",
                        namespace_id=admission.address.namespace,
                        category=category,
                        hash=hash_,
                        name=name,
                    )
                )
            )
        except TooManyRequests:
            self._metrics.upload_rejections.labels("multipart_unfinished").inc()
            raise
        return self._json(request, 200, {"upload_id": upload_id})

    @route(
        "/api/cache/module/part",
        methods=["POST"],
        operation=Operation.WRITE,
        producer=Producer.MODULE,
        body=BodyKind.STAGED,
        body_limit=10 * MiB,
        too_large_message="Part exceeds 10MB limit",
        needs_upload=True,
        head_check=_check_part_number,
    )
    async def module_part(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        upload: Upload = admission.context["upload"]
        part_number = int(admission.query.single("part_number") or "0")
        assert request.staging is not None
        try:
            staged = await request.staging.finish()
            await shielded(
                Deferred.fromCoroutine(
                    self._store.put_part(upload.upload_id, part_number, staged, MAX_MULTIPART_BYTES)
                )
            )
        except KeyError:
            self._metrics.multipart_parts.labels("not_found").inc()
            raise NotFound("Upload not found") from None
        except OverflowError:
            self._metrics.multipart_parts.labels("too_large").inc()
            raise Unprocessable("Total upload size exceeds 2GB limit") from None
        except KuraError:
            self._metrics.multipart_parts.labels("error").inc()
            raise
        self._metrics.multipart_parts.labels("ok").inc()
        return self._empty(request, 204)

    @route(
        "/api/cache/module/complete",
        methods=["POST"],
        operation=Operation.WRITE,
        producer=Producer.MODULE,
        body=BodyKind.MEMORY,
        body_limit=1 * MiB,
        needs_upload=True,
    )
    async def module_complete(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        upload: Upload = admission.context["upload"]
        content_type = (header(request, b"content-type") or "").split(";", 1)[0].strip()
        if content_type.lower() != JSON:
            raise UnsupportedMediaType("Expected request with `Content-Type: application/json`")
        try:
            payload = json.loads(request.body_bytes.getvalue())
            parts = payload["parts"]
            if not isinstance(parts, list) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in parts
            ):
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise BadRequest('Invalid complete payload: expected {"parts": [integers]}') from None
        if not parts or len(set(parts)) != len(parts) or any(p not in upload.parts for p in parts):
            raise BadRequest("Parts mismatch: every listed part must have been uploaded once")
        if sum(upload.parts[p] for p in parts) > MAX_MULTIPART_BYTES:
            raise Unprocessable("Total upload size exceeds 2GB limit")
        address = ArtifactAddress(
            Producer.MODULE,
            upload.namespace_id,
            module_key(upload.category, upload.hash, upload.name),
        )
        try:
            result = await shielded(
                Deferred.fromCoroutine(
                    self._store.complete_upload(upload, parts, address, OCTET_STREAM)
                )
            )
        except KuraError as error:
            if isinstance(error, TmpBudgetExhausted):
                self._metrics.upload_rejections.labels("tmp_budget").inc()
            self._count_write(Producer.MODULE, "error")
            raise
        self._count_write(Producer.MODULE, "ok", result.manifest.size)
        return self._empty(request, 204)

    @route(
        "/api/cache/module/<id>",
        methods=["HEAD"],
        operation=Operation.READ,
        producer=Producer.MODULE,
        address=module_artifact,
    )
    async def module_exists(self, request: KuraRequest, id: str) -> bytes:
        admission = await self._admission(request)
        assert admission.address is not None
        try:
            manifest = await self._store.stored(self._store.artifact_id(admission.address))
        except KuraError:
            raise ServiceUnavailable("Artifact storage unavailable") from None
        if manifest is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Length", b"0")
            return b""
        return self._empty(request, 204)

    @route(
        "/api/cache/module/<id>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.MODULE,
        address=module_artifact,
        accelerable=True,
    )
    async def module_get(self, request: KuraRequest, id: str) -> bytes:
        return await self._download(request)

    # -- clean ---------------------------------------------------------------------------

    @route(
        "/api/cache/clean",
        methods=["DELETE"],
        operation=Operation.DELETE_NAMESPACE,
        tenant_required=True,
        namespaced=True,
    )
    async def clean(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        namespace = admission.target.namespace
        assert namespace is not None
        try:
            await shielded(Deferred.fromCoroutine(self._store.delete_namespace(namespace)))
        except KuraError as error:
            raise StorageFault(f"Failed to clean cache: {error.message}") from error
        audit_delete(request, admission, "clean")
        return self._empty(request, 204)

    # -- Nx and Metro --------------------------------------------------------------------

    @route(
        "/v1/cache/<hash>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.NX,
        address=fixed_namespace(Producer.NX, "nx", "hash"),
        tenantless=True,
        accelerable=True,
        misses_on_fault=True,
        plain_auth_errors=True,
    )
    async def nx_get(self, request: KuraRequest, hash: str) -> bytes:
        return await self._download(request)

    @route(
        "/v1/cache/<hash>",
        methods=["PUT"],
        operation=Operation.WRITE,
        producer=Producer.NX,
        address=fixed_namespace(Producer.NX, "nx", "hash"),
        tenantless=True,
        body=BodyKind.STAGED,
        body_limit=2 * GiB,
        plain_auth_errors=True,
        trouble_status=409,
    )
    async def nx_put(self, request: KuraRequest, hash: str) -> bytes:
        # Nx stores only on exactly 200 (any other 2xx fails the task).
        return await self._upload(request, new_status=200, existing_status=200)

    @route(
        "/api/metro/cache/<cache_key>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.METRO,
        address=fixed_namespace(Producer.METRO, "metro", "cache_key"),
        tenantless=True,
        accelerable=True,
        misses_on_fault=True,
    )
    async def metro_get(self, request: KuraRequest, cache_key: str) -> bytes:
        return await self._download(request)

    @route(
        "/api/metro/cache/<cache_key>",
        methods=["PUT"],
        operation=Operation.WRITE,
        producer=Producer.METRO,
        address=fixed_namespace(Producer.METRO, "metro", "cache_key"),
        tenantless=True,
        body=BodyKind.STAGED,
        body_limit=2 * GiB,
    )
    async def metro_put(self, request: KuraRequest, cache_key: str) -> bytes:
        return await self._upload(request, new_status=200, existing_status=200)

    # -- probes ---------------------------------------------------------------------------

    @route("/up", methods=["GET"], probe=True)
    def up(self, request: KuraRequest) -> bytes:
        return self._json(request, 200, self._state.up_report())

    @route("/ready", methods=["GET"], probe=True)
    def ready(self, request: KuraRequest) -> bytes:
        report = self._state.ready_report()
        return self._json(request, 200 if report["ready"] else 503, report)

    @route("/status/rollout", methods=["GET"], probe=True)
    def rollout(self, request: KuraRequest) -> bytes:
        require_bearer(request, self._config.access.status_token)
        return self._json(request, 200, self._state.rollout_report())

    @route("/metrics", methods=["GET"], probe=True)
    def metrics(self, request: KuraRequest) -> bytes:
        require_bearer(request, self._config.access.metrics_token)
        # Rendered inline from the injected registry: it is CPU-only and small,
        # and prometheus_client's Twisted resource would run it on the global
        # reactor's thread pool (never answering on an injected reactor).
        # Gauges of the store's state are read at collection (set_function).
        body = generate_latest(self._metrics.registry)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE_PLAIN_0_0_4.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    # -- errors ---------------------------------------------------------------------------

    @_app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Failure) -> KleinRenderable:
        return Deferred.fromCoroutine(self._render_error(cast(KuraRequest, request), failure))

    async def _render_error(self, request: KuraRequest, failure: Failure) -> bytes | None:
        """The one place an exception becomes a response (see kura.web.errors)."""
        error = classify_failure(failure)
        if error is None:
            return None
        spec = request.spec
        if error.status >= 500 and not isinstance(failure.value, KuraError):
            log.failure("unexpected error on {route}", failure, route=spec.template)
            self._metrics.http_exceptions.labels(spec.template, type(failure.value).__name__).inc()
        body = respond_with_error(request, as_seen_by_client(error, spec), spec)
        await self._extension_headers(request)
        return body

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
from collections.abc import Mapping
from typing import cast

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
from kura.domain.artifacts import JSON, OCTET_STREAM, ArtifactAddress, Producer
from kura.domain.errors import (
    BadRequest,
    KuraError,
    NotFound,
    ServiceUnavailable,
    StorageFault,
    TmpBudgetExhausted,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from kura.lifecycle import NodeState
from kura.storage.metadata import Upload, WritePolicy
from kura.storage.runner import BlockingRunner
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics
from kura.web.errors import as_seen_by_client, classify_failure, respond_with_error
from kura.web.http import KuraRequest
from kura.web.routing import BodyKind, GiB, MiB, Operation, Query, RouteSpec

from .artifacts import ArtifactService
from .audit import audit_delete
from .authorization import RequestAuthorization
from .handling import admission_of, empty, header, json_response
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
        self._artifacts = ArtifactService(store=store, metrics=metrics, runner=runner)
        self.specs: Mapping[str, RouteSpec] = {
            **_SPECS,
            "keyvalue_put": attrs.evolve(
                _SPECS["keyvalue_put"], body_limit=config.max_keyvalue_bytes
            ),
        }

    def resource(self) -> IResource:
        return self.app.resource()

    # -- shared steps ---------------------------------------------------------------

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

    async def _upload(
        self, request: KuraRequest, *, new_status: int, existing_status: int
    ) -> bytes:
        stored = await self._artifacts.publish(request)
        return empty(request, new_status if stored else existing_status)

    async def _download(self, request: KuraRequest) -> bytes:
        body = await self._artifacts.download(request)
        if isinstance(body, bytes):
            return body
        try:
            await self._extension_headers(request)
        except BaseException:
            body.discard()
            raise
        return await body.send(request)

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
        admission = await admission_of(request)
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
            self._artifacts.count_write(Producer.XCODE, "error")
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
        self._artifacts.count_write(Producer.XCODE, "ok", len(value))
        return empty(request, 204)

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
        admission = await admission_of(request)
        assert admission.address is not None
        existing = await self._store.stored(self._store.artifact_id(admission.address))
        if existing is not None:
            version = _cli_version(header(request, b"x-tuist-cli-version"))
            if version is not None and version >= MODULE_START_204_VERSION:
                return empty(request, 204)
            return json_response(request, 200, {"upload_id": None})
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
        return json_response(request, 200, {"upload_id": upload_id})

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
        admission = await admission_of(request)
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
        return empty(request, 204)

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
        admission = await admission_of(request)
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
            self._artifacts.count_write(Producer.MODULE, "error")
            raise
        self._artifacts.count_write(Producer.MODULE, "ok", result.manifest.size)
        return empty(request, 204)

    @route(
        "/api/cache/module/<id>",
        methods=["HEAD"],
        operation=Operation.READ,
        producer=Producer.MODULE,
        address=module_artifact,
    )
    async def module_exists(self, request: KuraRequest, id: str) -> bytes:
        admission = await admission_of(request)
        assert admission.address is not None
        try:
            manifest = await self._store.stored(self._store.artifact_id(admission.address))
        except KuraError:
            raise ServiceUnavailable("Artifact storage unavailable") from None
        if manifest is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Length", b"0")
            return b""
        return empty(request, 204)

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
        admission = await admission_of(request)
        namespace = admission.target.namespace
        assert namespace is not None
        try:
            await shielded(Deferred.fromCoroutine(self._store.delete_namespace(namespace)))
        except KuraError as error:
            raise StorageFault(f"Failed to clean cache: {error.message}") from error
        audit_delete(request, admission, "clean")
        return empty(request, 204)

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
        return json_response(request, 200, self._state.up_report())

    @route("/ready", methods=["GET"], probe=True)
    def ready(self, request: KuraRequest) -> bytes:
        report = self._state.ready_report()
        return json_response(request, 200 if report["ready"] else 503, report)

    @route("/status/rollout", methods=["GET"], probe=True)
    def rollout(self, request: KuraRequest) -> bytes:
        require_bearer(request, self._config.access.status_token)
        return json_response(request, 200, self._state.rollout_report())

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

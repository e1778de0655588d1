"""The Tuist module cache: multipart uploads and reads of built modules.

An upload is started (``POST /api/cache/module/start``), sent in numbered
parts of at most 10 MiB (``POST .../part``), then completed with the list of
parts that make the artifact (``POST .../complete``), at most 2 GiB in all.
Start answers at once when the artifact is already stored (204 for CLIs that
understand it, else ``{"upload_id": null}``). ``HEAD``/``GET
/api/cache/module/{id}`` test for and read an artifact; the key is in the
query (``cache_category``, ``hash``, ``name``), the ``{id}`` segment is
ignored. Parts and completions act on the upload the gate loaded from
``upload_id`` (404 before the body when it is unknown).
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred

from kura.api.artifacts import ArtifactService
from kura.api.handling import admission_of, empty, header, json_response
from kura.api.routes import module_artifact, module_key
from kura.api.table import Route, artifact_read, artifact_write, route
from kura.defer import shielded
from kura.domain.artifacts import JSON, OCTET_STREAM, ArtifactAddress, Producer
from kura.domain.errors import (
    BadRequest,
    KuraError,
    NotFound,
    ServiceUnavailable,
    TmpBudgetExhausted,
    TooManyRequests,
    Unprocessable,
    UnsupportedMediaType,
)
from kura.storage.metadata import Upload
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics
from kura.web.request import KuraRequest
from kura.web.routing import BodyKind, GiB, MiB, Operation, Query

#: Tuist CLIs from this version understand 204 from module start.
MODULE_START_204_VERSION = (4, 202, 0)
MAX_MULTIPART_BYTES = 2 * GiB
MAX_PART_NUMBER = 2**32 - 1
MAX_PART_BYTES = 10 * MiB


def check_part_number(query: Query) -> None:
    """Refuse a part whose ``part_number`` is missing or out of range (at admission)."""
    text = query.single("part_number")
    if text is None or not text.isdigit() or int(text) > MAX_PART_NUMBER:
        raise BadRequest("Invalid part_number")


def cli_version(value: str | None) -> tuple[int, ...] | None:
    """``(major, minor, patch)`` of an ``x-tuist-cli-version`` header, if it parses."""
    if not value:
        return None
    core = value.strip().lstrip("v").split("-", 1)[0].split("+", 1)[0]
    try:
        return tuple(int(part) for part in core.split(".")[:3])
    except ValueError:
        return None


class ModuleRoutes:
    """The module cache's routes (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
        store: multipart uploads and existence checks.
        metrics: multipart part and upload rejection counters.
    """

    def __init__(
        self, artifacts: ArtifactService, *, store: ArtifactStore, metrics: KuraMetrics
    ) -> None:
        self._artifacts = artifacts
        self._store = store
        self._metrics = metrics

    def routes(self) -> tuple[Route, ...]:
        """This protocol's rows of the route table."""
        return (
            route(
                "module_start",
                "/api/cache/module/start",
                "POST",
                self.start,
                operation=Operation.WRITE,
                producer=Producer.MODULE,
                address=module_artifact,
            ),
            artifact_write(
                "module_part",
                "/api/cache/module/part",
                "POST",
                self.part,
                producer=Producer.MODULE,
                body_limit=MAX_PART_BYTES,
                too_large_message="Part exceeds 10MB limit",
                needs_upload=True,
                head_check=check_part_number,
            ),
            route(
                "module_complete",
                "/api/cache/module/complete",
                "POST",
                self.complete,
                operation=Operation.WRITE,
                producer=Producer.MODULE,
                body=BodyKind.MEMORY,
                body_limit=1 * MiB,
                needs_upload=True,
            ),
            route(
                "module_exists",
                "/api/cache/module/<id>",
                "HEAD",
                self.exists,
                operation=Operation.READ,
                producer=Producer.MODULE,
                address=module_artifact,
            ),
            artifact_read(
                "module_get",
                "/api/cache/module/<id>",
                self._artifacts.download,
                producer=Producer.MODULE,
                address=module_artifact,
                misses_on_fault=False,
            ),
        )

    async def start(self, request: KuraRequest) -> bytes:
        admission = await admission_of(request)
        assert admission.address is not None
        existing = await self._store.stored(self._store.artifact_id(admission.address))
        if existing is not None:
            version = cli_version(header(request, b"x-tuist-cli-version"))
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

    async def part(self, request: KuraRequest) -> bytes:
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

    async def complete(self, request: KuraRequest) -> bytes:
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

    async def exists(self, request: KuraRequest) -> bytes:
        admission = await admission_of(request)
        assert admission.address is not None
        try:
            manifest = await self._store.stored(self._store.artifact_id(admission.address))
        except KuraError:
            raise ServiceUnavailable("Artifact storage unavailable") from None
        return empty(request, 204 if manifest is not None else 404)

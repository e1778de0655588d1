"""Tuist's own cache routes: Xcode CAS blobs, key-value entries and namespace cleans.

* ``/api/cache/cas/{id}``: GET (accelerable) and POST of Xcode
  compilation-cache blobs, write-once, 204 either way.
* ``/api/cache/keyvalue``: PUT of ``{"cas_id": ..., "entries": [...]}``,
  stored inline (last writer wins). ``cas_id`` may come only in the body, so
  the hooks run once the body is read and see the key before anything is
  stored. ``/api/cache/keyvalue/{cas_id}``: GET.
* ``/api/cache/clean``: DELETE of a whole namespace, audited.

Every route names its tenant (``tenant_id``) and namespace (``namespace_id``)
in the query (:mod:`kura.api.routes`).
"""

from __future__ import annotations

import json

import attrs
from twisted.internet.defer import Deferred

from kura.api.artifacts import ArtifactService
from kura.api.audit import audit_delete
from kura.api.authorization import RequestAuthorization
from kura.api.handling import admission_of, empty
from kura.api.routes import keyvalue_address, keyvalue_get, xcode_cas
from kura.api.table import Route, artifact_read, artifact_write, route
from kura.defer import shielded
from kura.domain.artifacts import JSON, Producer
from kura.domain.errors import BadRequest, KuraError, StorageFault
from kura.storage.metadata import WritePolicy
from kura.storage.store import ArtifactStore
from kura.web.request import KuraRequest
from kura.web.routing import BodyKind, MiB, Operation

#: The largest Xcode CAS blob.
CAS_BODY_LIMIT = 256 * MiB


class TuistRoutes:
    """Xcode CAS, key-value and clean (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
        store: for key-value entries and cleans.
        authorization: runs the hooks of a key-value PUT once its key is known.
        max_keyvalue_bytes: the largest key-value PUT body.
    """

    def __init__(
        self,
        artifacts: ArtifactService,
        *,
        store: ArtifactStore,
        authorization: RequestAuthorization,
        max_keyvalue_bytes: int,
    ) -> None:
        self._artifacts = artifacts
        self._store = store
        self._authorization = authorization
        self._max_keyvalue_bytes = max_keyvalue_bytes

    def routes(self) -> tuple[Route, ...]:
        """This protocol's rows of the route table."""
        return (
            artifact_read(
                "xcode_cas_get",
                "/api/cache/cas/<id>",
                self._artifacts.download,
                producer=Producer.XCODE,
                address=xcode_cas,
                misses_on_fault=False,
            ),
            artifact_write(
                "xcode_cas_post",
                "/api/cache/cas/<id>",
                "POST",
                self.cas_post,
                producer=Producer.XCODE,
                address=xcode_cas,
                body_limit=CAS_BODY_LIMIT,
            ),
            route(
                "keyvalue_put",
                "/api/cache/keyvalue",
                "PUT",
                self.keyvalue_put,
                operation=Operation.WRITE,
                producer=Producer.XCODE,
                tenant_required=True,
                namespaced=True,
                body=BodyKind.MEMORY,
                body_limit=self._max_keyvalue_bytes,
                too_large_message="Failed to read key-value request body: length limit exceeded",
                key_in_body=True,
            ),
            route(
                "keyvalue_get",
                "/api/cache/keyvalue/<cas_id>",
                "GET",
                self._artifacts.download,
                operation=Operation.READ,
                producer=Producer.XCODE,
                address=keyvalue_get,
                not_found_message="Key-value entry not found",
            ),
            route(
                "clean",
                "/api/cache/clean",
                "DELETE",
                self.clean,
                operation=Operation.DELETE_NAMESPACE,
                tenant_required=True,
                namespaced=True,
            ),
        )

    async def cas_post(self, request: KuraRequest) -> bytes:
        await self._artifacts.publish(request)
        return empty(request, 204)

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

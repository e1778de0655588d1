"""The public API's admission: everything decided from a request head, before any body byte.

For every public request, on both serving paths, :meth:`Gate.admit` matches
the route in the Klein ``url_map``, applies draining and write shedding,
checks tenancy, resolves the artifact address, enforces the declared body
size, and (for write-once uploads) looks the artifact up so an existing one
is answered at once, leaving its body unread. It runs exactly once per
request; handlers use its :class:`Admission` instead of re-deriving anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import cast

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from kura.auth import OpenAccess
from kura.auth.context import HeaderInput
from kura.domain.artifacts import Producer, Target
from kura.domain.errors import KuraError, NotFound, PayloadTooLarge, ServiceUnavailable
from kura.lifecycle import NodeState
from kura.memory import Pressure
from kura.storage.store import ArtifactStore
from kura.web.admission import UNMATCHED, Admission, RequestHead, RouteMatch
from kura.web.interfaces import IGate
from kura.web.routing import BodyKind, Operation, Query, RouteSpec

from .authorization import RequestAuthorization
from .routes import module_key, resolve_target

#: How many resolved targets a gate remembers (cleared when full).
TARGET_MEMO_SIZE = 8192

#: Methods that write (and are shed when replication falls behind).
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})


@implementer(IGate)
class Gate:
    """Admits public requests (see the module docstring).

    Args:
        routes: the route matcher.
        store: for existence checks and outbox depth.
        state: draining flag.
        node_tenant: the tenant every tenant-carrying request must name.
        outbox_max_depth: at this many queued replication messages writes
            are shed with 503.
    """

    def __init__(
        self,
        *,
        routes: RouteMatch,
        store: ArtifactStore,
        state: NodeState,
        node_tenant: str,
        outbox_max_depth: int,
        authorization: RequestAuthorization | None = None,
    ) -> None:
        self.routes = routes
        self.authorization = authorization or RequestAuthorization(OpenAccess(), node_tenant)
        self._store = store
        self._state = state
        self._node_tenant = node_tenant
        self._outbox_max_depth = outbox_max_depth
        self._targets: dict[tuple[str, bytes, bytes], Target] = {}

    def classify(self, head: RequestHead) -> tuple[RouteSpec, Mapping[str, str]]:
        """The route a head addresses (``UNMATCHED`` when none)."""
        return self.routes.match(head.method, head.path) or (UNMATCHED, MappingProxyType({}))

    def admit(self, head: RequestHead) -> Deferred[Admission]:
        """Decide whether the request may proceed; errback with a ``KuraError`` if not.

        Fires synchronously unless a store lookup or a hook has to wait.
        """
        try:
            admission = self._admit_sync(head)
        except KuraError as error:
            return fail(error)
        spec = admission.spec
        if spec.probe or spec is UNMATCHED or not spec.public:
            return succeed(admission)
        if (
            spec.needs_upload
            or self.authorization.needs_check(spec)
            or self._looks_up_existing(admission, head)
        ):
            return Deferred.fromCoroutine(self._complete(admission, head))
        return succeed(admission)

    def _admit_sync(self, head: RequestHead) -> Admission:
        spec, path_args = self.classify(head)
        if spec.probe:
            return Admission(spec, path_args, Query(head.query))
        if self._state.draining:
            if spec.misses_on_fault and head.method in ("GET", "HEAD"):
                # Clients that fail a whole build on a 503 (Nx, Metro) get a miss.
                raise NotFound(spec.not_found_message, close=True)
            raise ServiceUnavailable("server is draining", retry_after=None, close=True)
        if spec is UNMATCHED:
            if head.declared_length != 0:
                raise NotFound("Not found", close=True)
            return Admission(spec, path_args, Query(head.query))
        if head.method.upper() in WRITE_METHODS:
            if self._state.memory_pressure is Pressure.CRITICAL:
                raise ServiceUnavailable("server is shedding writes due to memory pressure")
            if self._store.outbox_depth >= self._outbox_max_depth:
                raise ServiceUnavailable("server is shedding writes while replication catches up")
        limit = spec.body_limit
        if head.declared_length is not None and head.declared_length > limit:
            raise PayloadTooLarge(spec.too_large_message)
        query = Query(head.query)
        target = self._target(spec, path_args, head, query)
        if spec.head_check is not None:
            spec.head_check(query)
        return Admission(spec, path_args, query, target)

    def _target(
        self, spec: RouteSpec, path_args: Mapping[str, str], head: RequestHead, query: Query
    ) -> Target:
        """:func:`resolve_target`, remembered: build clients fetch the same
        artifacts again and again, and the target is a function of the route,
        its path arguments and the query (the node tenant is fixed).

        The route and path arguments follow from the method and path, the
        query from the raw query, so those are the key; a head that carries
        decoded parameters without their raw form is resolved every time.
        """
        if head.query and not head.raw_query:
            return resolve_target(spec, path_args, query, self._node_tenant)
        key = (spec.endpoint, head.path, head.raw_query)
        target = self._targets.get(key)
        if target is None:
            # Refusals (BadRequest, Forbidden) raise here and are not remembered.
            target = resolve_target(spec, path_args, query, self._node_tenant)
            if len(self._targets) >= TARGET_MEMO_SIZE:
                self._targets.clear()
            self._targets[key] = target
        return target

    def _looks_up_existing(self, admission: Admission, head: RequestHead) -> bool:
        """Whether the head must ask the store if a write-once upload exists.

        Only write-once uploads of an artifact (not parts of one) ask. A body
        small enough to arrive in memory is cheaper to write than a metadata
        lookup on a storage thread is to wait for, and most uploads are of
        new artifacts: for those only a manifest already in memory counts,
        and the commit's own write-once check settles the rest (the upload
        is then discarded and answered as already stored).
        """
        spec = admission.spec
        address = admission.address
        if spec.body is not BodyKind.STAGED or spec.address is None or spec.overwrites:
            return False
        assert address is not None, "a route that addresses an artifact has a target"
        declared = head.declared_length
        if declared is None or declared > self._store.memory_body_bytes:
            return True
        return self._store.cached_manifest(self._store.artifact_id(address)) is not None

    async def _complete(self, admission: Admission, head: RequestHead) -> Admission:
        """The head-time steps that may wait, in order: the multipart upload,
        the authorization check (before any existence check, so a caller
        without access learns nothing), then whether a write-once upload
        exists."""
        spec = admission.spec
        if spec.needs_upload:
            upload_id = admission.query.single("upload_id")
            upload = None if upload_id is None else await self._store.upload(upload_id)
            if upload is None:
                raise NotFound("Upload not found", close=True)
            # The upload record, not the request, says what the part or the
            # completion acts on.
            target = Target(
                Producer.MODULE,
                upload.tenant_id,
                upload.namespace_id,
                module_key(upload.category, upload.hash, upload.name),
                upload.hash,
            )
            admission = attrs.evolve(admission, target=target, context={"upload": upload})
        authorization = self.authorization
        if authorization.needs_check(spec):
            ctx = authorization.context(
                spec=spec,
                method=head.method,
                target=admission.target,
                headers=cast(HeaderInput, head.headers),
                query=head.query,
                transport=head.transport,
            )
            if spec.key_in_body and admission.target.key is None:
                admission = attrs.evolve(admission, hook_context=ctx, authorize_after_body=True)
            else:
                caller = await authorization.check(ctx)
                admission = attrs.evolve(admission, caller=caller, hook_context=ctx)
        if self._looks_up_existing(admission, head):
            # A write-once upload of an artifact already stored is answered
            # from the head.
            assert admission.address is not None
            existing = await self._store.stored(self._store.artifact_id(admission.address))
            if existing is not None and spec.operation is Operation.WRITE:
                admission = attrs.evolve(admission, existing=existing)
        return admission

"""The internal plane: a separate Klein app on ``KURA_INTERNAL_PORT``.

Routes (formats in ``docs/replication.md``):

* ``GET /_internal/status``: ``{"region", "tenant_id", "node_url", ...}``;
* ``PUT /_internal/replicate/artifact?producer=&inline=&namespace_id=&key=``
  ``&content_type=&version_ms=`` (:mod:`.receiver`);
* ``DELETE /_internal/replicate/namespace?namespace_id=&version_ms=``;
* ``DELETE /_internal/replicate/artifact?artifact_id=&namespace_id=&version_ms=``;
* ``GET /_internal/bootstrap/namespace_tombstones?limit=&after=``;
* ``GET /_internal/bootstrap/artifact_tombstones?limit=&after=``;
* ``GET /_internal/bootstrap/manifests?limit=&after=`` (artifact-id order)
  or ``?order=recent&since=&limit=&after=`` (newest version first);
* ``GET /_internal/bootstrap/artifacts/{artifact_id}``: the raw body, paced
  by the bandwidth limiter, or 404.

It is served by the same :class:`~kura.web.site.KuraSite` machinery as the
public API (head-time admission through :class:`InternalGate`, bodies
streamed into staging), but every route is ``public=False``: peer traffic
never counts as public load and is never throttled as such. Every route,
status included, requires a peer signature when the node has a peer secret
(401 otherwise, :mod:`.peer_auth`) and the tenant header (403 otherwise);
success responses to signed requests are signed. With peer mTLS, the
handshake already refused certificates without a configured peer name
(:mod:`.tls`). The public port has none of these routes (404).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import attrs
from klein import Klein, KleinRenderable
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from kura.config import KuraConfig
from kura.domain.errors import Forbidden, KuraError, NotFound, ServiceUnavailable
from kura.lifecycle import NodeState
from kura.storage.interfaces import IArtifactStore, IBlockingRunner
from kura.telemetry.metrics import KuraMetrics
from kura.web.admission import UNMATCHED, Admission, RequestHead, RouteMatch
from kura.web.errors import classify_failure, respond_with_error
from kura.web.interfaces import IGate
from kura.web.request import KuraRequest
from kura.web.routing import BodyKind, Query, RouteSpec, template_of

from . import wire
from .bodies import PacedFileBody, StallWatchdog
from .digests import BodyDigests
from .limiter import BandwidthLimiter
from .peer_auth import (
    DIGEST_HEADER,
    EMPTY_SHA256,
    UNSIGNED,
    PeerAuthenticator,
    PeerCaller,
    sha256_hex,
)
from .receiver import MAX_REPLICATION_BODY_BYTES, SOURCE_REPLICATION, Receiver, ReplicaAdmission

log = Logger(namespace="kura.replication.internal")


Handler = TypeVar("Handler", bound=Callable[..., Any])
#: One route's admission step (see :class:`HeadRule`).
HeadStep = Callable[
    ["InternalGate", RouteSpec, Mapping[str, str], RequestHead, PeerCaller],
    "Admission | Deferred[Admission]",
]


@attrs.frozen
class HeadRule:
    """How :class:`InternalGate` admits one route's head, once the peer is authenticated.

    Attributes:
        step: builds the route's admission from its spec, path arguments,
            head and peer, or raises the ``KuraError`` that refuses it.
        any_tenant: the route answers members of any tenant (status: a node
            of another tenant learns it is foreign instead of seeing a
            failure); every other route must name this node's tenant.
    """

    step: HeadStep
    any_tenant: bool = False


_app = Klein()
_SPECS: dict[str, RouteSpec] = {}
_HEAD_RULES: dict[RouteSpec, HeadRule] = {}


def route(
    rule: str, *, methods: list[str], head: HeadRule, **fields: Any
) -> Callable[[Handler], Handler]:
    """Register an internal route, its (non-public) :class:`RouteSpec` and its head rule."""

    def register(handler: Handler) -> Handler:
        endpoint = handler.__name__
        spec = RouteSpec(endpoint=endpoint, template=template_of(rule), public=False, **fields)
        _SPECS[endpoint] = spec
        _HEAD_RULES[spec] = head
        _app.route(rule, methods=methods, endpoint=endpoint)(handler)
        return handler

    return register


@implementer(IGate)
class InternalGate:
    """Head-time admission for the internal plane.

    Every request is authenticated first (:mod:`.peer_auth`; reads
    included), then must name this node's tenant (unless its route's
    :class:`HeadRule` says any tenant), then goes through its route's step.

    Args:
        routes: matches paths against the internal app's ``url_map``.
        rules: the head rule of every spec ``routes`` can match.
        receiver: decides replicated upserts before their bodies.
        auth: checks peer signatures.
        node_tenant: the tenant every peer request must name.
    """

    def __init__(
        self,
        *,
        routes: RouteMatch,
        rules: Mapping[RouteSpec, HeadRule],
        receiver: Receiver,
        auth: PeerAuthenticator,
        node_tenant: str,
    ) -> None:
        self.routes = routes
        self._rules = rules
        self._receiver = receiver
        self._auth = auth
        self._tenant = node_tenant

    def classify(self, head: RequestHead) -> tuple[RouteSpec, Mapping[str, str]]:
        matched = self.routes.match(head.method, head.path)
        if matched is None:
            return UNMATCHED, {}
        return matched

    def admit(self, head: RequestHead) -> Deferred[Admission]:
        """Admit or refuse a peer request from its head (see the class docstring)."""
        try:
            spec, path_args = self.classify(head)
            if spec is UNMATCHED:
                raise NotFound("Not found", close=head.declared_length != 0)
            tenants = head.headers.get(wire.TENANT_HEADER.decode("ascii").lower(), [])
            peer = self._auth.check_request(
                method=head.method,
                path=head.path,
                query=head.raw_query,
                headers=head.headers,
                tenant=tenants[0] if len(tenants) == 1 else "",
                peer=head.peer,
            )
            rule = self._rules[spec]
            if not rule.any_tenant:
                self._check_tenant(tenants, head)
            admitted = rule.step(self, spec, path_args, head, peer)
        except KuraError as error:
            return fail(error)
        return admitted if isinstance(admitted, Deferred) else succeed(admitted)

    # -- the routes' steps (named by their routes' HeadRule) ------------------------------

    def admit_plain(
        self, spec: RouteSpec, path_args: Mapping[str, str], head: RequestHead, peer: PeerCaller
    ) -> Admission:
        """Nothing to parse: the peer is all the handler needs."""
        return Admission(spec, path_args, Query(head.query), context={"peer": peer})

    def admit_upsert(
        self, spec: RouteSpec, path_args: Mapping[str, str], head: RequestHead, peer: PeerCaller
    ) -> Deferred[Admission]:
        """A replicated write: the receiver decides it before its body (stale, equal, ...)."""
        return Deferred.fromCoroutine(self._receiver.admit_upsert(spec, path_args, head, peer))

    def admit_delete(
        self, spec: RouteSpec, path_args: Mapping[str, str], head: RequestHead, peer: PeerCaller
    ) -> Admission:
        """A replicated clean: its message, refused when its version is too far ahead."""
        message = wire.DeleteMessage.parse(head.query)
        self._receiver.check_version(message.version_ms)
        context = {"peer": peer, "message": message}
        return Admission(spec, path_args, Query(head.query), context=context)

    def admit_artifact_delete(
        self, spec: RouteSpec, path_args: Mapping[str, str], head: RequestHead, peer: PeerCaller
    ) -> Admission:
        """A replicated artifact delete: its message, refused when its version is too far ahead."""
        message = wire.ArtifactDeleteMessage.parse(head.query)
        self._receiver.check_version(message.version_ms)
        context = {"peer": peer, "message": message}
        return Admission(spec, path_args, Query(head.query), context=context)

    def admit_page(
        self, spec: RouteSpec, path_args: Mapping[str, str], head: RequestHead, peer: PeerCaller
    ) -> Admission:
        """A catch-up listing: its page (``after``, ``limit``)."""
        context = {"peer": peer, "page": wire.PageRequest.parse(head.query)}
        return Admission(spec, path_args, Query(head.query), context=context)

    def admit_body_read(
        self, spec: RouteSpec, path_args: Mapping[str, str], head: RequestHead, peer: PeerCaller
    ) -> Admission:
        """A catch-up body: 404 at once for anything that is not an artifact id."""
        if not wire.is_artifact_id(path_args.get("artifact_id", "")):
            raise NotFound("Artifact not found")
        return self.admit_plain(spec, path_args, head, peer)

    def _check_tenant(self, values: list[str], head: RequestHead) -> None:
        if values != [self._tenant]:
            raise Forbidden(
                f"Forbidden: this node serves tenant '{self._tenant}'",
                close=head.declared_length != 0,
            )


class InternalAPI:
    """The internal Klein application of one node.

    Args:
        config: node identity.
        store: the node's store.
        state: for the status report.
        receiver: applies replicated writes.
        limiter: paces catch-up bodies served.
        auth: signs responses to signed requests.
        digests: the SHA-256 of bodies served (signed before they are sent).
        metrics: byte counters.
        runner: blocking reads.
        clock: time source (stall watchdog).
    """

    app = _app
    specs: Mapping[str, RouteSpec] = _SPECS
    head_rules: Mapping[RouteSpec, HeadRule] = _HEAD_RULES

    def __init__(
        self,
        *,
        config: KuraConfig,
        store: IArtifactStore,
        state: NodeState,
        receiver: Receiver,
        limiter: BandwidthLimiter,
        auth: PeerAuthenticator,
        digests: BodyDigests,
        metrics: KuraMetrics,
        runner: IBlockingRunner,
        clock: IReactorTime,
    ) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._receiver = receiver
        self._limiter = limiter
        self._auth = auth
        self._digests = digests
        self._metrics = metrics
        self._runner = runner
        self._clock = clock

    def resource(self) -> IResource:
        return self.app.resource()

    async def _admission(self, request: KuraRequest) -> Admission:
        assert request.admission is not None
        admission = await request.admission
        if request.rejection is not None:
            raise request.rejection
        return admission

    def _sign(self, request: KuraRequest, status: int, digest: str) -> None:
        """Sign a success response to a signed request (its body's digest included)."""
        admission = request.admitted
        peer = admission.context.get("peer", UNSIGNED) if admission is not None else UNSIGNED
        if isinstance(admission, ReplicaAdmission):
            peer = admission.peer
        for name, value in self._auth.response_headers(peer, status, digest):
            request.responseHeaders.setRawHeaders(name, [value])

    def _json(self, request: KuraRequest, payload: object) -> bytes:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        self._sign(request, 200, sha256_hex(body))
        return body

    def _no_content(self, request: KuraRequest) -> bytes:
        request.setResponseCode(204)
        self._sign(request, 204, EMPTY_SHA256)
        return b""

    # -- status ---------------------------------------------------------------------------

    @route(
        wire.STATUS_PATH, methods=["GET"], head=HeadRule(InternalGate.admit_plain, any_tenant=True)
    )
    async def status(self, request: KuraRequest) -> bytes:
        await self._admission(request)
        ready, _ = self._state.readiness()
        return self._json(
            request,
            {
                "region": self._config.region,
                "tenant_id": self._config.tenant_id,
                "node_url": self._config.node_url,
                "generation": self._state.membership.generation,
                "ready": ready,
            },
        )

    # -- replication receiver ----------------------------------------------------------------

    @route(
        wire.REPLICATE_ARTIFACT_PATH,
        methods=["PUT"],
        head=HeadRule(InternalGate.admit_upsert),
        body=BodyKind.STAGED,
        body_limit=MAX_REPLICATION_BODY_BYTES,
    )
    async def replicate_artifact(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        await self._receiver.apply_upsert(admission, request.staging)
        return self._no_content(request)

    @route(
        wire.REPLICATE_NAMESPACE_PATH, methods=["DELETE"], head=HeadRule(InternalGate.admit_delete)
    )
    async def replicate_namespace(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        await self._receiver.apply_delete(admission.context["message"], source=SOURCE_REPLICATION)
        return self._no_content(request)

    @route(
        wire.REPLICATE_ARTIFACT_PATH,
        methods=["DELETE"],
        head=HeadRule(InternalGate.admit_artifact_delete),
    )
    async def replicate_artifact_delete(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        await self._receiver.apply_artifact_delete(
            admission.context["message"], source=SOURCE_REPLICATION
        )
        return self._no_content(request)

    # -- catch-up -----------------------------------------------------------------------------

    @route(wire.TOMBSTONES_PATH, methods=["GET"], head=HeadRule(InternalGate.admit_page))
    async def bootstrap_tombstones(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        page: wire.PageRequest = admission.context["page"]
        rows = await self._store.tombstones_page(page.after, page.limit)
        items = [{"namespace_id": ns, "version_ms": version} for ns, version in rows]
        cursor = rows[-1][0] if rows else None
        return self._json(request, wire.page_json("tombstones", items, page.limit, cursor))

    @route(wire.ARTIFACT_TOMBSTONES_PATH, methods=["GET"], head=HeadRule(InternalGate.admit_page))
    async def bootstrap_artifact_tombstones(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        page: wire.PageRequest = admission.context["page"]
        rows = await self._store.artifact_tombstones_page(page.after, page.limit)
        items = [
            wire.ArtifactDeleteMessage(row.artifact_id, row.namespace_id, row.version_ms).to_json()
            for row in rows
        ]
        cursor = rows[-1].artifact_id if rows else None
        return self._json(request, wire.page_json("artifact_tombstones", items, page.limit, cursor))

    @route(wire.MANIFESTS_PATH, methods=["GET"], head=HeadRule(InternalGate.admit_page))
    async def bootstrap_manifests(self, request: KuraRequest) -> bytes:
        admission = await self._admission(request)
        page: wire.PageRequest = admission.context["page"]
        if page.order == wire.ORDER_RECENT:
            return await self._recent_manifests(request, page)
        manifests = await self._store.manifests_page(page.after, page.limit)
        items = [wire.PeerManifest.of(m).to_json() for m in manifests]
        cursor = manifests[-1].artifact_id if manifests else None
        return self._json(request, wire.page_json("manifests", items, page.limit, cursor))

    async def _recent_manifests(self, request: KuraRequest, page: wire.PageRequest) -> bytes:
        """A recency page: newest version first, with this node's clock and, first, totals.

        The first page of a walk (no ``after``) carries ``total_items`` and
        ``total_bytes`` of everything the walk will list, so the fetching
        node can report what remains.
        """
        now_ms = int(self._clock.seconds() * 1000)
        extra: dict[str, object] = {"order": wire.ORDER_RECENT, "now_ms": now_ms}
        if page.after is None:
            count, size = await self._store.manifest_totals(page.since)
            extra.update(total_items=count, total_bytes=size)
        manifests = await self._store.recent_manifests_page(
            page.recent_cursor(), page.since, page.limit
        )
        items = [wire.PeerManifest.of(m).to_json() for m in manifests]
        last = manifests[-1] if manifests else None
        cursor = None if last is None else wire.recent_cursor(last.version_ms, last.artifact_id)
        return self._json(request, wire.page_json("manifests", items, page.limit, cursor, **extra))

    @route(
        wire.ARTIFACTS_PATH + "/<artifact_id>",
        methods=["GET"],
        head=HeadRule(InternalGate.admit_body_read),
    )
    async def bootstrap_artifact(self, request: KuraRequest, artifact_id: str) -> bytes:
        await self._admission(request)
        manifest = await self._store.manifest(artifact_id)
        if manifest is None:
            raise NotFound("Artifact not found")
        request.responseHeaders.setRawHeaders(wire.VERSION_HEADER, [b"%d" % manifest.version_ms])
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/octet-stream"])
        if manifest.in_database:
            value = await self._store.read_inline(manifest)
            if value is None:
                raise NotFound("Artifact not found")
            await self._limiter.wait(len(value))
            self._metrics.replication_body_bytes.labels("served").inc(len(value))
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(value)])
            self._declare(request, manifest.digest or sha256_hex(value))
            return value
        try:
            # Only a body that still matches its digest is sent (a damaged one
            # is forgotten here, and the fetching node tries another peer).
            opened = await self._store.open_intact(manifest)
        except OSError as error:
            raise ServiceUnavailable(f"cannot open artifact: {error.strerror}") from error
        if opened is None:
            raise NotFound("Artifact not found")
        fd = opened
        try:
            digest = await self._digests.of_file(manifest, fd)
        except BaseException:
            os.close(fd)
            raise
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % manifest.size])
        self._declare(request, digest)
        return await self._send(request, fd, manifest.size)

    def _declare(self, request: KuraRequest, digest: str) -> None:
        """Name a catch-up body's digest (signed to a signed caller), which the
        fetching node checks the body against before publishing it."""
        request.responseHeaders.setRawHeaders(DIGEST_HEADER, [digest.encode("ascii")])
        self._sign(request, 200, digest)

    async def _send(self, request: KuraRequest, fd: int, size: int) -> bytes:
        served = self._metrics.replication_body_bytes.labels("served")
        body = PacedFileBody(
            fd=fd,
            length=size,
            runner=self._runner,
            clock=self._clock,
            limiter=self._limiter,
            on_bytes=served.inc,
        )
        channel: Any = request.channel

        def stalled() -> None:
            log.warn("catch-up body stalled; aborting the connection")
            if channel is not None and channel.transport is not None:
                channel.transport.abortConnection()

        watchdog = StallWatchdog(
            self._clock, request.kura_site.send_timeout, lambda: body.last_progress, stalled
        ).start()
        consumer: IConsumer = request
        consumer.registerProducer(body, True)
        try:
            await body.startProducing(request)
        finally:
            watchdog.stop()
            body.close()
            consumer.unregisterProducer()
        return b""

    # -- errors ---------------------------------------------------------------------------

    @_app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Failure) -> KleinRenderable:
        error = classify_failure(failure)
        if error is None:
            return None
        spec = cast(KuraRequest, request).spec
        if error.status >= 500 and not isinstance(failure.value, KuraError):
            log.failure("unexpected error on {route}", failure, route=spec.template)
            self._metrics.http_exceptions.labels(spec.template, type(failure.value).__name__).inc()
        return respond_with_error(request, error, spec)

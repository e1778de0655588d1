"""The public HTTP API of one node: every protocol's routes, composed into one Klein app.

Each protocol module (:mod:`kura.api.protocols`) and the probes
(:mod:`kura.api.probes`) list their routes as data (:mod:`kura.api.table`);
:class:`PublicAPI` builds them from the node's store, metrics and authorizer
and adds them to a Klein app of its own at construction, so the app, its
``url_map`` and the specs admission reads all belong to the instance. By the
time a handler runs, its request has been admitted from the head
(:mod:`kura.api.gate`) and any upload body has been streamed into staging
(:mod:`kura.web.request`); handlers only do the work and choose the status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from klein import Klein, KleinRenderable
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from kura.config import KuraConfig
from kura.domain.errors import KuraError
from kura.lifecycle import NodeState
from kura.objectstore.readthrough import ReadThroughFetch
from kura.storage.interfaces import IBlockingRunner
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics
from kura.web.errors import as_seen_by_client, classify_failure, respond_with_error
from kura.web.request import KuraRequest
from kura.web.routing import RouteSpec

from .artifacts import ArtifactService, StreamedBody
from .authorization import RequestAuthorization
from .dispatch import MatchedDispatch, Responder
from .probes import Probes
from .protocols.bazel import BazelRoutes
from .protocols.ccache import CcacheRoutes
from .protocols.gradle import GradleRoutes
from .protocols.module import ModuleRoutes
from .protocols.nx_metro import NxMetroRoutes
from .protocols.sccache import SccacheRoutes
from .protocols.tuist import TuistRoutes
from .protocols.turbo import TurboRoutes
from .table import Handler, Route, specs_of

log = Logger(namespace="kura.api")


class PublicAPI:
    """The public Klein application of one node.

    Attributes:
        routes: the route table, every protocol's rows.
        specs: each route's spec by endpoint name (what admission reads).
        app: the Klein app serving ``routes``; its ``url_map`` is the one
            route matcher of both serving paths.

    Args:
        read_through: asks the object store for a local miss (the tier's
            :meth:`~kura.objectstore.readthrough.ReadThrough.fetch`); none
            without the tier.

    Raises:
        ValueError: two routes share an endpoint name.
    """

    def __init__(
        self,
        *,
        config: KuraConfig,
        store: ArtifactStore,
        state: NodeState,
        metrics: KuraMetrics,
        runner: IBlockingRunner,
        authorization: RequestAuthorization,
        read_through: ReadThroughFetch | None = None,
    ) -> None:
        self._authorization = authorization
        self._metrics = metrics
        artifacts = ArtifactService(
            store=store, metrics=metrics, runner=runner, read_through=read_through
        )
        self.routes: tuple[Route, ...] = (
            *TuistRoutes(
                artifacts,
                store=store,
                authorization=authorization,
                max_keyvalue_bytes=config.max_keyvalue_bytes,
            ).routes(),
            *GradleRoutes(artifacts).routes(),
            *ModuleRoutes(artifacts, store=store, metrics=metrics).routes(),
            *NxMetroRoutes(artifacts).routes(),
            *BazelRoutes(artifacts).routes(),
            *CcacheRoutes(artifacts, store=store).routes(),
            *SccacheRoutes(artifacts).routes(),
            *TurboRoutes(artifacts).routes(),
            *Probes(access=config.access, state=state, metrics=metrics).routes(),
        )
        self.specs: Mapping[str, RouteSpec] = specs_of(self.routes)
        self.app = Klein()
        self._responders: dict[RouteSpec, Responder] = {}
        for row in self.routes:
            responder = self._responder(row.handler)
            self.app.route(row.rule, methods=[row.method], endpoint=row.spec.endpoint)(responder)
            self._responders[row.spec] = responder
        self.app.handle_errors(Exception)(self._errors)

    def resource(self) -> IResource:
        """The app's resource: a request admission matched goes straight to its
        route's responder (:mod:`kura.api.dispatch`), the rest through Klein."""
        return MatchedDispatch(self.app.resource(), self._responders, self._render_error)

    # -- responses ------------------------------------------------------------------

    def _responder(self, handler: Handler) -> Responder:
        """What Klein calls for a route: ``handler``, then the response's last steps.

        Path arguments are dropped: handlers read them, already validated,
        from the request's admission.
        """

        async def respond(request: KuraRequest, **path_args: object) -> bytes:
            return await self._respond(handler, request)

        return respond

    async def _respond(self, handler: Handler, request: KuraRequest) -> bytes:
        """Answer with ``handler``, then add the extension's headers, then send the body.

        This is the one place the extension's ``response_headers`` are
        added: to the handler's answer or to the error it raised (rendered
        here, so its status is the one the hook sees), and before the first
        byte of a streamed body. Failures that no handler raised (no route
        matched, or the hook itself failed) are rendered by :meth:`_errors`
        without them: nothing was authorized, or there is nothing to add.
        """
        try:
            body = await handler(request)
        except Exception:
            rendered = self._render_error(request, Failure())
            if rendered is None:
                raise
            body = rendered
        try:
            await self._extension_headers(request)
        except BaseException:
            if isinstance(body, StreamedBody):
                body.discard()
            raise
        if isinstance(body, StreamedBody):
            return await body.send(request)
        return body

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

    # -- errors ---------------------------------------------------------------------

    def _errors(self, request: IRequest, failure: Failure) -> KleinRenderable:
        return self._render_error(cast(KuraRequest, request), failure)

    def _render_error(self, request: KuraRequest, failure: Failure) -> bytes | None:
        """The one place an exception becomes a response (see kura.web.errors).

        Returns ``None`` when there is no one to answer (the client went away).
        """
        error = classify_failure(failure)
        if error is None:
            return None
        spec = request.spec
        if error.status >= 500 and not isinstance(failure.value, KuraError):
            log.failure("unexpected error on {route}", failure, route=spec.template)
            self._metrics.http_exceptions.labels(spec.template, type(failure.value).__name__).inc()
        return respond_with_error(request, as_seen_by_client(error, spec), spec)

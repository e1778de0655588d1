"""Rendering a public request whose route admission already matched: :class:`MatchedDispatch`.

Every public request is matched against the Klein app's ``url_map`` once, at
its head (:meth:`kura.api.gate.Gate.classify`), and carries the matched
route's spec (``KuraRequest.spec``). Klein's own rendering would match it a
second time (bind the map, run werkzeug's matcher, adapt the request) before
calling the same responder. This resource calls that responder directly for
the routes of its table and leaves everything else (no route matched, a
method the route does not answer, requests of other sites) to the Klein
resource, so the ``url_map`` stays the one route table and Klein answers what
it always answered.

For a route it dispatches it does what Klein's rendering does with kura's
responders (which answer bytes or raise): the result is written and the
request finished; a failure goes to the app's error handler, unless the
request already finished (the client left: the responder is cancelled, as
Klein cancels it, and a failure other than that cancellation is logged).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from kura.web.request import KuraRequest
from kura.web.routing import RouteSpec

log = Logger(namespace="kura.api")

#: Answers an admitted request of its route (the body, once headers are final).
Responder = Callable[[KuraRequest], Coroutine[Any, Any, bytes]]
#: Renders a failure no responder handled (``None``: nothing to send).
ErrorRenderer = Callable[[KuraRequest, Failure], bytes | None]


@implementer(IResource)
class MatchedDispatch:
    """A leaf resource: the responder of the matched route, else the Klein resource.

    Args:
        klein: the Klein app's resource (everything this one does not dispatch).
        responders: the responder of each route spec (by identity: a spec
            from another table is not dispatched here).
        errors: the app's error handler.
    """

    isLeaf = True

    def __init__(
        self,
        klein: IResource,
        responders: Mapping[RouteSpec, Responder],
        errors: ErrorRenderer,
    ) -> None:
        self._klein = klein
        self._responders = {id(spec): (spec, responder) for spec, responder in responders.items()}
        self._errors = errors

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        return self  # a leaf: never traversed

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("the route table is the app's url_map")

    def render(self, request: Any) -> Any:
        entry = self._responders.get(id(getattr(request, "spec", None)))
        if entry is None or entry[0] is not request.spec:
            return self._klein.render(request)
        rendering = Deferred.fromCoroutine(entry[1](request))
        # The client left: stop the responder where it waits (as Klein does).
        request.notifyFinish().addErrback(lambda _: rendering.cancel())
        rendering.addCallbacks(
            self._write, self._failed, callbackArgs=(request,), errbackArgs=(request,)
        )
        rendering.addErrback(_unhandled)
        return NOT_DONE_YET

    def _failed(self, failure: Failure, request: Any) -> None:
        if request.over:
            if not failure.check(CancelledError):
                log.failure("Unhandled error processing request", failure)
            return
        if not failure.check(Exception):
            request.processingFailed(failure)
            return
        try:
            body = self._errors(request, failure)
        except Exception:
            request.processingFailed(Failure())
            return
        self._write(body, request)

    @staticmethod
    def _write(body: bytes | None, request: Any) -> None:
        if body is not None:
            request.write(body)
        if not request.over:
            request.finish()


def _unhandled(failure: Failure) -> None:
    log.failure("Unhandled error writing response", failure)

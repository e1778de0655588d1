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
The responder runs at once, inside ``render``, up to its first real wait; an
answer that never waits (most of them) is written without a Deferred, and
only one that does wait is handed to ``Deferred.fromCoroutine`` from there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Generator, Mapping
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
        responder = entry[1](request)
        # Run the responder here, up to its first real wait: most answers
        # (a hit read on this thread, a miss, an error) never wait, and then
        # need no Deferred, no cancellation hook and no callbacks at all.
        try:
            waiting = responder.send(None)
        except StopIteration as done:
            self._written(done.value, request)
            return NOT_DONE_YET
        except Exception:
            self._failed(Failure(), request)
            return NOT_DONE_YET
        rendering = Deferred.fromCoroutine(_resume(responder, waiting))
        # The client left: stop the responder where it waits (as Klein does).
        request.notifyFinish().addErrback(lambda _: rendering.cancel())
        rendering.addCallbacks(
            self._write, self._failed, callbackArgs=(request,), errbackArgs=(request,)
        )
        rendering.addErrback(_unhandled)
        return NOT_DONE_YET

    def _written(self, body: bytes | None, request: Any) -> None:
        """:meth:`_write`, for an answer that never waited (nothing else would log)."""
        try:
            self._write(body, request)
        except Exception:
            _unhandled(Failure())

    def _failed(self, failure: Failure, request: Any) -> None:
        try:
            self._answer_failure(failure, request)
        except Exception:
            _unhandled(Failure())

    def _answer_failure(self, failure: Failure, request: Any) -> None:
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


def _resume(responder: Coroutine[Any, Any, bytes], waiting: object) -> Generator[Any, Any, bytes]:
    """The rest of ``responder``, which already ran up to awaiting ``waiting``.

    A generator Twisted drives like the coroutine itself (``Deferred.fromCoroutine``
    accepts both): it waits for what the responder waits for, then hands the
    result (or the failure, a cancellation included) back to the responder.
    """
    while True:
        try:
            result = yield waiting
        except BaseException as error:  # the responder decides, cancellation included
            step: Callable[[], Any] = functools.partial(responder.throw, error)
        else:
            step = functools.partial(responder.send, result)
        try:
            waiting = step()
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def _unhandled(failure: Failure) -> None:
    log.failure("Unhandled error writing response", failure)

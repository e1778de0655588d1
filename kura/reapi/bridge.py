"""From a gRPC handler thread into the reactor, and back, with a deadline.

The gRPC server runs its handlers on its own threads (:mod:`kura.reapi.server`);
everything that touches the store, the authorizer or a metric runs on the
reactor thread. :meth:`ReactorBridge.call` hands a function to the reactor
with ``callFromThread`` and blocks the *handler* thread (never the reactor)
until the function's coroutine or Deferred fires, like
``twisted.internet.threads.blockingCallFromThread``, but bounded: past the
deadline the handler gets :class:`BridgeTimeout` (answered ``UNAVAILABLE``)
instead of hanging, and a result that arrives later is handed to
``abandon`` (to close a descriptor nobody will read).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

T = TypeVar("T")

#: The longest any one hop may take when the RPC carries no deadline.
DEFAULT_TIMEOUT_SECONDS = 300.0


class BridgeTimeout(Exception):
    """The reactor did not answer before the deadline (stopping, or overloaded)."""


class _Waiter(Generic[T]):
    def __init__(self, abandon: Callable[[T], None] | None) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._abandon = abandon
        self._given_up = False
        self.result: T | None = None
        self.failure: Failure | None = None

    def succeeded(self, result: T) -> None:
        with self._lock:
            late = self._given_up
            self.result = result
            self._done.set()
        if late and self._abandon is not None:
            self._abandon(result)

    def failed(self, failure: Failure) -> None:
        with self._lock:
            self.failure = failure
            self._done.set()

    def wait(self, timeout: float) -> bool:
        if self._done.wait(timeout):
            return True
        with self._lock:
            if self._done.is_set():
                return True
            self._given_up = True
            return False


class ReactorBridge:
    """Runs reactor-side work for handler threads (see the module docstring).

    Args:
        reactor: the reactor the node runs on.
    """

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self._reactor = reactor

    def call(
        self,
        f: Callable[[], Coroutine[Any, Any, T] | Deferred[T]],
        *,
        timeout: float | None = None,
        abandon: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``f()`` on the reactor thread and return what it fires with.

        Raises:
            BridgeTimeout: no answer within ``timeout`` seconds (default
                :data:`DEFAULT_TIMEOUT_SECONDS`).
            Exception: whatever ``f`` failed with.
        """
        waiter: _Waiter[T] = _Waiter(abandon)

        def start() -> None:
            try:
                d: Deferred[T] = ensureDeferred(f())
            except BaseException:
                waiter.failed(Failure())
                return
            d.addCallbacks(waiter.succeeded, waiter.failed)

        self._reactor.callFromThread(start)
        # No deadline is reported as a huge remaining time: cap every hop.
        limit = DEFAULT_TIMEOUT_SECONDS if timeout is None else timeout
        limit = min(max(0.0, limit), DEFAULT_TIMEOUT_SECONDS)
        if not waiter.wait(limit):
            raise BridgeTimeout("the node did not answer in time")
        if waiter.failure is not None:
            waiter.failure.raiseException()
        return waiter.result  # type: ignore[return-value]

    def post(self, f: Callable[[], None]) -> None:
        """Run ``f()`` on the reactor thread, without waiting (metrics)."""
        self._reactor.callFromThread(f)

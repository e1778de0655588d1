"""Where blocking disk work runs: a bounded thread pool, or inline in tests.

Both implement :class:`~kura.storage.interfaces.IBlockingRunner`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from kura.storage.interfaces import IBlockingRunner

P = ParamSpec("P")
T = TypeVar("T")


@implementer(IBlockingRunner)
class ThreadPoolRunner:
    """Runs work in a dedicated, bounded :class:`ThreadPool`.

    The pool is separate from the reactor's default pool so DNS lookups and
    disk work never queue behind each other.
    """

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self._reactor = reactor
        self.pool = pool

    def run(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)


@implementer(IBlockingRunner)
class ImmediateRunner:
    """Runs work synchronously on the calling thread (deterministic tests)."""

    def run(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        try:
            return succeed(f(*args, **kwargs))
        except BaseException:
            return fail(Failure())

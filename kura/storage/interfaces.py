"""The storage layer's seams, as zope interfaces.

``verifyObject`` tests keep the implementations honest: see
``tests/storage/test_storage_interfaces.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import Interface

P = ParamSpec("P")
T = TypeVar("T")


class IBlockingRunner(Interface):
    """Runs blocking work (file writes, fsync, SQLite) off the reactor thread.

    Implemented by :class:`kura.storage.runner.ThreadPoolRunner` (a bounded
    pool) and, for deterministic tests, by
    :class:`kura.storage.runner.ImmediateRunner` and
    :class:`kura.testing.ControlledRunner` (inline on the calling thread).
    """

    def run(f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Call ``f(*args, **kwargs)`` somewhere it may block; fire with its result.

        The Deferred fires on the reactor thread, with ``f``'s exception as
        a failure when it raises.
        """


class IReplicationTargets(Interface):
    """Where a write must be replicated, asked at write time.

    The store queues one outbox row per target in the transaction of the
    write itself. Implemented by the mesh's membership
    (:class:`kura.replication.membership.Membership`) and, for a store
    without peers, by :class:`kura.storage.store.StaticTargets`.
    """

    def targets() -> Sequence[str]:
        """The internal base URLs of the peers a write made now must reach."""

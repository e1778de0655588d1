"""Small Deferred helpers."""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


def shielded(work: Deferred[T]) -> Deferred[T]:
    """A Deferred that follows ``work`` but whose cancellation does not reach it.

    Klein cancels a handler when its client goes away. Durable work (a
    publish that may already be committing) must run to its end regardless,
    or its clean-up could unlink a file a committed manifest points to.
    """
    follower: Deferred[T] = Deferred()
    work.addCallbacks(follower.callback, follower.errback)
    return follower

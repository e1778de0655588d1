"""One timer for every accelerated connection's deadline.

A connection between requests must close after the keep-alive idle timeout,
and a head must arrive whole within the head deadline. Scheduling (and
cancelling) a timer per request would cost more than the rest of a small
response, so each connection only notes when its current deadline passes,
and one sweep, a few times per shortest deadline, acts on those that have.
The same sweep lets the handle cache drop descriptors of deleted files.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .handles import HandleCache

log = Logger(namespace="kura.accel")


class HasDeadline(Protocol):
    """A connection with at most one deadline at a time."""

    def check_deadline(self, now: float) -> None:
        """Act if the connection's deadline is ``now`` or earlier."""


def sweep_interval(header_timeout: float, idle_timeout: float) -> float:
    """A quarter of the shortest deadline (so it is late by at most a quarter), at most 1 s."""
    return min(1.0, min(header_timeout, idle_timeout) / 4)


class Sweeper:
    """Every ``interval`` seconds, checks every connection's deadline and sweeps the handles.

    Args:
        clock: the reactor's time.
        interval: seconds between sweeps (see :func:`sweep_interval`).
        connections: the live connections (read at every sweep).
        handles: the handle cache to sweep.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        connections: Collection[HasDeadline],
        handles: HandleCache,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._connections = connections
        self._handles = handles
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sweep(self) -> None:
        """Act on every connection whose deadline has passed; drop descriptors of deleted files."""
        self._handles.sweep()
        now = self._clock.seconds()
        for connection in list(self._connections):
            connection.check_deadline(now)

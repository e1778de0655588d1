"""A persistent client connection pool that does not log every connection it opens."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTCP
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietClientFactory(_HTTP11ClientFactory):
    # The pool's factory logs "Starting factory" for every new connection;
    # with several peer uploads in flight that drowns the real events.
    noisy = False


def quiet_pool(reactor: IReactorTCP, max_per_host: int) -> HTTPConnectionPool:
    """A persistent :class:`HTTPConnectionPool` keeping ``max_per_host`` connections per host.

    Twisted offers no public way to quiet the pool's connection factory;
    this module is the one place kura touches its private ``_factory``.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool._factory = _QuietClientFactory
    return pool

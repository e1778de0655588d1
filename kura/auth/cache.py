"""A bounded TTL cache with single flight, on an injected clock.

:meth:`ResultCache.resolve` returns a cached value or computes it. While one
caller (the *leader*) computes a key, concurrent callers for the same key
(*followers*) wait for it instead of computing again: a burst of requests
carrying the same token makes one call to the authentication backend.

Followers reuse the leader's value only when it is cacheable (TTL above 0):
the key covers the credentials, not the whole request, so a value the hook
declared uncacheable may depend on the rest of the request. When the
leader's value is not reusable, or its computation failed, each follower
computes for itself; when the leader was cancelled (its client went away),
followers start over and one of them leads.

Capacity: at most ``max_entries`` live entries. Expired entries are dropped
as new ones are stored (a heap ordered by expiry makes that cheap); when the
cache is still full the new value is not cached (``rejected``).

Time is read only from the injected ``IReactorTime``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")

#: Lookup outcomes, as counted in ``kura_extension_cache_lookups``.
HIT, MISS, COALESCED, REJECTED = "hit", "miss", "coalesced", "rejected"


@attrs.frozen
class _Rerun:
    """The leader's value is not for sharing; compute your own."""


@attrs.frozen
class _Restart:
    """The leader gave up (cancelled); look again and maybe lead."""


_RERUN = _Rerun()
_RESTART = _Restart()


@attrs.frozen
class _Entry(Generic[T]):
    value: T
    expires_at: float


class _Flight(Generic[T]):
    """Followers waiting for one leader."""

    def __init__(self) -> None:
        self._waiters: list[Deferred[T | _Rerun | _Restart]] = []

    def wait(self) -> Deferred[T | _Rerun | _Restart]:
        waiter: Deferred[T | _Rerun | _Restart] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def publish(self, outcome: T | _Rerun | _Restart) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # a cancelled follower has already fired
                waiter.callback(outcome)


class ResultCache(Generic[T]):
    """See the module docstring.

    Args:
        clock: where time comes from.
        max_entries: the most live entries held (at least 1).
        record: called with ``hit``/``miss``/``coalesced``/``rejected`` for
            every lookup outcome (metrics).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        max_entries: int,
        record: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max_entries = max_entries
        self._record = record
        self._entries: dict[str, _Entry[T]] = {}
        self._expiries: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()
        self._flights: dict[str, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> int:
        """Drop every entry (memory pressure); return how many there were.

        Computations in flight carry on and may store their values later.
        """
        count = len(self._entries)
        self._entries.clear()
        self._expiries.clear()
        return count

    def get(self, key: str) -> T | None:
        """The live value for ``key``, or ``None`` (no metrics recorded)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock.seconds():
            del self._entries[key]
            return None
        return entry.value

    async def resolve(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        ttl_of: Callable[[T], float],
        *,
        wider: str | None = None,
        stored_under: Callable[[T], str] | None = None,
    ) -> T:
        """The cached value for ``key``, or the result of ``compute()``.

        Args:
            key: the cache key.
            compute: produces a value; may raise (nothing is cached then).
            ttl_of: seconds a computed value stays cached; ``0`` (or less)
                means "do not cache, do not share".
            wider: a second key whose cached value answers this lookup too
                (a result that applies to more than ``key``), looked up first.
            stored_under: where a computed value is cached (``key`` or
                ``wider``); ``key`` when not given.

        Raises:
            Whatever ``compute`` raises.
        """
        while True:
            cached = self.get(wider) if wider is not None else None
            if cached is None:
                cached = self.get(key)
            if cached is not None:
                self._record(HIT)
                return cached
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, compute, ttl_of, stored_under)
            outcome = await flight.wait()
            if isinstance(outcome, _Restart):
                continue
            if isinstance(outcome, _Rerun):
                self._record(MISS)
                return await compute()
            self._record(COALESCED)
            return outcome

    async def _lead(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        ttl_of: Callable[[T], float],
        stored_under: Callable[[T], str] | None,
    ) -> T:
        self._record(MISS)
        flight: _Flight[T] = _Flight()
        self._flights[key] = flight
        try:
            value = await compute()
        except CancelledError:
            self._land(key, flight, _RESTART)
            raise
        except BaseException:
            self._land(key, flight, _RERUN)
            raise
        ttl = ttl_of(value)
        if ttl > 0:
            self._store(key if stored_under is None else stored_under(value), value, ttl)
            self._land(key, flight, value)
        else:
            self._land(key, flight, _RERUN)
        return value

    def _land(self, key: str, flight: _Flight[T], outcome: T | _Rerun | _Restart) -> None:
        # Leave the table first: a follower that starts over must be able to
        # lead, not find this finished flight again.
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.publish(outcome)

    def _store(self, key: str, value: T, ttl: float) -> None:
        now = self._clock.seconds()
        self._drop_expired(now)
        if key not in self._entries and len(self._entries) >= self._max_entries:
            self._record(REJECTED)
            return
        expires_at = now + ttl
        self._entries[key] = _Entry(value, expires_at)
        heapq.heappush(self._expiries, (expires_at, next(self._sequence), key))

    def _drop_expired(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expires_at, _, key = heapq.heappop(expiries)
            entry = self._entries.get(key)
            # A key stored again since has a later expiry of its own.
            if entry is not None and entry.expires_at == expires_at:
                del self._entries[key]

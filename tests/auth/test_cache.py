"""The TTL cache with single flight, on a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from kura.auth.cache import ResultCache
from kura.testing import failed, succeeded


class Computation:
    """A compute function whose calls the test finishes by hand."""

    def __init__(self) -> None:
        self.pending: list[Deferred[str]] = []

    async def __call__(self) -> str:
        waiting: Deferred[str] = Deferred()
        self.pending.append(waiting)
        return await waiting


def make(clock: Clock, max_entries: int = 10) -> tuple[ResultCache[str], list[str]]:
    outcomes: list[str] = []
    return ResultCache(clock=clock, max_entries=max_entries, record=outcomes.append), outcomes


def resolve(
    cache: ResultCache[str], key: str, compute: Callable[[], Any], ttl: float = 10
) -> Deferred[str]:
    return Deferred.fromCoroutine(cache.resolve(key, compute, lambda value: ttl))


def value(result: str) -> Callable[[], Any]:
    async def compute() -> str:
        return result

    return compute


def test_values_expire_after_their_ttl(clock: Clock) -> None:
    """A cached value is served until its TTL passes on the injected clock, then recomputed."""
    cache, outcomes = make(clock)
    assert succeeded(resolve(cache, "k", value("first"))) == "first"
    clock.advance(9.9)
    assert succeeded(resolve(cache, "k", value("second"))) == "first"
    clock.advance(0.1)
    assert succeeded(resolve(cache, "k", value("third"))) == "third"
    assert outcomes == ["miss", "hit", "miss"]


def test_zero_ttl_is_not_cached(clock: Clock) -> None:
    """A value with TTL 0 is computed afresh every time."""
    cache, outcomes = make(clock)
    assert succeeded(resolve(cache, "k", value("a"), ttl=0)) == "a"
    assert succeeded(resolve(cache, "k", value("b"), ttl=0)) == "b"
    assert len(cache) == 0
    assert outcomes == ["miss", "miss"]


def test_capacity_drops_expired_entries_first_then_rejects(clock: Clock) -> None:
    """A full cache makes room from expired entries; without any, the new value is not cached."""
    cache, outcomes = make(clock, max_entries=2)
    succeeded(resolve(cache, "short", value("s"), ttl=1))
    succeeded(resolve(cache, "long", value("l"), ttl=100))
    clock.advance(2)
    succeeded(resolve(cache, "new", value("n"), ttl=100))
    assert len(cache) == 2 and cache.get("new") == "n" and cache.get("short") is None
    succeeded(resolve(cache, "extra", value("x"), ttl=100))
    assert outcomes[-1] == "rejected"
    assert cache.get("extra") is None
    assert len(cache) == 2


def test_clear_drops_everything(clock: Clock) -> None:
    """clear() empties the cache and reports how many entries it held."""
    cache, _ = make(clock)
    succeeded(resolve(cache, "a", value("1")))
    succeeded(resolve(cache, "b", value("2")))
    assert cache.clear() == 2
    assert cache.get("a") is None


def test_concurrent_misses_compute_once(clock: Clock) -> None:
    """Followers of a pending key wait for the leader and reuse its cacheable value."""
    cache, outcomes = make(clock)
    compute = Computation()
    first = resolve(cache, "k", compute)
    second = resolve(cache, "k", compute)
    third = resolve(cache, "k", compute)
    assert len(compute.pending) == 1
    compute.pending[0].callback("shared")
    assert [succeeded(d) for d in (first, second, third)] == ["shared"] * 3
    assert outcomes == ["miss", "coalesced", "coalesced"]


def test_followers_recompute_when_the_value_is_not_cacheable(clock: Clock) -> None:
    """With TTL 0 each follower runs its own computation instead of sharing the leader's."""
    cache, outcomes = make(clock)
    compute = Computation()
    first = resolve(cache, "k", compute, ttl=0)
    second = resolve(cache, "k", compute, ttl=0)
    compute.pending[0].callback("leader")
    assert succeeded(first) == "leader"
    assert not second.called and len(compute.pending) == 2
    compute.pending[1].callback("follower")
    assert succeeded(second) == "follower"
    assert outcomes == ["miss", "miss"]


def test_followers_recompute_after_a_failure_and_nothing_is_cached(clock: Clock) -> None:
    """A failed leader fails alone; followers compute for themselves."""
    cache, _ = make(clock)
    compute = Computation()
    first = resolve(cache, "k", compute)
    second = resolve(cache, "k", compute)
    compute.pending[0].errback(RuntimeError("backend down"))
    assert isinstance(failed(first), RuntimeError)
    compute.pending[1].callback("recovered")
    assert succeeded(second) == "recovered"


def test_a_cancelled_leader_hands_over_to_a_follower(clock: Clock) -> None:
    """When the leader's caller goes away, a follower takes the lead and others wait for it."""
    cache, outcomes = make(clock)
    compute = Computation()
    leader = resolve(cache, "k", compute)
    second = resolve(cache, "k", compute)
    third = resolve(cache, "k", compute)
    leader.cancel()
    assert isinstance(failed(leader), CancelledError)
    assert len(compute.pending) == 2
    compute.pending[1].callback("v")
    assert succeeded(second) == "v" and succeeded(third) == "v"
    assert outcomes == ["miss", "miss", "coalesced"]


def test_a_cancelled_follower_does_not_disturb_the_flight(clock: Clock) -> None:
    """Cancelling one waiting follower leaves the leader and other followers unaffected."""
    cache, _ = make(clock)
    compute = Computation()
    leader = resolve(cache, "k", compute)
    follower = resolve(cache, "k", compute)
    other = resolve(cache, "k", compute)
    follower.cancel()
    assert isinstance(failed(follower), CancelledError)
    compute.pending[0].callback("v")
    assert succeeded(leader) == "v" and succeeded(other) == "v"


def test_distinct_keys_do_not_coalesce(clock: Clock) -> None:
    """Single flight is per key."""
    cache, _ = make(clock)
    compute = Computation()
    resolve(cache, "a", compute)
    resolve(cache, "b", compute)
    assert len(compute.pending) == 2


def test_capacity_must_be_positive(clock: Clock) -> None:
    """A cache without room is a programming error."""
    with pytest.raises(ValueError):
        ResultCache(clock=clock, max_entries=0)

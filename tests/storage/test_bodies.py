"""The cache of bodies kept in the metadata database: bounded, and never stale."""

from __future__ import annotations

from kura.domain.artifacts import Manifest
from kura.storage.bodies import BodyCache


def manifest(artifact_id: str, version_ms: int = 1, namespace_id: str = "default") -> Manifest:
    return Manifest(
        artifact_id=artifact_id,
        producer="xcode",
        namespace_id=namespace_id,
        key=artifact_id,
        content_type="application/octet-stream",
        inline=False,
        blob_path=None,
        size=4,
        version_ms=version_ms,
        created_at_ms=version_ms,
    )


def test_a_body_answers_only_for_the_version_it_was_held_for() -> None:
    cache = BodyCache(1024)
    cache.put(manifest("a", version_ms=1), b"old!")
    assert cache.get(manifest("a", version_ms=1)) == b"old!"
    assert cache.get(manifest("a", version_ms=2)) is None
    cache.put(manifest("a", version_ms=2), b"new!")
    assert cache.get(manifest("a", version_ms=1)) is None
    assert cache.get(manifest("a", version_ms=2)) == b"new!"
    assert (len(cache), cache.used_bytes) == (1, 4)


def test_the_least_recently_used_bodies_leave_first_to_stay_within_the_bound() -> None:
    cache = BodyCache(8)
    cache.put(manifest("a"), b"aaaa")
    cache.put(manifest("b"), b"bbbb")
    assert cache.get(manifest("a")) == b"aaaa"  # now b is the oldest
    cache.put(manifest("c"), b"cccc")
    assert cache.get(manifest("b")) is None
    assert cache.get(manifest("a")) == b"aaaa"
    assert cache.get(manifest("c")) == b"cccc"
    assert cache.used_bytes == 8


def test_a_body_larger_than_the_whole_cache_is_not_held() -> None:
    cache = BodyCache(3)
    cache.put(manifest("a"), b"aaaa")
    assert cache.get(manifest("a")) is None
    assert (len(cache), cache.used_bytes) == (0, 0)
    assert BodyCache(0).get(manifest("a")) is None


def test_discard_and_clear_give_the_memory_back() -> None:
    cache = BodyCache(1024)
    cache.put(manifest("a"), b"aaaa")
    cache.put(manifest("b"), b"bb")
    cache.discard("a")
    cache.discard("unknown")
    assert (len(cache), cache.used_bytes) == (1, 2)
    assert cache.clear() == 1
    assert (len(cache), cache.used_bytes) == (0, 0)
    assert cache.get(manifest("b")) is None


def test_a_cleaned_namespace_takes_its_bodies_and_no_others() -> None:
    cache = BodyCache(1024)
    cache.put(manifest("a", namespace_id="one"), b"aaaa")
    cache.put(manifest("b", namespace_id="two"), b"bb")
    cache.discard_namespace("one")
    assert cache.get(manifest("a", namespace_id="one")) is None
    assert cache.get(manifest("b", namespace_id="two")) == b"bb"
    assert cache.used_bytes == 2

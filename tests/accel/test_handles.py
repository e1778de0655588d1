"""The accelerator's cache of open small-artifact descriptors (kura.accel.handles)."""

from __future__ import annotations

import os
import pathlib
from types import SimpleNamespace
from typing import Any

import pytest

from kura.accel import handles as handles_module
from kura.accel.handles import CACHED_FILE_MAX_BYTES, HandleCache
from kura.storage.runner import ImmediateRunner
from kura.storage.verify import BodyVerifier, sha256_of, stamp_of
from tests.support.descriptors import is_open


class FilesStore:
    """Stands in for ArtifactStore.open_body (opens ``manifest.path``, counting opens)
    and its verifier."""

    def __init__(self) -> None:
        self.opens = 0
        self.verifier = BodyVerifier(ImmediateRunner())

    def open_body(self, manifest: Any) -> int:
        self.opens += 1
        return os.open(manifest.path, os.O_RDONLY | os.O_CLOEXEC)


def artifact(directory: pathlib.Path, name: str, content: bytes, digest: str | None = None) -> Any:
    path = directory / name
    path.write_bytes(content)
    return SimpleNamespace(
        artifact_id=name, blob_path=name, path=str(path), size=len(content), digest=digest
    )


def read(fd: int, size: int = 1 << 21) -> bytes:
    return os.pread(fd, size, 0)


@pytest.fixture
def store() -> FilesStore:
    return FilesStore()


def test_a_small_file_is_opened_once_and_reused(tmp_path: pathlib.Path, store: FilesStore) -> None:
    cache = HandleCache(store, capacity=8)  # type: ignore[arg-type]
    a = artifact(tmp_path, "a", b"alpha")
    first = cache.borrow(a)
    second = cache.borrow(a)  # concurrent transfers share the descriptor
    assert (first.fd, first.size, store.opens) == (second.fd, 5, 1)
    cache.release(first)
    cache.release(second)
    third = cache.borrow(a)
    assert (third.fd, store.opens, read(third.fd)) == (first.fd, 1, b"alpha")
    cache.release(third)
    assert len(cache) == 1 and is_open(first.fd)


def test_a_new_version_is_a_new_file_and_never_served_from_the_old_descriptor(
    tmp_path: pathlib.Path, store: FilesStore
) -> None:
    cache = HandleCache(store, capacity=8)  # type: ignore[arg-type]
    v1 = artifact(tmp_path, "a-1", b"same")
    cache.release(cache.borrow(v1))
    v2 = SimpleNamespace(
        artifact_id="a", blob_path="a-2", path=str(tmp_path / "a-2"), size=2, digest=None
    )
    (tmp_path / "a-2").write_bytes(b"SAME")  # same size, other bytes, old file still linked
    lease = cache.borrow(v2)
    assert read(lease.fd) == b"SAME"
    cache.release(lease)


def test_a_replaced_file_is_reopened_and_the_old_one_closed_after_its_transfer(
    tmp_path: pathlib.Path, store: FilesStore
) -> None:
    cache = HandleCache(store, capacity=8)  # type: ignore[arg-type]
    a = artifact(tmp_path, "a", b"old")
    in_flight = cache.borrow(a)
    replacement = tmp_path / "a.new"
    replacement.write_bytes(b"newer")
    os.rename(replacement, a.path)  # as a publish does
    fresh = cache.borrow(a)
    assert (read(fresh.fd), fresh.size, store.opens) == (b"newer", 5, 2)
    assert read(in_flight.fd) == b"old"  # the transfer under way keeps its version
    cache.release(in_flight)
    assert not is_open(in_flight.fd)
    cache.release(fresh)
    assert is_open(fresh.fd)


def test_sweep_lets_go_of_deleted_files(tmp_path: pathlib.Path, store: FilesStore) -> None:
    cache = HandleCache(store, capacity=8)  # type: ignore[arg-type]
    a, b = artifact(tmp_path, "a", b"a"), artifact(tmp_path, "b", b"b")
    for manifest in (a, b):
        cache.release(cache.borrow(manifest))
    held = cache.borrow(a)
    os.unlink(a.path)
    cache.sweep()
    assert len(cache) == 1  # b stays
    assert is_open(held.fd)  # still being sent
    cache.release(held)
    assert not is_open(held.fd)
    with pytest.raises(FileNotFoundError):
        cache.borrow(a)


def test_large_files_are_not_kept_open(tmp_path: pathlib.Path, store: FilesStore) -> None:
    cache = HandleCache(store, capacity=8)  # type: ignore[arg-type]
    big = artifact(tmp_path, "big", b"x" * (CACHED_FILE_MAX_BYTES + 1))
    lease = cache.borrow(big)
    assert len(cache) == 0
    cache.release(lease)
    assert not is_open(lease.fd)


def test_least_recently_used_entries_are_evicted(tmp_path: pathlib.Path, store: FilesStore) -> None:
    cache = HandleCache(store, capacity=2)  # type: ignore[arg-type]
    a, b, c = (artifact(tmp_path, name, name.encode()) for name in "abc")
    busy = cache.borrow(a)
    cache.release(cache.borrow(b))
    cache.release(cache.borrow(a))  # a is now the most recent, b the least
    cache.release(cache.borrow(c))
    assert len(cache) == 2
    cache.release(cache.borrow(a))
    assert store.opens == 3  # a stayed; b was evicted
    cache.release(busy)
    assert is_open(busy.fd)


def test_eviction_of_a_descriptor_in_use_waits_for_its_transfer(
    tmp_path: pathlib.Path, store: FilesStore
) -> None:
    cache = HandleCache(store, capacity=1)  # type: ignore[arg-type]
    a, b = artifact(tmp_path, "a", b"a"), artifact(tmp_path, "b", b"b")
    busy = cache.borrow(a)
    cache.release(cache.borrow(b))  # evicts a while it is being sent
    assert is_open(busy.fd) and read(busy.fd) == b"a"
    cache.release(busy)
    assert not is_open(busy.fd)


def test_capacity_zero_disables_the_cache(tmp_path: pathlib.Path, store: FilesStore) -> None:
    cache = HandleCache(store, capacity=0)  # type: ignore[arg-type]
    lease = cache.borrow(artifact(tmp_path, "a", b"a"))
    cache.release(lease)
    assert len(cache) == 0 and not is_open(lease.fd)


def test_the_cache_follows_a_lowered_descriptor_limit(
    tmp_path: pathlib.Path, store: FilesStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = HandleCache(store)  # type: ignore[arg-type]
    for name in "abcd":
        cache.release(cache.borrow(artifact(tmp_path, name, b"x")))
    assert len(cache) == 4
    monkeypatch.setattr(handles_module, "default_capacity", lambda: 1)
    cache.sweep()
    assert (cache.capacity, len(cache)) == (1, 1)


def test_default_capacity_is_a_sixteenth_of_the_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handles_module.resource, "getrlimit", lambda kind: (256, 256))
    assert handles_module.default_capacity() == 16
    monkeypatch.setattr(handles_module.resource, "getrlimit", lambda kind: (1 << 20, 1 << 20))
    assert handles_module.default_capacity() == handles_module.MAX_ENTRIES


def test_a_lease_says_whether_the_file_is_verified_in_its_current_state(
    tmp_path: pathlib.Path, store: FilesStore
) -> None:
    """Verified means: remembered in exactly this state; any change (a write) undoes it,
    and a manifest without a digest has nothing to check."""
    cache = HandleCache(store, capacity=8)  # type: ignore[arg-type]
    a = artifact(tmp_path, "a", b"alpha", digest=sha256_of(b"alpha"))
    lease = cache.borrow(a)
    assert not lease.verified
    store.verifier.remember("a", stamp_of(os.fstat(lease.fd)))
    cache.release(lease)
    lease = cache.borrow(a)  # the cached descriptor, fstat again
    assert lease.verified
    cache.release(lease)
    with open(a.path, "r+b") as handle:
        handle.write(b"A")
    os.utime(a.path, ns=(0, 0))  # a new mtime and ctime, whatever the clock's granularity
    lease = cache.borrow(a)
    assert not lease.verified
    cache.release(lease)
    b = artifact(tmp_path, "b", b"beta")
    lease = cache.borrow(b)
    assert lease.verified
    cache.release(lease)

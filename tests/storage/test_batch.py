"""Small bodies written in place in batches: durable, all-or-nothing per body, and
carried by the hop that commits their manifests (one hop per batch)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from kura.domain.artifacts import ArtifactAddress, Manifest, Producer
from kura.domain.errors import DigestMismatch, StorageFault
from kura.domain.failpoints import Failpoints
from kura.storage.batch import MAX_BATCH, write_batch
from kura.storage.layout import Layout
from kura.storage.metadata import WritePolicy
from kura.storage.staging import StagedBody, TmpBudget
from kura.storage.store import ArtifactStore, PublishResult
from kura.testing import succeeded


class HeldRunner:
    """Keeps every blocking call until the test releases it (one thread hop each)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def release(self, index: int = 0) -> None:
        f, args, d = self.calls.pop(index)
        try:
            d.callback(f(*args))
        except BaseException:
            d.errback(Failure())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_batch_writes_every_body_in_place(tmp_path: Path) -> None:
    """Each body lands byte-exact at its path, hashed on the way; missing directories are made."""
    items = [(str(tmp_path / "blobs" / "ab" / f"f{n}"), b"x" * n) for n in range(3)]
    assert write_batch(items, Failpoints()) == [sha(data) for _, data in items]
    for path, data in items:
        assert Path(path).read_bytes() == data


def test_every_file_and_each_directory_once_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three files in two directories: five fsyncs, one per file and one per directory."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for sub in ("ab", "cd"):
        (tmp_path / sub).mkdir()
    items = [
        (str(tmp_path / sub / name), b"b") for sub, name in [("ab", "1"), ("ab", "2"), ("cd", "3")]
    ]
    write_batch(items, Failpoints())
    expected = [path for path, _ in items] + [str(tmp_path / "ab"), str(tmp_path / "cd")]
    assert sorted(synced) == sorted(expected)


def failing_fsync_of(monkeypatch: pytest.MonkeyPatch, doomed: str) -> None:
    """Make fsync fail with EIO for the file or directory at ``doomed``."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == doomed:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_file_fsync_fails_that_body_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [(str(tmp_path / name), b"x") for name in ("a", "b", "c")]
    failing_fsync_of(monkeypatch, items[1][0])
    errors = write_batch(items, Failpoints())
    assert errors[0] == errors[2] == sha(b"x")
    assert isinstance(errors[1], OSError) and errors[1].errno == errno.EIO
    assert sorted(os.listdir(tmp_path)) == ["a", "c"]


def test_a_failed_directory_fsync_fails_every_body_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for sub in ("ab", "cd"):
        (tmp_path / sub).mkdir()
    items = [(str(tmp_path / "ab" / "1"), b"x"), (str(tmp_path / "cd" / "2"), b"y")]
    failing_fsync_of(monkeypatch, str(tmp_path / "cd"))
    errors = write_batch(items, Failpoints())
    assert errors[0] == sha(b"x")
    assert isinstance(errors[1], OSError) and errors[1].errno == errno.EIO
    assert os.listdir(tmp_path / "ab") == ["1"]
    assert os.listdir(tmp_path / "cd") == []


def test_one_failing_body_leaves_the_others_and_what_was_there(tmp_path: Path) -> None:
    """A name that exists already fails that body alone, and the existing file is kept."""
    taken = tmp_path / "taken"
    taken.write_bytes(b"someone else's")
    items = [(str(tmp_path / "a"), b"a"), (str(taken), b"mine"), (str(tmp_path / "b"), b"b")]
    errors = write_batch(items, Failpoints())
    assert (errors[0], errors[2]) == (sha(b"a"), sha(b"b"))
    assert isinstance(errors[1], OSError) and errors[1].errno == errno.EEXIST
    assert taken.read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "taken"]


@pytest.mark.parametrize("point", ["before_fsync", "after_bytes_durable_before_metadata"])
def test_a_fault_at_either_step_leaves_no_file(tmp_path: Path, point: str) -> None:
    """A failpoint fails the whole batch and removes every file it made."""
    items = [(str(tmp_path / "d" / f"f{n}"), b"x") for n in range(3)]
    with pytest.raises(StorageFault):
        write_batch(items, Failpoints([(point, "error")]))
    assert os.listdir(tmp_path / "d") == []


class Started:
    """An :class:`ArtifactStore` on a :class:`HeldRunner`, opened."""

    def __init__(self, tmp_path: Path, failpoints: Failpoints | None = None) -> None:
        self.runner = HeldRunner()
        self.layout = Layout(str(tmp_path / "data"), str(tmp_path / "tmp"))
        self.store = ArtifactStore(
            layout=self.layout,
            runner=self.runner,  # type: ignore[arg-type]
            clock=MemoryReactorClock(),
            node_tenant="default",
            capacity_bytes=1 << 30,
            tmp_budget=TmpBudget(1 << 30),
            manifest_cache_bytes=1 << 20,
            max_unfinished_uploads=10,
            failpoints=failpoints,
        )
        started = Deferred.fromCoroutine(self.store.start())
        while self.runner.calls:
            self.runner.release()
        succeeded(started)

    def publish(
        self, key: str, data: bytes, expected: str | None = None
    ) -> Deferred[PublishResult]:
        """Publish ``data`` as received in memory (no staging file)."""
        staged = StagedBody(path="", size=len(data), reserved=0, sha256=None, data=data)
        return Deferred.fromCoroutine(
            self.store.publish_blob(
                ArtifactAddress(Producer.GRADLE, "ns", key),
                staged,
                content_type="application/octet-stream",
                policy=WritePolicy.LAST_WRITER_WINS,
                expected_digest=expected,
            )
        )

    def hops(self) -> list[str]:
        return [getattr(f, "__name__", repr(f)) for f, _, _ in self.runner.calls]

    def bodies_in(self, index: int = 0) -> int:
        """How many small bodies the held hop ``index`` writes."""
        _, args, _ = self.runner.calls[index]
        return len(args[0]) if self.hops()[index] == "_write_and_commit" else 0

    def manifest(self, key: str) -> Manifest | None:
        address = ArtifactAddress(Producer.GRADLE, "ns", key)
        return self.store.cached_manifest(self.store.artifact_id(address))


def blobs(layout: Layout) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), layout.data_dir)
        for root, _, names in os.walk(layout.blobs)
        for name in names
    )


def test_one_hop_writes_a_small_body_and_commits_its_manifest(tmp_path: Path) -> None:
    """No second hop and no reactor round trip between the durable body and its manifest."""
    node = Started(tmp_path)
    done = node.publish("k", b"body")
    assert node.hops() == ["_write_and_commit"]
    node.runner.release()
    assert node.runner.calls == []
    manifest = succeeded(done).manifest
    assert manifest.digest == sha(b"body") and manifest.blob_path is not None
    assert Path(node.layout.absolute(manifest.blob_path)).read_bytes() == b"body"
    assert node.manifest("k") == manifest


def test_bodies_arriving_during_a_commit_share_the_next_hop(tmp_path: Path) -> None:
    """One commit on the disk at a time: the next carries every body queued meanwhile."""
    node = Started(tmp_path)
    first = node.publish("aa01", b"0")
    rest = [node.publish(f"k{n}", b"%d" % n) for n in range(1, 5)]
    assert node.hops() == ["_write_and_commit"] and node.bodies_in() == 1
    node.runner.release()
    assert succeeded(first).manifest.digest == sha(b"0")
    assert node.hops() == ["_write_and_commit"] and node.bodies_in() == 4
    node.runner.release()
    manifests = [succeeded(d).manifest for d in rest]
    assert node.runner.calls == []
    assert len(blobs(node.layout)) == 5
    for n, manifest in enumerate(manifests, start=1):
        assert manifest.blob_path is not None
        assert Path(node.layout.absolute(manifest.blob_path)).read_bytes() == b"%d" % n


def test_a_batch_shares_one_shard_directory(tmp_path: Path) -> None:
    """Every body of a batch goes into its first body's shard: one directory fsync."""
    node = Started(tmp_path)
    node.publish("held", b"held")
    done = [node.publish(key, b"x") for key in ("bb1", "cc2", "dd3")]
    node.runner.release()
    node.runner.release()
    paths = [succeeded(d).manifest.blob_path for d in done]
    assert len({os.path.dirname(p or "") for p in paths}) == 1


def test_a_hop_writes_at_most_max_batch_bodies(tmp_path: Path) -> None:
    """Bodies over the cap (and what was queued after them) wait for the next hop."""
    node = Started(tmp_path)
    node.publish("held", b"held")
    done = [node.publish(f"k{n}", b"x") for n in range(MAX_BATCH + 3)]
    node.runner.release()
    assert node.bodies_in() == MAX_BATCH
    node.runner.release()
    assert node.bodies_in() == 3
    node.runner.release()
    assert node.runner.calls == []
    assert len({succeeded(d).manifest.blob_path for d in done}) == MAX_BATCH + 3


def test_a_failed_batch_fails_each_of_its_writes_and_leaves_no_file(tmp_path: Path) -> None:
    """A fault in the batch fails every body of it; the commit queue goes on."""
    node = Started(tmp_path, Failpoints([("before_fsync", "error")]))
    done = [node.publish(f"k{n}", b"x") for n in range(3)]
    node.runner.release()  # [k0]
    node.runner.release()  # [k1, k2], queued meanwhile
    while node.runner.calls:  # the unlinks of what failed (nothing left to remove)
        node.runner.release()
    for d in done:
        failures: list[Failure] = []
        d.addErrback(failures.append)
        assert failures and failures[0].check(StorageFault)
    assert blobs(node.layout) == []
    assert node.manifest("k0") is None


def test_a_body_that_does_not_match_its_digest_is_refused_and_removed(tmp_path: Path) -> None:
    """The digest is checked in the transaction; the written file goes, nothing is published."""
    node = Started(tmp_path)
    wrong = node.publish("k", b"body", expected=sha(b"other"))
    right = node.publish("k2", b"body", expected=sha(b"body"))
    node.runner.release()  # k, alone
    node.runner.release()  # k2 (queued meanwhile)
    while node.runner.calls:  # the unlink of the refused body
        node.runner.release()
    failures: list[Failure] = []
    wrong.addErrback(failures.append)
    assert failures and failures[0].check(DigestMismatch)
    assert node.manifest("k") is None
    manifest = succeeded(right).manifest
    assert blobs(node.layout) == [manifest.blob_path]

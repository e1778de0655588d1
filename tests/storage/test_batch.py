"""Small bodies written in place in batches: durable, all-or-nothing per body, shared hops."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from kura.domain.errors import StorageFault
from kura.domain.failpoints import Failpoints
from kura.storage.batch import BlobBatcher, write_batch
from kura.storage.layout import Layout
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


def batcher_in(tmp_path: Path, runner: Any, **options: Any) -> tuple[BlobBatcher, Layout]:
    layout = Layout(str(tmp_path / "data"), str(tmp_path / "tmp"))
    return BlobBatcher(layout, runner, options.pop("failpoints", Failpoints()), **options), layout


def blobs(layout: Layout) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), layout.data_dir)
        for root, _, names in os.walk(layout.blobs)
        for name in names
    )


def test_bodies_arriving_during_a_batch_share_the_next_hop(tmp_path: Path) -> None:
    """One batch on the disk at a time: the next carries everything queued meanwhile."""
    runner = HeldRunner()
    batcher, layout = batcher_in(tmp_path, runner, max_batch=64, max_in_flight=1)
    first = batcher.write("aa01", b"0")
    rest = [batcher.write(f"{n}{n}02", b"%d" % n) for n in range(1, 5)]
    assert len(runner.calls) == 1
    runner.release()
    first_path, first_digest = succeeded(first)
    assert first_path.startswith("blobs/aa/aa01-") and first_digest == sha(b"0")
    assert len(runner.calls) == 1 and len(runner.calls[0][1][0]) == 4
    runner.release()
    paths = [succeeded(d)[0] for d in rest]
    assert runner.calls == []
    assert blobs(layout) == sorted([first_path, *paths])
    for n, path in enumerate(paths, start=1):
        assert Path(layout.absolute(path)).read_bytes() == b"%d" % n


def test_a_batch_shares_one_shard_directory(tmp_path: Path) -> None:
    """Every body of a batch goes into its first body's shard: one directory fsync."""
    runner = HeldRunner()
    batcher, _ = batcher_in(tmp_path, runner, max_in_flight=1)
    batcher.write("aa", b"held")
    done = [batcher.write(artifact_id, b"x") for artifact_id in ("bb1", "cc2", "dd3")]
    runner.release()
    runner.release()
    paths = [succeeded(d)[0] for d in done]
    assert {os.path.dirname(p) for p in paths} == {"blobs/bb"}
    assert [os.path.basename(p).split("-")[0] for p in paths] == ["bb1", "cc2", "dd3"]


def test_batches_are_capped_and_run_side_by_side(tmp_path: Path) -> None:
    """Up to ``max_in_flight`` batches at once, each of at most ``max_batch`` bodies."""
    runner = HeldRunner()
    batcher, layout = batcher_in(tmp_path, runner, max_batch=2, max_in_flight=2)
    done = [batcher.write(f"id{n}", b"x") for n in range(5)]
    assert [len(call[1][0]) for call in runner.calls] == [1, 1]
    runner.release(1)
    assert [len(call[1][0]) for call in runner.calls] == [1, 2]
    runner.release()
    assert [len(call[1][0]) for call in runner.calls] == [2, 1]
    while runner.calls:
        runner.release()
    assert len({succeeded(d) for d in done}) == 5
    assert len(blobs(layout)) == 5


def test_a_failed_batch_fails_each_of_its_writes(tmp_path: Path) -> None:
    """A fault fails every write of its batch, leaves no file, and the next batch runs."""
    runner = HeldRunner()
    batcher, layout = batcher_in(
        tmp_path, runner, failpoints=Failpoints([("before_fsync", "error")]), max_in_flight=1
    )
    done = [batcher.write(f"id{n}", b"x") for n in range(3)]
    runner.release()  # [0]
    runner.release()  # [1, 2], queued meanwhile
    for d in done:
        failures: list[Failure] = []
        d.addErrback(failures.append)
        assert failures and failures[0].check(StorageFault)
    assert blobs(layout) == []
    batcher.write("later", b"y")  # the batcher is free for the next write
    assert len(runner.calls) == 1

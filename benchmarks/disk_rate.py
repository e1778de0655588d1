"""How many small durable writes per second the disk itself allows.

The reference for kura's PUT rows (``small_artifacts.py``): what the
filesystem of the node's data directory does when nothing but the
durability steps run, so a PUT rate can be read as a fraction of it.

Variants (4 KiB bodies unless ``--size``; each runs ``--seconds``):

* ``file+rename, N threads`` (**the reference**): every thread loops over
  write a fresh file, fsync it, rename it into one of 256 shard directories,
  fsync that directory; N = 8 by default, the PUT rows' concurrency;
* ``batch of B, one thread``: B files written in place, then each fsynced,
  then each distinct directory fsynced once (what one storage-thread
  hop per publish batch costs);
* ``batch of B, fsyncs side by side``: the same, every fsync of a batch
  issued at once from a pool of threads (optionally all B files in one shard
  directory): what kura's small-body batches do (``kura/storage/batch.py``);
* ``batch of B, N threads``: the same with N threads;
* ``SQLite WAL, B per commit``: 4 KiB blobs inserted into a WAL database
  with ``synchronous=FULL``, one commit per B rows; once more in
  ``auto_vacuum = INCREMENTAL`` mode, the node's (pointer-map pages kept);
* ``SQLite free pages given back``: a database whose bodies were half
  deleted shrinks by ``incremental_vacuum``, 512 pages per commit as the
  node does once a second (a rate in pages, not writes).

Usage (from the repository root)::

    .venv/bin/python benchmarks/disk_rate.py [--dir DIR] [--seconds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

KiB = 1024
SHARDS = 256
_POOL = ThreadPoolExecutor(16)


@dataclass(frozen=True)
class Rate:
    """One variant's result: durable writes per second."""

    label: str
    writes: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.writes / self.seconds if self.seconds else 0.0


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, body: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(root: str) -> tuple[str, list[str]]:
    staging = os.path.join(root, "staging")
    os.makedirs(staging)
    shards = [os.path.join(root, "blobs", f"{n:02x}") for n in range(SHARDS)]
    for shard in shards:
        os.makedirs(shard)
    return staging, shards


def _run_threads(threads: int, seconds: float, step: Callable[[int], int]) -> tuple[int, float]:
    """Run ``step(thread_index)`` in a loop on ``threads`` threads; total writes, elapsed."""
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(index: int) -> None:
        while time.monotonic() < deadline:
            counts[index] += step(index)

    started = time.monotonic()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts), time.monotonic() - started


def file_rename(directory: str, threads: int, seconds: float, size: int) -> Rate:
    """The reference: write + fsync + rename + directory fsync, ``threads`` at once."""
    root = tempfile.mkdtemp(prefix="disk-rate-", dir=directory)
    try:
        staging, shards = _prepare(root)
        body = os.urandom(size)

        def step(index: int) -> int:
            name = secrets.token_hex(8)
            staged = os.path.join(staging, name)
            _write_durably(staged, body)
            shard = shards[secrets.randbelow(SHARDS)]
            os.rename(staged, os.path.join(shard, name))
            _fsync_directory(shard)
            return 1

        writes, elapsed = _run_threads(threads, seconds, step)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    label = "thread" if threads == 1 else "threads"
    return Rate(f"file+rename+dir fsync, {threads} {label}", writes, elapsed)


def batched(
    directory: str,
    threads: int,
    batch: int,
    seconds: float,
    size: int,
    *,
    side_by_side: bool = False,
    one_directory: bool = False,
) -> Rate:
    """``batch`` files written in place, each fsynced, then each directory fsynced once.

    ``side_by_side``: every fsync of a batch (files and directories) is issued
    at once from a pool of threads, as kura's batches do. ``one_directory``:
    the batch's files share one shard directory, as kura's batches do.
    """
    root = tempfile.mkdtemp(prefix="disk-rate-", dir=directory)
    try:
        _, shards = _prepare(root)
        body = os.urandom(size)

        def step(index: int) -> int:
            # Every file is written before the first fsync: the first fsync
            # then commits one journal transaction holding them all, and the
            # others find nothing left to do.
            touched = set()
            fds = []
            first = shards[secrets.randbelow(SHARDS)]
            for _ in range(batch):
                shard = first if one_directory else shards[secrets.randbelow(SHARDS)]
                fd = os.open(
                    os.path.join(shard, secrets.token_hex(8)),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                    0o644,
                )
                fds.append(fd)
                os.write(fd, body)
                touched.add(shard)
            if side_by_side:
                directories = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in touched]
                list(_POOL.map(os.fsync, fds + directories))
                for fd in fds + directories:
                    os.close(fd)
                return batch
            for fd in fds:
                os.fsync(fd)
                os.close(fd)
            for shard in touched:
                _fsync_directory(shard)
            return batch

        writes, elapsed = _run_threads(threads, seconds, step)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    label = "thread" if threads == 1 else "threads"
    how = ", one dir" if one_directory else ""
    how += ", fsyncs side by side" if side_by_side else ", fsyncs in turn"
    return Rate(f"batch of {batch} files{how}, {threads} {label}", writes, elapsed)


@contextlib.contextmanager
def _scratch_database(
    directory: str, key: str, incremental_vacuum: bool
) -> Iterator[sqlite3.Connection]:
    """A throwaway SQLite database in ``directory`` set up as the node's (WAL,
    ``synchronous=FULL``, optionally ``auto_vacuum = INCREMENTAL``), with one
    table ``blobs (<key>, value BLOB)``; removed afterwards."""
    root = tempfile.mkdtemp(prefix="disk-rate-", dir=directory)
    try:
        conn = sqlite3.connect(os.path.join(root, "blobs.sqlite3"), isolation_level=None)
        try:
            if incremental_vacuum:  # only takes effect before the first table
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"CREATE TABLE blobs ({key}, value BLOB NOT NULL)")
            yield conn
        finally:
            conn.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sqlite_batch(
    directory: str, batch: int, seconds: float, size: int, *, incremental_vacuum: bool = False
) -> Rate:
    """4 KiB blobs into SQLite (WAL, ``synchronous=FULL``), ``batch`` rows per commit;
    with ``incremental_vacuum``, in the mode the node's database is in (pointer-map
    pages kept up to date so that free pages can be given back)."""
    with _scratch_database(directory, "id TEXT PRIMARY KEY", incremental_vacuum) as conn:
        body = os.urandom(size)
        writes = 0
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO blobs VALUES (?, ?)",
                [(secrets.token_hex(8), body) for _ in range(batch)],
            )
            conn.execute("COMMIT")
            writes += batch
        elapsed = time.monotonic() - started
    mode = ", auto_vacuum incremental" if incremental_vacuum else ""
    return Rate(f"SQLite WAL FULL, {batch} per commit{mode}", writes, elapsed)


def sqlite_return_pages(directory: str, seconds: float, size: int, per_commit: int = 512) -> Rate:
    """Free pages given back to the filesystem by ``incremental_vacuum``, ``per_commit`` a
    transaction (what the node does once a second): the rate, in pages, at which a
    database that evicted half of its 4 KiB bodies shrinks. Each page in use at the end
    of the file moves into a free one first, so this is a rate of page writes."""
    with _scratch_database(directory, "id INTEGER PRIMARY KEY", incremental_vacuum=True) as conn:
        body = os.urandom(size)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO blobs VALUES (?, ?)", ((n, body) for n in range(20_000)))
        conn.execute("DELETE FROM blobs WHERE id % 2 = 0")
        conn.execute("COMMIT")
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        started = time.monotonic()
        deadline = started + seconds
        left = free
        while left and time.monotonic() < deadline:
            conn.execute("BEGIN IMMEDIATE")
            # A page a step, as MetadataStore.return_free_pages does it.
            for _ in range(min(per_commit, left)):
                conn.execute("PRAGMA incremental_vacuum(1)")
            conn.execute("COMMIT")
            left = conn.execute("PRAGMA freelist_count").fetchone()[0]
        pages = free - left
        elapsed = time.monotonic() - started
    return Rate(f"SQLite free pages given back, {per_commit} per commit (pages)", pages, elapsed)


def reference(directory: str, seconds: float = 2.0, size: int = 4 * KiB) -> Rate:
    """write + fsync + rename + directory fsync on 8 threads (:func:`file_rename`)."""
    return file_rename(directory, 8, seconds, size)


def all_variants(directory: str, seconds: float, size: int, threads: int) -> list[Rate]:
    return [
        file_rename(directory, 1, seconds, size),
        file_rename(directory, threads, seconds, size),
        batched(directory, 1, 8, seconds, size),
        batched(directory, 1, 32, seconds, size),
        batched(directory, 1, 8, seconds, size, side_by_side=True),
        batched(directory, 1, 8, seconds, size, side_by_side=True, one_directory=True),
        batched(directory, 2, 8, seconds, size, side_by_side=True, one_directory=True),
        batched(directory, threads, 8, seconds, size),
        sqlite_batch(directory, 8, seconds, size),
        sqlite_batch(directory, 64, seconds, size),
        sqlite_batch(directory, 64, seconds, size, incremental_vacuum=True),
        sqlite_return_pages(directory, seconds, size),
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="a directory on the disk")
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant (2)")
    parser.add_argument("--size", type=int, default=4 * KiB, help="bytes per write (4096)")
    parser.add_argument("--threads", type=int, default=8, help="threads for the reference (8)")
    args = parser.parse_args(argv)
    print(f"durable {args.size}-byte writes in {args.dir}, {args.seconds:g} s per variant")
    for rate in all_variants(args.dir, args.seconds, args.size, args.threads):
        print(f"  {rate.label:<58} {rate.per_second:>10,.0f} writes/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

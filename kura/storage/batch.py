"""Small bodies held in memory, written into ``blobs/`` in batches that share their fsyncs.

A body small enough to be received in memory (``KURA_MEMORY_BODY_MAX_BYTES``)
skips the staging directory: it is written straight to its final,
never-before-used name in ``blobs/`` by the storage-thread hop that then
commits its manifest (the store's group commit, :mod:`.store`). Bodies that
arrive while a commit is on the disk wait for the next one, so under load one
hop carries many bodies. :func:`write_batch` is the first half of that hop:

1. every file of the batch is created (``O_EXCL``) in one shard directory
   (the first body's) and written, and every body is hashed (SHA-256, the
   digest stored with its artifact: here, on the storage thread, rather than
   on the reactor that received it);
2. ``before_fsync`` is hit, then every file and the directory are fsynced
   *side by side* (:data:`FSYNC_THREADS`): fsyncs issued together wait on
   one journal commit, while fsyncs issued one after the other each pay a
   device cache flush of their own (ext4; measured in
   ``benchmarks/disk_rate.py`` and by the batch time in the node);
3. ``after_bytes_durable_before_metadata`` is hit.

Only then does the same hop run the metadata transaction that records their
manifests, and only after that commit are they acknowledged. A file is
invisible until its manifest commits, so a crash at any step leaves at most
unreferenced files, which start-up removes as orphans; a body that fails is
unlinked at once. Writing in place rather than staging and renaming is safe
for the same reason: nobody looks a blob up by anything but its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from kura.domain.failpoints import (
    AFTER_BYTES_DURABLE_BEFORE_METADATA,
    BEFORE_FSYNC,
    Failpoints,
)
from kura.storage.layout import make_directory_durably

#: Most bodies one batch carries (bounds the descriptors a batch holds open).
MAX_BATCH = 64
#: Threads that run one batch's fsyncs side by side (beside the storage thread).
FSYNC_THREADS = 8


def write_batch(
    items: Sequence[tuple[str, bytes]], failpoints: Failpoints
) -> list[str | BaseException]:
    """Write each ``(path, data)`` durably (see the module docstring); blocking.

    Returns:
        Per item the hex SHA-256 of its data (durable), or the ``OSError``
        that stopped it (its file removed). One item's failure does not fail
        the others.

    Raises:
        Exception: a failpoint fired; every file of the batch was removed.
    """
    errors: list[BaseException | None] = [None] * len(items)
    digests: list[str] = []
    fds: dict[int, int] = {}
    directories: dict[str, list[int]] = {}
    created: list[int] = []
    try:
        try:
            for index, (path, data) in enumerate(items):
                try:
                    directory = os.path.dirname(path)
                    make_directory_durably(directory)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    created.append(index)
                    fds[index] = fd
                    directories.setdefault(directory, []).append(index)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError as error:
                    errors[index] = error
                # hashlib lets go of the GIL for all but the smallest bodies.
                digests.append(hashlib.sha256(data).hexdigest())
            failpoints.hit(BEFORE_FSYNC)
            _fsync_all(fds, directories, errors)
        finally:
            for fd in fds.values():
                os.close(fd)
        failpoints.hit(AFTER_BYTES_DURABLE_BEFORE_METADATA)
    except BaseException:
        # Nothing of this batch will be published: remove it now rather
        # than at the next start-up.
        for index in created:
            _unlink_quietly(items[index][0])
        raise
    for index in created:
        if errors[index] is not None:
            _unlink_quietly(items[index][0])
    return [
        digest if error is None else error for digest, error in zip(digests, errors, strict=True)
    ]


def _fsync_all(
    fds: dict[int, int], directories: dict[str, list[int]], errors: list[BaseException | None]
) -> None:
    """Fsync every written file and each directory, all at once; record failures.

    Issued together, the fsyncs wait on one journal commit; issued one after
    the other, every fsync after the first finds its inode committed already
    and still pays a device cache flush (ext4), a few milliseconds each on
    the virtual disks measured. A directory fsync may run beside its files'
    fsyncs: the entries it must make durable were created before it began.
    """
    jobs: list[tuple[int, list[int]]] = [
        (fd, [index]) for index, fd in fds.items() if errors[index] is None
    ]
    opened: list[int] = []
    try:
        for directory, members in directories.items():
            live = [index for index in members if errors[index] is None]
            if not live:
                continue
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as error:
                for index in live:
                    errors[index] = error
                continue
            opened.append(fd)
            jobs.append((fd, live))
        if not jobs:
            return
        # The first fsync runs on this thread, the others beside it.
        waiting = [(_FSYNCS.submit(os.fsync, fd), members) for fd, members in jobs[1:]]
        outcomes: list[tuple[BaseException | None, list[int]]] = []
        try:
            os.fsync(jobs[0][0])
            outcomes.append((None, jobs[0][1]))
        except OSError as first_error:
            outcomes.append((first_error, jobs[0][1]))
        for future, members in waiting:
            outcomes.append((future.exception(), members))
        for failure, members in outcomes:
            if failure is not None:
                for index in members:
                    errors[index] = failure
    finally:
        for fd in opened:
            os.close(fd)


#: The threads that run a batch's fsyncs side by side (started on first use).
_FSYNCS = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="kura-fsync")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

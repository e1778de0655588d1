"""Blob files checked against their digests before their bytes are served or sent.

Every artifact stored since metadata schema 2 carries the SHA-256 of its body
(:attr:`kura.domain.artifacts.Manifest.digest`). A blob file is hashed and
compared with it the first time it is opened for serving or sending; what
passed is remembered as the file's *stamp* (inode, size, ctime, mtime in ns),
and every later open only compares the stamp with an ``fstat`` of the open
descriptor, which the serving paths make anyway. A file whose stamp moved was
changed through the filesystem (a write, a truncate, a replaced file): it is
hashed again before a byte of it leaves.

**What this catches, and what it leaves to the scrub.** Any change made
through the filesystem (``write``, ``truncate``, ``rename`` over, ``chmod``)
updates the file's ctime, so it is caught at the next open; a file whose
bytes no longer match is never served nor sent. Two things do not move the
stamp and are left to the paced scrub (:mod:`kura.storage.scrub`), which
re-reads every body within one pass:

* bytes that rot below the filesystem (the disk, a bad controller), and
* a change within the filesystem's timestamp granularity of the moment the
  file was verified. A verification that starts less than
  :data:`RACY_SECONDS` after the file's ctime is therefore used once and not
  remembered (git's "racily clean" rule): a write in the same timestamp tick
  would leave the stamp unchanged.

A file is hashed on the reactor thread when it is at most
:data:`INLINE_HASH_BYTES` (a few microseconds), otherwise on a storage
thread, through its own duplicate of the descriptor so the caller may close
its copy at any time. Concurrent verifications of one file share one read.
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from kura.domain.artifacts import Manifest

from .interfaces import IBlockingRunner

#: Bodies up to this size are hashed on the calling thread. Measured here
#: (``pread`` of a page-cached file and SHA-256): 6 µs at 4 KiB, 17 µs at
#: 16 KiB and 52 µs at 64 KiB, where a storage-thread round trip costs tens
#: of µs of CPU in wake-ups and GIL hand-offs.
INLINE_HASH_BYTES = 16 * 1024
#: Bytes hashed per read.
READ_BYTES = 1024 * 1024
#: A verification that starts less than this after the file's last change
#: is not remembered: coarse timestamps (a kernel tick, one second on some
#: filesystems) could hide a change made right after it.
RACY_SECONDS = 1.0
#: Files whose verification is remembered (least recently served go first;
#: roughly 200 bytes each).
MAX_REMEMBERED = 65_536

#: What identifies the state of a file's bytes: inode, size, ctime, mtime (ns).
Stamp = tuple[int, int, int, int]


def stamp_of(status: os.stat_result) -> Stamp:
    return (status.st_ino, status.st_size, status.st_ctime_ns, status.st_mtime_ns)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_descriptor(fd: int, length: int) -> str:
    """The SHA-256 of the first ``length`` bytes of ``fd`` (blocking; ``pread``, offset untouched).

    Raises:
        EOFError: the file is shorter than ``length``.
        OSError: it cannot be read.
    """
    hasher = hashlib.sha256()
    offset = 0
    while offset < length:
        chunk = os.pread(fd, min(READ_BYTES, length - offset), offset)
        if not chunk:
            raise EOFError(f"file ended after {offset} of {length} bytes")
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest()


@attrs.frozen
class Check:
    """One verification's outcome.

    Attributes:
        intact: the bytes hash to the manifest's digest.
        stamp: the file's stamp, when it may be trusted from now on (intact,
            unchanged while it was read, and not racy); else ``None``.
    """

    intact: bool
    stamp: Stamp | None


def check_file(fd: int, length: int, digest: str, wall: Callable[[], float]) -> Check:
    """Hash ``length`` bytes of ``fd`` and compare them with ``digest`` (blocking).

    A file shorter than ``length`` is not intact.

    Raises:
        OSError: the file cannot be read (not a verdict on its bytes).
    """
    started = wall()
    before = os.fstat(fd)
    try:
        intact = hash_descriptor(fd, length) == digest
    except EOFError:
        return Check(False, None)
    return Check(intact, trusted_stamp(before, os.fstat(fd), started) if intact else None)


def trusted_stamp(before: os.stat_result, after: os.stat_result, started: float) -> Stamp | None:
    """The stamp under which bytes just read and found intact may be trusted, if any.

    Args:
        before: the file's ``fstat`` before the read.
        after: its ``fstat`` after the read.
        started: the wall-clock time the read started.

    Returns:
        ``None`` when the file changed during the read, or when the read
        started less than :data:`RACY_SECONDS` after its last change (a
        change in the same timestamp tick would leave the stamp as it is).
    """
    stamp = stamp_of(before)
    if stamp != stamp_of(after) or started - before.st_ctime_ns / 1e9 < RACY_SECONDS:
        return None
    return stamp


def _check_copy(fd: int, length: int, digest: str, wall: Callable[[], float]) -> Check:
    """:func:`check_file` on a descriptor this call owns and closes."""
    try:
        return check_file(fd, length, digest, wall)
    finally:
        os.close(fd)


class BodyVerifier:
    """Which blob files were verified in their current state (see the module docstring).

    Reactor thread only.

    Args:
        runner: where large files are read.
        capacity: files remembered.
        wall: the wall clock file timestamps are compared with.
    """

    def __init__(
        self,
        runner: IBlockingRunner,
        *,
        capacity: int = MAX_REMEMBERED,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._runner = runner
        self._capacity = capacity
        #: The wall clock file timestamps are compared with.
        self.wall = wall
        self._known: collections.OrderedDict[str, Stamp] = collections.OrderedDict()
        self._inflight: dict[str, list[Deferred[Check]]] = {}

    def __len__(self) -> int:
        return len(self._known)

    def trusted(self, manifest: Manifest, status: os.stat_result) -> bool:
        """Whether the open file whose ``fstat`` is ``status`` needs no hashing.

        True when it was verified in exactly this state, or when the manifest
        has no digest to check against (written by an earlier release: the
        scrub fills it in).
        """
        if manifest.digest is None:
            return True
        key = manifest.blob_path
        assert key is not None, "only file-backed artifacts are verified"
        known = self._known.get(key)
        if known is None or known != stamp_of(status):
            return False
        self._known.move_to_end(key)
        return True

    def check(self, manifest: Manifest, fd: int) -> Deferred[Check]:
        """Hash ``manifest``'s open body file and compare it with the manifest's digest.

        Remembers the file's stamp when it may be trusted, and forgets it
        otherwise. The caller keeps ``fd`` and may close it before this fires.

        Raises:
            OSError: the file cannot be read (also as a failure).
        """
        digest, key = manifest.digest, manifest.blob_path
        assert digest is not None and key is not None
        waiter: Deferred[Check] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        if manifest.size <= INLINE_HASH_BYTES:
            check = check_file(fd, manifest.size, digest, self.wall)
            self._settle(key, check)
            return succeed(check)
        copy = os.dup(fd)
        waiters = self._inflight[key] = [waiter]

        def done(result: Check | Failure) -> None:
            del self._inflight[key]
            if isinstance(result, Check):
                self._settle(key, result)
            for each in waiters:
                # A waiter whose caller gave up (cancelled) ignores this.
                if isinstance(result, Check):
                    each.callback(result)
                else:
                    each.errback(result)

        self._runner.run(_check_copy, copy, manifest.size, digest, self.wall).addBoth(done)
        return waiter

    def _settle(self, key: str, check: Check) -> None:
        if check.stamp is not None:
            self.remember(key, check.stamp)
        else:
            self.forget(key)

    def remember(self, blob_path: str, stamp: Stamp) -> None:
        self._known[blob_path] = stamp
        self._known.move_to_end(blob_path)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)

    def forget(self, blob_path: str) -> None:
        self._known.pop(blob_path, None)

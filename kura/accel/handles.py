"""Open descriptors of small artifacts, kept between accelerated downloads.

A 4 KiB download is a handful of syscalls, and opening the file by path is
the most expensive of them (a fifth of the reactor's time in a profile,
with its ``close``). Popular small artifacts are therefore kept open, as
nginx's ``open_file_cache`` does; large ones are opened per request, where
the open is noise beside the transfer.

Correctness never depends on the cache being told about writes. Entries
are keyed by file name, and every version of an artifact is a new file.
Every borrow calls ``fstat`` on the descriptor (the accelerator needs the
size anyway), so a file unlinked or replaced behind kura's back (its inode
has no links left) is dropped and its path opened afresh, and the same
``fstat`` tells whether the file is still in the state in which its bytes
were verified against their digest (:mod:`kura.storage.verify`): a lease
says so, and the accelerator serves only verified files. A descriptor is
closed only when no transfer holds it, so a worker thread never sees it
closed under it; all bookkeeping happens on the reactor thread.

Cached descriptors of deleted files would pin their disk space, so
:meth:`HandleCache.sweep` (run every second) drops them, and the cache is
small: at most :data:`MAX_ENTRIES` descriptors, and a sixteenth of the
process's descriptor limit (read again on every sweep, so a limit lowered
at run time shrinks the cache within a second).
"""

from __future__ import annotations

import collections
import os
import resource

from kura.domain.artifacts import Manifest
from kura.storage.store import ArtifactStore

#: Files up to this size are kept open; larger ones are opened per request.
CACHED_FILE_MAX_BYTES = 1024 * 1024
#: Enough for a build's hot set of small outputs; each costs one descriptor.
MAX_ENTRIES = 1024


def default_capacity() -> int:
    """:data:`MAX_ENTRIES`, or a sixteenth of the descriptor limit if that is less."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_ENTRIES
    return max(0, min(MAX_ENTRIES, soft // 16))


class _Entry:
    __slots__ = ("detached", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        # Out of the cache (stale or evicted): closed when the last user leaves.
        self.detached = False


class Lease:
    """A descriptor lent to one transfer; give it back with :meth:`HandleCache.release`.

    Attributes:
        verified: the file is in the state in which its bytes matched the
            manifest's digest (no hashing needed before serving it).
    """

    __slots__ = ("entry", "fd", "size", "verified")

    def __init__(self, fd: int, size: int, entry: _Entry | None, verified: bool) -> None:
        self.fd = fd
        self.size = size
        self.entry = entry
        self.verified = verified


class HandleCache:
    """An LRU of open artifact descriptors (see the module docstring).

    Args:
        store: opens the files.
        capacity: most descriptors kept open (0 disables the cache); by
            default :func:`default_capacity`, followed as the limit changes.

    Attributes:
        lent: leases borrowed and not yet released.
    """

    def __init__(self, store: ArtifactStore, capacity: int | None = None) -> None:
        self._store = store
        self._follow_limit = capacity is None
        self.capacity = default_capacity() if capacity is None else capacity
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self.lent = 0

    def __len__(self) -> int:
        return len(self._entries)

    def borrow(self, manifest: Manifest) -> Lease:
        """An open descriptor of ``manifest``'s file, its current size and whether it is verified.

        Raises:
            OSError: the file is missing or cannot be opened.
        """
        # Keyed by file name: a new version of an artifact is a new file.
        key = manifest.blob_path
        assert key is not None, "only file-backed artifacts have a descriptor"
        trusted = self._store.verifier.trusted
        entry = self._entries.get(key)
        if entry is not None:
            status = os.fstat(entry.fd)
            if status.st_nlink > 0:
                self._entries.move_to_end(key)
                entry.users += 1
                self.lent += 1
                return Lease(entry.fd, status.st_size, entry, trusted(manifest, status))
            self._detach(key)
        fd = self._store.open_body(manifest)
        try:
            status = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        size = status.st_size
        verified = trusted(manifest, status)
        self.lent += 1
        if size > CACHED_FILE_MAX_BYTES or self.capacity == 0:
            return Lease(fd, size, None, verified)
        entry = self._entries[key] = _Entry(fd)
        entry.users = 1
        self._evict_beyond(self.capacity)
        return Lease(fd, size, entry, verified)

    def ready_fd(self, manifest: Manifest) -> int:
        """The cached descriptor of ``manifest``'s file if it may be served at
        once, else -1.

        At once means: already open here, still linked, of the manifest's
        size and verified in its current state (one dict look-up and one
        ``fstat``; nothing is opened, hashed or detached: :meth:`borrow`
        does all that for the requests this refuses). The descriptor is not
        lent: it stays valid only until control returns to the reactor. To
        keep it longer, call :meth:`adopt` before returning.
        """
        key = manifest.blob_path
        entry = self._entries.get(key)  # type: ignore[arg-type]
        if entry is None:
            return -1
        status = os.fstat(entry.fd)
        if (
            status.st_nlink == 0
            or status.st_size != manifest.size
            or not self._store.verifier.trusted(manifest, status)
        ):
            return -1
        self._entries.move_to_end(key)  # type: ignore[arg-type]
        return entry.fd

    def adopt(self, manifest: Manifest) -> Lease:
        """A lease on the descriptor :meth:`ready_fd` just returned for
        ``manifest`` (in the same reactor step: the entry is still cached),
        for a response that goes on after this step."""
        entry = self._entries[manifest.blob_path]  # type: ignore[index]
        entry.users += 1
        self.lent += 1
        return Lease(entry.fd, manifest.size, entry, True)

    def release(self, lease: Lease) -> None:
        """Give a descriptor back (closing it if nothing else may use it)."""
        self.lent -= 1
        entry = lease.entry
        if entry is None:
            os.close(lease.fd)
            return
        entry.users -= 1
        if entry.detached and entry.users == 0:
            os.close(entry.fd)

    def sweep(self) -> None:
        """Drop entries whose file was deleted or replaced, freeing its space,
        and shrink to the capacity the descriptor limit allows now."""
        if self._follow_limit:
            self.capacity = default_capacity()
            self._evict_beyond(self.capacity)
        for key, entry in list(self._entries.items()):
            try:
                gone = os.fstat(entry.fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                self._detach(key)

    def clear(self) -> int:
        """Drop every entry (in-use descriptors close when their transfer ends)."""
        count = len(self._entries)
        for key in list(self._entries):
            self._detach(key)
        return count

    def _evict_beyond(self, limit: int) -> None:
        while len(self._entries) > limit:
            self._detach(next(iter(self._entries)))

    def _detach(self, key: str) -> None:
        entry = self._entries.pop(key)
        entry.detached = True
        if entry.users == 0:
            os.close(entry.fd)

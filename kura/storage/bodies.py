"""The bodies kept in the metadata store, held in memory for the serving paths.

Since metadata schema 4 a small body (one received in memory,
``KURA_MEMORY_BODY_MAX_BYTES``) is stored in SQLite with its manifest, in
the same transaction: one WAL fsync per group commit covers the bytes and
the metadata of every body in it, where a file per body cost a file
creation, its fsync and a directory fsync (see ``docs/benchmarks.md``).
Reading such a body back from SQLite is a storage-thread hop; this cache
lets the accelerator answer it from memory in one send, and the fallback
without a hop. It holds bytes that are known good: those a commit just
stored, and those read back and checked against their digest.

Entries are keyed by artifact id and tagged with the version they hold, so
a stale entry can never answer for a newer version. The cache is bounded in
bytes (``KURA_BODY_CACHE_MAX_BYTES``), least recently used first out, and is
emptied under critical memory pressure.
"""

from __future__ import annotations

from collections import OrderedDict

from kura.domain.artifacts import Manifest

#: The default bound (``KURA_BODY_CACHE_MAX_BYTES``).
BODY_CACHE_MAX_BYTES = 64 << 20


class BodyCache:
    """A byte-bounded LRU of ``artifact_id -> (version_ms, namespace_id, body)``;
    reactor thread only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, tuple[int, str, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, manifest: Manifest) -> bytes | None:
        """The body of exactly ``manifest``'s version, if held."""
        entry = self._entries.get(manifest.artifact_id)
        if entry is None or entry[0] != manifest.version_ms:
            return None
        self._entries.move_to_end(manifest.artifact_id)
        return entry[2]

    def put(self, manifest: Manifest, body: bytes) -> None:
        """Hold ``body`` as ``manifest``'s (a body larger than the whole cache is not held)."""
        self.discard(manifest.artifact_id)
        if len(body) > self.max_bytes:
            return
        self._entries[manifest.artifact_id] = (manifest.version_ms, manifest.namespace_id, body)
        self.used_bytes += len(body)
        while self.used_bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.used_bytes -= len(dropped)

    def discard(self, artifact_id: str) -> None:
        entry = self._entries.pop(artifact_id, None)
        if entry is not None:
            self.used_bytes -= len(entry[2])

    def discard_namespace(self, namespace_id: str) -> None:
        """Forget the bodies of a cleaned namespace (a scan: cleans are rare)."""
        for artifact_id in [
            key for key, entry in self._entries.items() if entry[1] == namespace_id
        ]:
            self.discard(artifact_id)

    def clear(self) -> int:
        """Forget everything (memory pressure); how many bodies went."""
        count = len(self._entries)
        self._entries.clear()
        self.used_bytes = 0
        return count

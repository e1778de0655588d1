"""SHA-256 digests of stored bodies, which signed peer transfers declare up front.

A signed upload (outbox) or catch-up body names its digest in a header
before the first byte, so the sender hashes the stored file first: on a
storage thread, reading with ``pread`` (the transfer's own offset is never
touched). Every peer of a write receives the same version, so digests are
remembered per artifact version and computed once, not once per peer.
"""

from __future__ import annotations

import collections
import hashlib
import os

from kura.domain.artifacts import Manifest
from kura.storage.interfaces import IBlockingRunner

#: Bytes hashed per read.
READ_BYTES = 1024 * 1024
#: Artifact versions whose digests are remembered.
CAPACITY = 4096


def hash_descriptor(fd: int, length: int) -> str:
    """The SHA-256 of the first ``length`` bytes of ``fd`` (blocking).

    Raises:
        EOFError: the file is shorter than ``length``.
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


class BodyDigests:
    """Digests of stored artifact bodies, computed once per version.

    Args:
        runner: where the file is read.
        capacity: versions remembered (least recently used go first).
    """

    def __init__(self, runner: IBlockingRunner, capacity: int = CAPACITY) -> None:
        self._runner = runner
        self._capacity = capacity
        self._known: collections.OrderedDict[tuple[str, int, str], str] = collections.OrderedDict()

    async def of_file(self, manifest: Manifest, fd: int) -> str:
        """The digest of ``manifest``'s body, read from ``fd`` (which stays open).

        Raises:
            EOFError: the file is shorter than the manifest says.
            OSError: it cannot be read.
        """
        key = (manifest.artifact_id, manifest.version_ms, manifest.blob_path or "")
        digest = self._known.get(key)
        if digest is not None:
            self._known.move_to_end(key)
            return digest
        digest = await self._runner.run(hash_descriptor, fd, manifest.size)
        self._known[key] = digest
        if len(self._known) > self._capacity:
            self._known.popitem(last=False)
        return digest

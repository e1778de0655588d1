"""The SHA-256 of stored bodies, which peer transfers declare up front.

An upload (outbox) or catch-up body names its digest in a header
(``X-Kura-Content-Sha256``) before the first byte, and the receiving peer
checks the body against it before publishing. Every artifact stored since
metadata schema 2 carries its digest in its manifest, computed as its body
arrived: that one is declared, nothing is read. Only a body stored by an
earlier release (until the scrub fills its digest in) is hashed here, on a
storage thread; every peer of a write receives the same version, so those
digests are remembered per artifact version and computed once, not once per
peer.
"""

from __future__ import annotations

import collections

from kura.domain.artifacts import Manifest
from kura.storage.interfaces import IBlockingRunner
from kura.storage.verify import hash_descriptor

#: Artifact versions without a stored digest whose digests are remembered.
CAPACITY = 4096


class BodyDigests:
    """Digests of stored artifact bodies: the manifest's, or computed once per version.

    Args:
        runner: where a file is read.
        capacity: versions remembered (least recently used go first).
    """

    def __init__(self, runner: IBlockingRunner, capacity: int = CAPACITY) -> None:
        self._runner = runner
        self._capacity = capacity
        self._known: collections.OrderedDict[tuple[str, int, str], str] = collections.OrderedDict()

    async def of_file(self, manifest: Manifest, fd: int) -> str:
        """The digest of ``manifest``'s body, read from ``fd`` (which stays open) if need be.

        Raises:
            EOFError: the file is shorter than the manifest says.
            OSError: it cannot be read.
        """
        if manifest.digest is not None:
            return manifest.digest
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

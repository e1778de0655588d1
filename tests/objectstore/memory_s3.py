"""An in-memory stand-in for :class:`kura.objectstore.client.S3Store` (fast unit tests).

The real client is exercised against moto's server in ``test_tier_real.py``;
this one lets the tier's logic run on a fake clock with storage inline.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping

from kura.objectstore.client import Fetched, ObjectMissing, StoreError


class MemoryS3:
    """Objects in a dict; ``down`` makes every request fail as an unreachable store would.

    Attributes:
        objects: key -> (metadata, body).
        requests: the operation of every request made, in order.
    """

    def __init__(self) -> None:
        self.objects: dict[str, tuple[dict[str, str], bytes]] = {}
        self.requests: list[str] = []
        self.down = False

    def _request(self, operation: str) -> None:
        self.requests.append(operation)
        if self.down:
            raise StoreError("connection refused")

    def put_bytes(self, key: str, data: bytes, sha256: str, metadata: Mapping[str, str]) -> None:
        self._request("put")
        assert hashlib.sha256(data).hexdigest() == sha256, "checksum header does not match"
        self.objects[key] = (dict(metadata), data)

    def put_file(self, key: str, path: str, sha256: str, metadata: Mapping[str, str]) -> None:
        with open(path, "rb") as handle:
            data = handle.read()
        self.put_bytes(key, data, sha256, metadata)

    def head(self, key: str) -> dict[str, str]:
        self._request("head")
        if key not in self.objects:
            raise ObjectMissing(key)
        return dict(self.objects[key][0])

    def get_to_file(self, key: str, path: str) -> Fetched:
        self._request("get")
        if key not in self.objects:
            raise ObjectMissing(key)
        metadata, data = self.objects[key]
        with open(path, "xb") as handle:
            handle.write(data)
            os.fsync(handle.fileno())
        return Fetched(dict(metadata), len(data), hashlib.sha256(data).hexdigest())

    def delete(self, key: str) -> None:
        self._request("delete")
        self.objects.pop(key, None)

    def list_keys(self, prefix: str, start_after: str = "") -> Iterator[str]:
        self._request("list")
        return iter(sorted(k for k in self.objects if k.startswith(prefix) and k > start_after))

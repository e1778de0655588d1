"""What the digest check adds to an accelerated 4 KiB GET, measured in process.

The accelerator's per-request file step (``HandleCache.borrow`` and
``release`` of a cached 4 KiB file, whose ``fstat`` it makes anyway) is timed
with the stamp comparison of ``BodyVerifier.trusted`` and with it stubbed
out, alternating, best of 7 x 200,000. wrk cannot resolve a difference this
small on a shared VM (see docs/benchmarks.md, issue 15).

Usage (from the repository root)::

    PYTHONPATH=. .venv/bin/python benchmarks/verify_overhead.py
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any

from kura.accel.handles import HandleCache
from kura.domain.artifacts import Manifest
from kura.storage.runner import ImmediateRunner
from kura.storage.verify import BodyVerifier

ROUNDS = 7
N = 200_000


class Store:
    """The two things HandleCache asks of the store: open a blob, and its verifier."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.verifier = BodyVerifier(ImmediateRunner(), wall=lambda: time.time() + 3600)

    def open_body(self, manifest: Manifest) -> int:
        assert manifest.blob_path is not None
        return os.open(os.path.join(self.directory, manifest.blob_path), os.O_RDONLY)


def main() -> None:
    directory = tempfile.mkdtemp()
    data = os.urandom(4096)
    with open(os.path.join(directory, "f"), "wb") as handle:
        handle.write(data)
    store = Store(directory)
    manifest = Manifest(
        artifact_id="a" * 64,
        producer="xcode",
        namespace_id="",
        key="k",
        content_type="application/octet-stream",
        inline=False,
        blob_path="f",
        size=4096,
        version_ms=1,
        created_at_ms=1,
        digest=hashlib.sha256(data).hexdigest(),
    )
    fd = store.open_body(manifest)
    store.verifier.check(manifest, fd)
    os.close(fd)
    cache = HandleCache(store, capacity=8)  # type: ignore[arg-type]
    real = store.verifier.trusted

    def stub(manifest: Manifest, status: Any) -> bool:
        return True

    best = {"with the check": 9.0, "check stubbed": 9.0}
    for _ in range(ROUNDS):
        for name, trusted in (("with the check", real), ("check stubbed", stub)):
            store.verifier.trusted = trusted  # type: ignore[method-assign]
            started = time.perf_counter()
            for _ in range(N):
                cache.release(cache.borrow(manifest))
            best[name] = min(best[name], (time.perf_counter() - started) / N)
    for name, seconds in best.items():
        print(f"{name}: {seconds * 1e9:.0f} ns per borrow + release")
    added = best["with the check"] - best["check stubbed"]
    print(f"added by the check: {added * 1e9:.0f} ns")


if __name__ == "__main__":
    main()

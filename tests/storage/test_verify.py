"""Blob files checked against their digests before they are served (kura.storage.verify)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from kura.domain.artifacts import Manifest
from kura.storage import verify
from kura.storage.runner import ImmediateRunner
from kura.storage.verify import INLINE_HASH_BYTES, BodyVerifier, Check, check_file, stamp_of
from kura.testing import ControlledRunner, failed, succeeded
from tests.support.corruption import flip_byte
from tests.support.descriptors import is_open

#: A wall clock well past any file's ctime: nothing is racy.
LATER = lambda: time.time() + 3600  # noqa: E731


def blob(tmp_path: Path, data: bytes, name: str = "blob") -> tuple[Manifest, int]:
    path = tmp_path / name
    path.write_bytes(data)
    manifest = Manifest(
        artifact_id="a" * 64,
        producer="gradle",
        namespace_id="",
        key="k",
        content_type="application/octet-stream",
        inline=False,
        blob_path=name,
        size=len(data),
        version_ms=1,
        created_at_ms=1,
        digest=hashlib.sha256(data).hexdigest(),
    )
    return manifest, os.open(path, os.O_RDONLY)


def test_an_intact_file_is_remembered_and_then_trusted_until_it_changes(tmp_path: Path) -> None:
    """Verified once, later opens only compare the stamp; a write in place undoes it."""
    verifier = BodyVerifier(ImmediateRunner(), wall=LATER)
    manifest, fd = blob(tmp_path, b"x" * 1000)
    assert not verifier.trusted(manifest, os.fstat(fd))
    assert succeeded(verifier.check(manifest, fd)).intact
    assert verifier.trusted(manifest, os.fstat(fd)) and len(verifier) == 1
    flip_byte(tmp_path / "blob")
    assert not verifier.trusted(manifest, os.fstat(fd))
    check = succeeded(verifier.check(manifest, fd))
    assert check == Check(intact=False, stamp=None)
    assert len(verifier) == 0
    os.close(fd)


def test_a_verification_right_after_a_change_is_used_once_not_remembered(tmp_path: Path) -> None:
    """Within RACY_SECONDS of the file's ctime a same-tick change could hide: hash again."""
    verifier = BodyVerifier(ImmediateRunner())
    manifest, fd = blob(tmp_path, b"fresh")
    check = succeeded(verifier.check(manifest, fd))
    assert check.intact and check.stamp is None
    assert not verifier.trusted(manifest, os.fstat(fd)) and len(verifier) == 0
    verifier.wall = LATER
    assert succeeded(verifier.check(manifest, fd)).stamp == stamp_of(os.fstat(fd))
    assert verifier.trusted(manifest, os.fstat(fd))
    os.close(fd)


def test_a_manifest_without_a_digest_has_nothing_to_check(tmp_path: Path) -> None:
    """Artifacts written before metadata schema 2 are served as before until the scrub
    fills their digest in."""
    verifier = BodyVerifier(ImmediateRunner())
    manifest, fd = blob(tmp_path, b"old")
    legacy = Manifest(**{**manifest.to_json(), "digest": None})  # type: ignore[arg-type]
    assert verifier.trusted(legacy, os.fstat(fd))
    os.close(fd)


def test_a_file_shorter_than_its_manifest_is_not_intact(tmp_path: Path) -> None:
    """A file that ends early while it is hashed fails; it is never an error to serve."""
    manifest, fd = blob(tmp_path, b"y" * 100)
    os.truncate(tmp_path / "blob", 50)
    assert not check_file(fd, manifest.size, manifest.digest or "", LATER).intact
    os.close(fd)


def test_a_large_file_is_hashed_once_on_a_storage_thread_through_its_own_descriptor(
    tmp_path: Path,
) -> None:
    """Beyond INLINE_HASH_BYTES the read runs on the runner, on a duplicate of the
    caller's descriptor (closed by the read itself), and concurrent checks share it."""
    runner = ControlledRunner()
    runner.hold = lambda f: True
    verifier = BodyVerifier(runner, wall=LATER)
    manifest, fd = blob(tmp_path, os.urandom(INLINE_HASH_BYTES + 1))
    first = verifier.check(manifest, fd)
    second = verifier.check(manifest, fd)
    assert len(runner.held) == 1 and not first.called
    (_, (copy, *_), _, _) = runner.held[0]
    assert copy != fd
    os.close(fd)  # the caller may leave meanwhile
    runner.release()
    assert succeeded(first).intact and succeeded(second).intact
    assert not is_open(copy)
    assert len(verifier) == 1


def test_a_read_error_fails_every_waiter_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error is not a verdict on the bytes: waiters fail, nothing is remembered."""
    runner = ControlledRunner()
    runner.hold = lambda f: True
    verifier = BodyVerifier(runner, wall=LATER)
    manifest, fd = blob(tmp_path, os.urandom(INLINE_HASH_BYTES * 2))
    first, second = verifier.check(manifest, fd), verifier.check(manifest, fd)

    def broken(*args: Any) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(verify.os, "pread", broken)
    runner.release()
    assert isinstance(failed(first), OSError) and isinstance(failed(second), OSError)
    assert len(verifier) == 0
    monkeypatch.undo()
    runner.hold = lambda f: False
    assert succeeded(verifier.check(manifest, fd)).intact
    os.close(fd)


def test_remembered_files_are_bounded_least_recently_served_first(tmp_path: Path) -> None:
    """At capacity the file served longest ago is forgotten (it is hashed again if served)."""
    verifier = BodyVerifier(ImmediateRunner(), capacity=2, wall=LATER)
    opened = [blob(tmp_path, b"%d" % n, f"f{n}") for n in range(3)]
    (m0, fd0), (m1, fd1), (m2, fd2) = opened
    succeeded(verifier.check(m0, fd0))
    succeeded(verifier.check(m1, fd1))
    assert verifier.trusted(m0, os.fstat(fd0))  # served again: most recent now
    succeeded(verifier.check(m2, fd2))
    assert verifier.trusted(m0, os.fstat(fd0)) and verifier.trusted(m2, os.fstat(fd2))
    assert not verifier.trusted(m1, os.fstat(fd1))
    for _, fd in opened:
        os.close(fd)

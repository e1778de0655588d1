"""Damaging stored blobs behind the node's back, as a disk or a stray process would."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path


def flip_byte(path: str | Path, offset: int = 0) -> None:
    """Invert one byte of the file at ``path`` in place (``open r+b``, one write).

    The write changes the file's ctime, which is what tells the node its
    bytes may have changed. A write in the same timestamp tick as the file's
    last change would leave the ctime as it was, so the file is touched again
    until the change shows (a bounded poll of the ctime itself).
    """
    before = os.stat(path).st_ctime_ns
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    deadline = time.monotonic() + 5
    while os.stat(path).st_ctime_ns == before:
        assert time.monotonic() < deadline, f"the ctime of {path} never moved"
        time.sleep(0.005)
        os.utime(path)


def default_artifact_id(key: str, producer: str = "gradle") -> str:
    """The artifact id of ``producer``'s ``key`` in the default tenant and namespace."""
    return hashlib.sha256(f"{producer}\0default\0\0{key}".encode()).hexdigest()


def stored_blob(data_dir: str, key: str, producer: str = "gradle") -> tuple[str, str | None]:
    """Where a real node keeps ``key``'s body, and the digest stored with it.

    Read from the node's metadata (read-only, beside the running node), for an
    artifact of the default tenant and namespace.

    Returns:
        The absolute path of its blob file and its digest (``None`` when the
        store has none for it, as a previous release's).
    """
    artifact_id = default_artifact_id(key, producer)
    database = sqlite3.connect(f"file:{data_dir}/kura.sqlite3?mode=ro", uri=True)
    try:
        row = database.execute(
            "SELECT blob_path, digest FROM manifests WHERE artifact_id = ?", (artifact_id,)
        ).fetchone()
    except sqlite3.OperationalError:  # a previous release's store: no digest column
        row = database.execute(
            "SELECT blob_path, NULL FROM manifests WHERE artifact_id = ?", (artifact_id,)
        ).fetchone()
    finally:
        database.close()
    assert row is not None, f"{key} is not stored in {data_dir}"
    return os.path.join(data_dir, row[0]), row[1]

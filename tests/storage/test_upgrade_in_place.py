"""An in-place upgrade through real processes: the previous release writes, this one reads."""

from __future__ import annotations

import sqlite3
import urllib.request
from pathlib import Path

import pytest

from kura.storage.metadata import INCREMENTAL_VACUUM, SCHEMA_VERSION
from tests.storage.test_schema_version import pragma, user_version
from tests.support.real import RealNode
from tests.support.release import SCHEMA_3_RELEASE, previous_release

pytestmark = pytest.mark.realnode

PATH = "/api/cache/cas/{id}?tenant_id=default"


def put(node: RealNode, artifact: str, body: bytes) -> int:
    request = urllib.request.Request(node.url + PATH.format(id=artifact), data=body, method="POST")
    request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def get(node: RealNode, artifact: str) -> bytes:
    with urllib.request.urlopen(node.url + PATH.format(id=artifact), timeout=10) as response:
        return bytes(response.read())


def test_a_store_written_by_the_previous_release_serves_after_the_upgrade(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    old = RealNode(str(data_dir), source=previous_release(str(tmp_path)))
    old.start()
    try:
        assert put(old, "old-small", b"s" * 100) in (200, 201, 204)
        assert put(old, "old-large", b"L" * 300_000) in (200, 201, 204)
    finally:
        old.stop()
    assert user_version(data_dir / "kura.sqlite3") == 1

    new = RealNode(str(data_dir)).start()
    try:
        assert get(new, "old-small") == b"s" * 100
        assert get(new, "old-large") == b"L" * 300_000
        assert put(new, "new", b"n" * 10) in (200, 201, 204)
        assert get(new, "new") == b"n" * 10
    finally:
        new.stop()
    assert user_version(data_dir / "kura.sqlite3") == SCHEMA_VERSION


def test_a_store_whose_small_bodies_are_files_serves_them_and_keeps_new_ones_in_the_database(
    tmp_path: Path,
) -> None:
    """Schema 3 -> 4: the small bodies the last release wrote as files stay
    files and are served; small bodies written after the upgrade go into the
    database; eviction accounting covers both."""
    data_dir = tmp_path / "data"
    old = RealNode(str(data_dir), source=previous_release(str(tmp_path), SCHEMA_3_RELEASE))
    old.start()
    try:
        assert put(old, "old-small", b"s" * 4096) in (200, 201, 204)
        assert put(old, "old-large", b"L" * 300_000) in (200, 201, 204)
    finally:
        old.stop()
    assert user_version(data_dir / "kura.sqlite3") == 3
    assert pragma(data_dir / "kura.sqlite3", "auto_vacuum") == 0  # free pages kept for ever
    files_before = sorted(p.name for p in (data_dir / "blobs").rglob("*") if p.is_file())
    assert len(files_before) == 2

    new = RealNode(str(data_dir)).start()
    try:
        assert get(new, "old-small") == b"s" * 4096
        assert get(new, "old-large") == b"L" * 300_000
        assert put(new, "new-small", b"n" * 4096) in (200, 201, 204)
        assert get(new, "new-small") == b"n" * 4096
    finally:
        new.stop()
    assert user_version(data_dir / "kura.sqlite3") == SCHEMA_VERSION == 4
    # Converted at open (a small database): its free pages can go back now.
    assert pragma(data_dir / "kura.sqlite3", "auto_vacuum") == INCREMENTAL_VACUUM
    files_after = sorted(p.name for p in (data_dir / "blobs").rglob("*") if p.is_file())
    assert files_after == files_before  # the new small body has no file
    conn = sqlite3.connect(data_dir / "kura.sqlite3")
    try:
        in_database = conn.execute(
            "SELECT m.key, length(k.value) FROM manifests AS m "
            "JOIN key_values AS k USING (artifact_id) WHERE m.inline = 0"
        ).fetchall()
        used = conn.execute("SELECT SUM(size) FROM manifests WHERE inline = 0").fetchone()[0]
    finally:
        conn.close()
    assert in_database == [("blob/new-small", 4096)]
    assert used == 4096 + 300_000 + 4096

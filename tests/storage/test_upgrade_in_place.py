"""An in-place upgrade through real processes: the previous release writes, this one reads."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from kura.storage.metadata import SCHEMA_VERSION
from tests.storage.test_schema_version import user_version
from tests.support.real import RealNode
from tests.support.release import previous_release

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

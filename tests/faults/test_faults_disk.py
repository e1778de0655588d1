"""Disks that fill up, a metadata store that cannot grow, and one key written fifty times at once.

A data directory on a 16 MiB tmpfs, the SQLite file's filesystem full while
artifact bodies still fit, and concurrent uploads of one key with identical
bytes, against real ``twistd kura`` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.faults.support import (
    CAS,
    GRADLE,
    MiB,
    MountUnavailable,
    assert_alive,
    blob_files,
    call,
    fill,
    staged_files,
    tmpfs,
    wait_for,
)
from tests.support.real import RawClient, RealNode

pytestmark = pytest.mark.faults


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[ExitStack]:
    """Mount tmpfs filesystems for a test (skipped, loudly, where mounting is impossible)."""
    with ExitStack() as stack:
        yield stack


def mount(stack: ExitStack, path: Path, size: str) -> str:
    try:
        return stack.enter_context(tmpfs(str(path), size))
    except MountUnavailable as error:
        pytest.skip(f"SKIPPED LOUDLY: {error} (needs root and tmpfs)")


def fallback_get(node: RealNode, target: str) -> tuple[int, bytes]:
    """A GET over HTTP/1.0, which the accelerator always leaves to twisted.web."""
    client = RawClient(node.port)
    try:
        client.send(f"GET {target} HTTP/1.0\r\n\r\n".encode(), heads=[False])
        [response] = client.read_responses(1)
        return response.status, response.body
    finally:
        client.close()


def assert_disk_full_answer(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 507, (status, body)
    assert "disk space" in json.loads(body)["message"]
    assert headers.get("retry-after") == "1"


def test_upload_larger_than_the_free_space_is_507_and_cleaned_up(
    tmp_path: Path, mounts: ExitStack
) -> None:
    """A 20 MiB upload onto a 16 MiB disk is 507; staging is emptied, old artifacts still served."""
    data_dir = mount(mounts, tmp_path / "disk", "16m") + "/data"
    node = RealNode(data_dir).start()
    try:
        old = os.urandom(MiB)
        assert call(node, "PUT", GRADLE.format("old"), old)[0] == 201
        free_before = shutil.disk_usage(data_dir).free

        assert_disk_full_answer(*call(node, "PUT", GRADLE.format("huge"), os.urandom(20 * MiB)))

        # Clean-up may finish just after the answer went out.
        wait_for(
            lambda: (
                not staged_files(data_dir)
                and shutil.disk_usage(data_dir).free >= free_before - 64 * 1024
            ),
            what="the refused body's space returned",
        )
        assert call(node, "GET", GRADLE.format("huge"))[0] == 404
        assert call(node, "GET", GRADLE.format("old"))[2] == old
        assert fallback_get(node, GRADLE.format("old")) == (200, old)
        assert_alive(node)
        again = os.urandom(MiB)
        assert call(node, "PUT", GRADLE.format("again"), again)[0] == 201
        assert call(node, "GET", GRADLE.format("again"))[2] == again
    finally:
        node.kill()


def test_full_disk_refuses_small_uploads_until_space_returns(
    tmp_path: Path, mounts: ExitStack
) -> None:
    """With the disk filled by another file, 1 KiB uploads are 507 until it is removed."""
    data_dir = mount(mounts, tmp_path / "disk", "16m") + "/data"
    node = RealNode(data_dir).start()
    try:
        old = os.urandom(MiB)
        assert call(node, "POST", CAS.format("old"), old)[0] == 204
        filler = os.path.join(os.path.dirname(data_dir), "filler")
        fill(filler)
        assert shutil.disk_usage(data_dir).free == 0

        small = os.urandom(1024)
        assert_disk_full_answer(*call(node, "PUT", GRADLE.format("small"), small))
        assert_disk_full_answer(*call(node, "POST", CAS.format("small"), small))
        wait_for(lambda: not staged_files(data_dir), what="refused bodies removed from staging")
        assert call(node, "GET", CAS.format("old"))[2] == old
        assert fallback_get(node, CAS.format("old")) == (200, old)
        assert call(node, "GET", CAS.format("small"))[0] == 404
        assert_alive(node)

        os.unlink(filler)
        assert call(node, "PUT", GRADLE.format("small"), small)[0] == 201
        assert call(node, "POST", CAS.format("small"), small)[0] == 204
        assert call(node, "GET", GRADLE.format("small"))[2] == small
        assert call(node, "GET", CAS.format("small"))[2] == small
    finally:
        node.kill()


def test_full_metadata_filesystem_fails_writes_fast_and_keeps_reads(
    tmp_path: Path, mounts: ExitStack
) -> None:
    """SQLite's filesystem full, bodies' not: writes are a quick 507, reads work, no crash loop."""
    data_dir = mount(mounts, tmp_path / "data", "4m")
    os.makedirs(f"{data_dir}/blobs")
    mount(mounts, tmp_path / "data" / "blobs", "64m")
    node = RealNode(
        data_dir, KURA_TMP_DIR=str(tmp_path / "staging"), KURA_CAS_CAPACITY_BYTES=str(32 * MiB)
    ).start()
    pid = node.process.pid
    try:
        old = os.urandom(MiB)
        assert call(node, "PUT", GRADLE.format("old"), old)[0] == 201
        filler = f"{data_dir}/filler"
        fill(filler)

        for index in range(5):
            started = time.monotonic()
            status, _, body = call(node, "PUT", GRADLE.format(f"new{index}"), os.urandom(100_000))
            assert time.monotonic() - started < 2.0
            assert status == 507, (status, body)
            assert "metadata store is out of disk space" in json.loads(body)["message"]
        assert call(node, "GET", GRADLE.format("old"))[2] == old
        assert fallback_get(node, GRADLE.format("old")) == (200, old)
        assert len(blob_files(data_dir)) == 1  # refused bodies were not left behind
        assert_alive(node)
        assert node.process.pid == pid and "failed to start" not in node.log()

        os.unlink(filler)
        assert call(node, "PUT", GRADLE.format("after"), b"after")[0] == 201
        assert call(node, "GET", GRADLE.format("after"))[2] == b"after"
        assert call(node, "GET", GRADLE.format("new0"))[0] == 404
    finally:
        node.kill()


def test_fifty_concurrent_uploads_of_one_key_store_one_copy(tmp_path: Path) -> None:
    """Fifty PUTs of one key with identical bytes all succeed; one copy, one file, no staging."""
    data_dir = str(tmp_path / "data")
    node = RealNode(data_dir).start()
    body = os.urandom(2 * MiB)
    barrier = threading.Barrier(50)
    statuses: list[int] = []

    def upload() -> None:
        barrier.wait(30)
        statuses.append(call(node, "PUT", GRADLE.format("same"), body)[0])

    try:
        threads = [threading.Thread(target=upload) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(statuses) == [200] * 49 + [201]
        assert call(node, "GET", GRADLE.format("same"))[2] == body
        assert len(blob_files(data_dir)) == 1
        assert staged_files(data_dir) == []
        db = sqlite3.connect(f"file:{data_dir}/kura.sqlite3?mode=ro", uri=True)
        try:
            assert db.execute("SELECT COUNT(*) FROM manifests").fetchone()[0] == 1
        finally:
            db.close()
    finally:
        node.kill()

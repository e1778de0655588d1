"""Artifacts damaged behind the server's back are never served short; their records go."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, files_under, request, sample
from tests.support.corruption import flip_byte

GRADLE = "/api/cache/gradle/{key}?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them
#: (damage to bodies kept in the database: test_store_database_bodies.py).
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}
pytestmark = pytest.mark.node_environ(**FILES)


def blob_path(node: KuraNode) -> str:
    (relative,) = files_under(node.store.layout.blobs)
    return os.path.join(node.store.layout.blobs, relative)


def test_deleted_file_reads_as_a_miss_and_is_forgotten(node: KuraNode) -> None:
    """A blob file removed behind the server's back: GET is 404 and the record is dropped."""
    request(node, "PUT", GRADLE.format(key="g1"), b"x" * 100)
    os.unlink(blob_path(node))
    response = request(node, "GET", GRADLE.format(key="g1"))
    assert response.status == 404
    assert response.json() == {"message": "Artifact not found"}
    assert sample(node, "kura_damaged_artifacts_total") == 1
    assert node.store.metadata.used_bytes == 0
    # The record is gone, so the next upload stores the key afresh.
    assert request(node, "PUT", GRADLE.format(key="g1"), b"fresh").status == 201
    assert request(node, "GET", GRADLE.format(key="g1")).body == b"fresh"


def test_truncated_file_reads_as_a_miss_and_is_forgotten(node: KuraNode) -> None:
    """A blob file shorter than its manifest is never served as a short 200."""
    request(node, "PUT", GRADLE.format(key="g1"), b"x" * 100)
    path = blob_path(node)
    os.truncate(path, 40)
    response = request(node, "GET", GRADLE.format(key="g1"))
    assert response.status == 404
    assert sample(node, "kura_damaged_artifacts_total") == 1
    assert not os.path.exists(path)
    assert request(node, "GET", GRADLE.format(key="g1")).status == 404
    assert request(node, "PUT", GRADLE.format(key="g1"), b"fresh").status == 201


def test_damage_is_detected_for_every_blob_route(node: KuraNode) -> None:
    """CAS, Nx, Metro and module downloads all turn a missing file into a 404."""
    targets = [
        ("POST", "/api/cache/cas/c1?tenant_id=default"),
        ("PUT", "/v1/cache/n1"),
        ("PUT", "/api/metro/cache/m1"),
    ]
    for method, target in targets:
        request(node, method, target, b"body")
    for relative in files_under(node.store.layout.blobs):
        os.unlink(os.path.join(node.store.layout.blobs, relative))
    for _, target in targets:
        assert request(node, "GET", target).status == 404, target
    assert sample(node, "kura_damaged_artifacts_total") == 3


def test_file_truncated_during_a_download_never_looks_complete(nodes: Any) -> None:
    """A body that ends early closes the connection short of Content-Length, never 'success'."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner, **FILES)
    size = 600 * 1024
    request(node, "PUT", GRADLE.format(key="g1"), b"z" * size)
    runner.hold = lambda f: f is os.pread
    client = Exchange(node)
    client.send(f"GET {GRADLE.format(key='g1')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    os.truncate(blob_path(node), 100 * 1024)  # after the size check, before the reads
    while runner.held:
        runner.release()
    written = client.transport.value()
    assert written.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {size}".encode() in written
    assert client.responses() == []  # the body never reaches its declared length
    assert client.closed
    assert (
        sample(node, "kura_artifact_egress_completions_total", producer="gradle", result="ok") == 0
    )
    assert (
        sample(
            node, "kura_artifact_egress_completions_total", producer="gradle", result="incomplete"
        )
        == 1
    )
    runner.hold = lambda f: False
    assert request(node, "GET", GRADLE.format(key="g1")).status == 404


def test_missing_file_does_not_block_a_fresh_upload(node: KuraNode) -> None:
    """With the blob gone and no GET in between, the next upload stores afresh."""
    request(node, "PUT", GRADLE.format(key="g1"), b"x" * 100)
    os.unlink(blob_path(node))
    assert request(node, "PUT", GRADLE.format(key="g1"), b"fresh").status == 201
    assert request(node, "GET", GRADLE.format(key="g1")).body == b"fresh"
    module = "/api/cache/module/m?tenant_id=default&hash=h1&name=n1"
    assert request(node, "HEAD", module).status == 404


# -- bytes that no longer match the digest ----------------------------------------------


@pytest.mark.parametrize("size", [100, 200_000], ids=["small", "large"])
@pytest.mark.parametrize(
    ("method", "headers"),
    [("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-9"})],
    ids=["get", "head", "range"],
)
def test_a_flipped_byte_is_never_served_the_artifact_is_forgotten(
    node: KuraNode, size: int, method: str, headers: dict[str, str]
) -> None:
    """One byte changed in place: GET, HEAD and ranges all miss; the record and file go."""
    request(node, "PUT", GRADLE.format(key="g1"), os.urandom(size))
    path = blob_path(node)
    flip_byte(path, offset=size // 2)
    response = request(node, method, GRADLE.format(key="g1"), headers=headers)
    assert response.status == 404
    assert method == "HEAD" or response.json() == {"message": "Artifact not found"}
    assert sample(node, "kura_damaged_artifacts_total") == 1
    assert sample(node, "kura_corrupt_artifacts_total") == 1
    assert not os.path.exists(path)
    assert node.store.metadata.used_bytes == 0
    assert request(node, "GET", GRADLE.format(key="g1")).status == 404
    # No peer to fetch it from: it stays a miss, and an upload stores it afresh.
    assert sample(node, "kura_artifact_repairs_total", result="unavailable") == 1
    assert request(node, "PUT", GRADLE.format(key="g1"), b"fresh").status == 201
    assert request(node, "GET", GRADLE.format(key="g1")).body == b"fresh"


def test_a_byte_flipped_after_a_verified_read_is_caught_at_the_next_read(node: KuraNode) -> None:
    """A file served (and remembered as verified) that changes later is hashed again."""
    node.store.verifier.wall = lambda: time.time() + 3600  # nothing racy: remembered
    body = os.urandom(50_000)
    request(node, "PUT", GRADLE.format(key="g1"), body)
    assert request(node, "GET", GRADLE.format(key="g1")).body == body
    assert len(node.store.verifier) == 1
    assert request(node, "GET", GRADLE.format(key="g1")).body == body
    flip_byte(blob_path(node))
    assert request(node, "GET", GRADLE.format(key="g1")).status == 404
    assert sample(node, "kura_corrupt_artifacts_total") == 1
    assert len(node.store.verifier) == 0


def test_a_verified_file_is_served_without_hashing_it_again(nodes: Any) -> None:
    """Once remembered, a read only compares the file's stamp: no storage-thread read."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner, **FILES)
    node.store.verifier.wall = lambda: time.time() + 3600
    body = os.urandom(200_000)
    request(node, "PUT", GRADLE.format(key="g1"), body)
    assert request(node, "GET", GRADLE.format(key="g1")).body == body
    assert runner.calls.count("_check_copy") == 1
    for _ in range(3):
        assert request(node, "GET", GRADLE.format(key="g1")).body == body
    assert runner.calls.count("_check_copy") == 1


def test_a_client_that_leaves_during_the_check_still_gets_damage_forgotten(nodes: Any) -> None:
    """The hash runs on a storage thread; the client going away does not stop the verdict."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner, **FILES)
    request(node, "PUT", GRADLE.format(key="g1"), os.urandom(200_000))
    flip_byte(blob_path(node))
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "_check_copy"
    client = Exchange(node)
    client.send(f"GET {GRADLE.format(key='g1')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    assert len(runner.held) == 1
    client.disconnect()
    runner.release()
    assert sample(node, "kura_corrupt_artifacts_total") == 1
    assert files_under(node.store.layout.blobs) == []


def test_a_verified_read_asks_the_file_system_once(
    node: KuraNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size check and the verified-state check share one ``fstat`` of the open file."""
    node.store.verifier.wall = lambda: time.time() + 3600
    body = os.urandom(5000)
    request(node, "PUT", GRADLE.format(key="g1"), body)
    assert request(node, "GET", GRADLE.format(key="g1")).body == body  # verified and remembered
    calls: list[int] = []
    fstat = os.fstat

    def counting(fd: int) -> os.stat_result:
        calls.append(fd)
        return fstat(fd)

    monkeypatch.setattr(os, "fstat", counting)
    assert request(node, "GET", GRADLE.format(key="g1")).body == body
    assert len(calls) == 1

"""Artifacts damaged behind the server's back are never served short; their records go."""

from __future__ import annotations

import os
from typing import Any

from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, files_under, request, sample

GRADLE = "/api/cache/gradle/{key}?tenant_id=default"


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
    node = nodes.start(runner=runner)
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

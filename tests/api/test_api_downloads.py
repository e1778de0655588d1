"""Artifact downloads on the twisted.web path: HEAD, aborted transfers, descriptors."""

from __future__ import annotations

import os
from typing import Any

from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, request, sample
from kura.web.download import SMALL_BODY_BYTES

GRADLE = "/api/cache/gradle/{key}?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


def open_blob_descriptors(node: KuraNode) -> int:
    """How many descriptors of this process point at ``node``'s artifact files."""
    blobs = node.store.layout.blobs
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(blobs)
    return count


def test_head_on_download_routes_has_get_headers_and_no_body(nodes: Any) -> None:
    """HEAD on a GET route answers the GET's status and headers with an empty body."""
    node = nodes.start()
    request(node, "PUT", GRADLE.format(key="g1"), b"12345")
    kv = b'{"cas_id":"k","entries":[{"value":"v"}]}'
    request(node, "PUT", "/api/cache/keyvalue?tenant_id=default", kv)
    hit = request(node, "HEAD", GRADLE.format(key="g1"))
    assert hit.status == 200
    assert hit.headers["content-length"] == "5"
    assert hit.headers["etag"]
    assert hit.body == b""
    miss = request(node, "HEAD", GRADLE.format(key="nope"))
    assert miss.status == 404
    assert miss.body == b""
    assert request(node, "HEAD", "/api/cache/keyvalue/k?tenant_id=default").status == 200


def test_client_leaving_mid_download_is_499_and_frees_the_file(nodes: Any) -> None:
    """A download abandoned by its client is counted (499, client_aborted) and its fd closed."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    size = 1024 * 1024 + 1
    request(node, "PUT", GRADLE.format(key="g1"), b"d" * size)
    runner.hold = lambda f: f is os.pread
    client = Exchange(node)
    client.send(f"GET {GRADLE.format(key='g1')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    runner.release()  # the first chunk is written
    assert open_blob_descriptors(node) == 1
    client.disconnect()
    while runner.held:
        runner.release()
    assert open_blob_descriptors(node) == 0
    route = "/api/cache/gradle/{cache_key}"
    assert sample(node, "kura_http_requests_total", route=route, status="499") == 1
    assert (
        sample(
            node,
            "kura_artifact_egress_completions_total",
            producer="gradle",
            result="client_aborted",
        )
        == 1
    )
    assert sample(node, "kura_public_http_inflight_requests") == 0
    assert sample(node, "kura_http_inflight_requests") == 0


def test_completed_downloads_release_their_descriptors(nodes: Any) -> None:
    """Many full, ranged and HEAD downloads leave no descriptor open."""
    node = nodes.start()
    request(node, "PUT", GRADLE.format(key="g1"), b"x" * 1000)
    for headers in ({}, {"Range": "bytes=10-19"}, {"Range": "bytes=5000-"}):
        for _ in range(5):
            request(node, "GET", GRADLE.format(key="g1"), headers=headers)
            request(node, "HEAD", GRADLE.format(key="g1"), headers=headers)
    assert open_blob_descriptors(node) == 0


def test_head_deadline_answers_408_and_closes(nodes: Any) -> None:
    """A request head not complete within KURA_HEADER_TIMEOUT_MS gets 408 and a close."""
    node = nodes.start(KURA_HEADER_TIMEOUT_MS="5000")
    client = Exchange(node)
    client.send(b"GET /up HTTP/1.1\r\nHost: ku")
    node.reactor.advance(4)
    client.send(b"r")  # trickling bytes does not extend the deadline
    assert client.responses() == []
    node.reactor.advance(1.5)
    (response,) = client.responses()
    assert response.status == 408
    assert client.closed


def test_small_bodies_are_read_without_a_storage_thread(nodes: Any) -> None:
    """Up to SMALL_BODY_BYTES a body file is read on the reactor thread; above, on the runner."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner, **FILES)
    small, large = b"s" * SMALL_BODY_BYTES, b"l" * (SMALL_BODY_BYTES + 1)
    request(node, "PUT", GRADLE.format(key="small"), small)
    request(node, "PUT", GRADLE.format(key="large"), large)
    runner.hold = lambda f: f is os.pread

    client = Exchange(node)
    client.send(f"GET {GRADLE.format(key='small')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    (response,) = client.responses()
    assert (response.status, response.body) == (200, small)
    assert response.headers["content-length"] == str(len(small))
    assert not runner.held
    assert open_blob_descriptors(node) == 0

    client.send(f"GET {GRADLE.format(key='large')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    assert runner.held  # the large body waits for a storage thread
    while runner.held:
        runner.release()
    (response,) = client.responses()
    assert (response.status, response.body) == (200, large)
    assert open_blob_descriptors(node) == 0
    labels = {"producer": "gradle", "result": "ok"}
    assert sample(node, "kura_artifact_egress_completions_total", **labels) == 2
    assert sample(node, "kura_artifact_reads_total", **labels) == 2
    assert sample(node, "kura_artifact_egress_bytes_total", **labels) == len(small) + len(large)


def test_a_database_body_held_in_memory_is_read_without_a_storage_thread(nodes: Any) -> None:
    """A small body kept in the database is answered from memory while held; once
    dropped, from one storage-thread read."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    small = b"s" * 1000
    request(node, "PUT", GRADLE.format(key="small"), small)
    runner.hold = lambda f: True
    get = f"GET {GRADLE.format(key='small')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode()

    client = Exchange(node)
    client.send(get)
    (response,) = client.responses()
    assert (response.status, response.body) == (200, small)
    assert not runner.held

    node.store.bodies.clear()
    client.send(get)
    assert client.responses() == []
    assert len(runner.held) == 1  # read back from SQLite
    runner.hold = lambda f: False
    runner.release()
    (response,) = client.responses()
    assert (response.status, response.body) == (200, small)


def test_a_small_body_cut_short_on_disk_closes_the_connection(nodes: Any) -> None:
    """A small file that ends before its length (changed after it was opened and
    verified) is never padded."""
    node = nodes.start(**FILES)
    request(node, "PUT", GRADLE.format(key="g1"), b"x" * 1000)
    store: Any = node.store
    verify_open = store.verify_open

    async def verify_then_truncate(manifest: Any, fd: int, *status: Any) -> bool:
        intact = await verify_open(manifest, fd, *status)
        os.truncate(store.layout.absolute(manifest.blob_path), 10)
        return bool(intact)

    store.verify_open = verify_then_truncate
    client = Exchange(node)
    client.send(f"GET {GRADLE.format(key='g1')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    assert client.closed
    labels = {"producer": "gradle", "result": "incomplete"}
    assert sample(node, "kura_artifact_egress_completions_total", **labels) == 1
    assert open_blob_descriptors(node) == 0

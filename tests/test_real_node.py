"""``twistd kura`` as a real process on loopback: protocols, writer lock, crashes."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kura.domain.failpoints import EXIT_STATUS
from kura.storage.lock import LOCK_FILE_NAME
from kura.testing import files_under
from tests.support.real import RealNode
from tests.support.stored import stored_bodies

pytestmark = pytest.mark.realnode


class Http:
    """A tiny http.client wrapper: one new connection per call, as urllib would."""

    def __init__(self, node: RealNode) -> None:
        self.port = node.port

    def __call__(
        self,
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            chunked = body is not None and not isinstance(body, bytes)
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    return str(tmp_path / "data")


@pytest.fixture
def node(data_dir: str) -> Iterator[RealNode]:
    started = RealNode(data_dir).start()
    yield started
    started.kill()


def test_one_round_trip_per_protocol(node: RealNode) -> None:
    """A real node serves CAS, key-value, Gradle, module multipart, Nx and chunked Metro."""
    call = Http(node)
    tenant = "tenant_id=default"

    assert call("POST", f"/api/cache/cas/c1?{tenant}", b"cas-bytes")[0] == 204
    status, headers, body = call("GET", f"/api/cache/cas/c1?{tenant}")
    assert (status, body) == (200, b"cas-bytes")
    assert headers["content-type"] == "application/octet-stream"

    kv = json.dumps({"cas_id": "k1", "entries": [{"value": "x"}]}).encode()
    assert call("PUT", f"/api/cache/keyvalue?{tenant}", kv)[0] == 204
    status, _, body = call("GET", f"/api/cache/keyvalue/k1?{tenant}")
    assert (status, body) == (200, b'{"entries":[{"value":"x"}]}')

    assert call("PUT", f"/api/cache/gradle/g1?{tenant}", b"gradle")[0] == 201
    assert call("PUT", f"/api/cache/gradle/g1?{tenant}", b"gradle")[0] == 200
    assert call("GET", f"/api/cache/gradle/g1?{tenant}")[2] == b"gradle"

    query = f"{tenant}&hash=h1&name=App.framework"
    status, _, body = call("POST", f"/api/cache/module/start?{query}")
    assert status == 200
    upload_id = json.loads(body)["upload_id"]
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number={{}}"
    assert call("POST", part.format(2), b"-part-two")[0] == 204
    assert call("POST", part.format(1), b"part-one")[0] == 204
    done = call(
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts":[1,2]}',
        {"Content-Type": "application/json"},
    )
    assert done[0] == 204
    assert call("HEAD", f"/api/cache/module/module-1?{query}")[0] == 204
    status, headers, body = call("GET", f"/api/cache/module/module-1?{query}")
    assert (status, headers["content-length"], body) == (200, "17", b"part-one-part-two")

    assert call("PUT", "/v1/cache/nx1", b"nx")[0] == 200
    assert call("PUT", "/v1/cache/nx1", b"nx")[0] == 200
    assert call("GET", "/v1/cache/nx1")[2] == b"nx"

    chunks = iter([b"metro-", b"bundle"])
    assert call("PUT", "/api/metro/cache/m1", chunks, {"Transfer-Encoding": "chunked"})[0] == 200
    status, headers, body = call("GET", "/api/metro/cache/m1")
    assert (status, headers["content-length"], body) == (200, "12", b"metro-bundle")

    status, headers, body = call("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b'kura_http_requests_total{route="/api/cache/cas/{id}",status="204"} 1.0' in body
    assert call("GET", "/ready")[0] == 200


def test_metrics_carry_the_standard_process_and_python_series(node: RealNode) -> None:
    """process_* and python_* as every Python exporter has them; no _created series."""
    status, _, body = Http(node)("GET", "/metrics")
    assert status == 200
    names = {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines()}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert {"process_open_fds", "python_gc_collections_total"} <= names
    assert not [name for name in names if name.endswith("_created")]


def test_second_process_on_the_same_data_dir_exits_naming_the_lock(
    node: RealNode, data_dir: str
) -> None:
    """A second node on a locked data dir exits non-zero naming the lock; the first serves on."""
    second = RealNode(data_dir)
    second.log_path = data_dir + ".second.log"
    with pytest.raises(RuntimeError):
        second.start(timeout=15)
    assert second.process.returncode != 0
    assert os.path.join(data_dir, LOCK_FILE_NAME) in second.log()
    call = Http(node)
    assert call("POST", "/api/cache/cas/after?tenant_id=default", b"still")[0] == 204
    assert call("GET", "/ready")[0] == 200


#: Each step of both publish paths. A body received in memory is stored in the
#: database with its manifest, so its bytes and metadata become durable in one
#: commit: after_bytes_durable_before_metadata is a step of staged bodies only.
PUBLISH_STEPS = [
    pytest.param(point, survives, kept, id=f"{point}-{survives}-{kind}")
    for kind, kept in (("in-memory", b"k"), ("staged", b"s" * (256 * 1024)))
    for point, survives in (
        ("before_fsync", False),
        ("after_bytes_durable_before_metadata", False),
        ("after_metadata_commit_before_ack", True),
    )
    if (kind, point) != ("in-memory", "after_bytes_durable_before_metadata")
]


@pytest.mark.parametrize(("point", "survives", "kept"), PUBLISH_STEPS)
def test_crash_at_each_publish_step(data_dir: str, point: str, survives: bool, kept: bytes) -> None:
    """Killed at a publish step, a restarted node has the whole artifact or none of it.

    Both publish paths: a small body stored in the database in the transaction
    that records its manifest, and a large one staged, then renamed.
    """
    body = os.urandom(64 * 1024)
    crashing = RealNode(data_dir, KURA_FAILPOINTS=f"{point}:exit").start()
    try:
        call = Http(crashing)
        assert call("POST", "/api/cache/cas/kept?tenant_id=default", kept)[0] != 204
    except (http.client.HTTPException, ConnectionError):
        pass  # the process died under the request
    finally:
        assert crashing.process.wait(15) == EXIT_STATUS
    restarted = RealNode(data_dir).start()
    try:
        restarted.wait_until_swept()  # the orphan, if any, is removed in the background
        call = Http(restarted)
        status, _, got = call("GET", "/api/cache/cas/kept?tenant_id=default")
        if survives:
            assert (status, got) == (200, kept)
            assert sum(stored_bodies(data_dir)) == 1
        else:
            assert status == 404
            assert sum(stored_bodies(data_dir)) == 0
        assert files_under(os.path.join(data_dir, "tmp", "uploads")) == []
        assert call("POST", "/api/cache/cas/other?tenant_id=default", body)[0] == 204
        assert call("GET", "/api/cache/cas/other?tenant_id=default")[2] == body
    finally:
        assert restarted.stop() == 0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (bounded); fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_kill_mid_upload_publishes_nothing(data_dir: str) -> None:
    """SIGKILL with half a body staged: after restart, 404, staging wiped, a retry works."""
    first = RealNode(data_dir).start()
    uploads = os.path.join(data_dir, "tmp", "uploads")
    with socket.create_connection(("127.0.0.1", first.port), timeout=10) as sock:
        sock.sendall(
            b"PUT /api/cache/gradle/g1?tenant_id=default HTTP/1.1\r\nHost: kura\r\n"
            b"Content-Length: 1048576\r\n\r\n" + b"x" * 600_000
        )
        wait_for(lambda: files_under(uploads) != [])
        first.kill()
    restarted = RealNode(data_dir).start()
    try:
        call = Http(restarted)
        assert call("GET", "/api/cache/gradle/g1?tenant_id=default")[0] == 404
        assert files_under(uploads) == []
        assert call("PUT", "/api/cache/gradle/g1?tenant_id=default", b"y" * 1000)[0] == 201
        assert call("GET", "/api/cache/gradle/g1?tenant_id=default")[2] == b"y" * 1000
    finally:
        assert restarted.stop() == 0

"""A real three-node mesh of ``twistd kura`` processes on loopback (marker ``realnode``).

The nodes share one internal port on their own loopback addresses
(127.0.0.2-4), as pods share one port in a StatefulSet. The tests run in
file order against one mesh (starting it costs a settle window); tests that
stop or kill a node bring it back before they end. Convergence is always
polled with a bounded deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from kura.domain.artifacts import Producer
from kura.replication import wire
from tests.support.mesh import (
    HOSTS,
    MeshNode,
    get_json,
    is_ready,
    mesh,
    metrics,
    request,
    signed_headers,
    start_all,
    wait_for,
)

pytestmark = pytest.mark.realnode

MiB = 1024 * 1024
LIMIT = 16 * MiB
TENANT = "tenant_id=default"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: Any) -> Iterator[list[MeshNode]]:
    """Three nodes, static peers, replication at 16 MiB/s (floor 1 MiB/s), 3 s stall limit."""
    root = str(tmp_path_factory.mktemp("mesh"))
    built = mesh(
        root,
        3,
        KURA_REPLICATION_UPLOAD_STALL_MS="3000",
        KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND=str(LIMIT),
        # Below LIMIT / 8, so the in-flight divisor shows in the effective rate.
        KURA_REPLICATION_MIN_BYTES_PER_SECOND=str(MiB),
        KURA_LOG_FORMAT="text",
    )
    try:
        start_all(built, timeout=60)
        yield built
    finally:
        for node in built:
            node.stop()


def fetch(node: MeshNode, path: str) -> tuple[int, bytes]:
    status, _, body = request("GET", node.url + path)
    return status, body


def has(node: MeshNode, path: str, body: bytes) -> bool:
    """Whether ``path`` is served byte-exact; a 200 with other bytes fails at once."""
    status, served = fetch(node, path)
    if status == 200:
        assert served == body, f"{node.url}{path} served {len(served)} other bytes"
        return True
    return False


def blob_count(node: MeshNode) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(node.data_dir, "blobs")))


def outbox_empty(*nodes: MeshNode) -> bool:
    return all(get_json(n.url + "/status/rollout")["outbox_messages"] == 0 for n in nodes)


def chunked_put(node: MeshNode, path: str, chunks: list[bytes]) -> int:
    connection = http.client.HTTPConnection(node.host, node.port, timeout=30)
    try:
        connection.request(
            "PUT",
            path,
            body=iter(chunks),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_every_protocol_written_on_a_is_byte_exact_on_b_and_c(nodes: list[MeshNode]) -> None:
    """Xcode CAS, key-value, Gradle, module multipart, Nx and chunked Metro writes replicate."""
    a, b, c = nodes
    cas, gradle, nx = os.urandom(70_000), os.urandom(3 * MiB + 5), os.urandom(1000)
    parts = [os.urandom(MiB), os.urandom(MiB // 2)]
    metro = [os.urandom(40_000), os.urandom(90_000)]
    kv = json.dumps({"cas_id": "kv1", "entries": [{"value": "hello"}]}).encode()
    assert request("POST", a.url + f"/api/cache/cas/cas1?{TENANT}", cas)[0] == 204
    assert request("PUT", a.url + f"/api/cache/keyvalue?{TENANT}", kv)[0] == 204
    assert request("PUT", a.url + f"/api/cache/gradle/g1?{TENANT}", gradle)[0] == 201
    assert request("PUT", a.url + "/v1/cache/nx1", nx)[0] == 200
    assert chunked_put(a, "/api/metro/cache/m1", metro) == 200
    module = f"{TENANT}&hash=h1&name=App&cache_category=builds"
    started = json.loads(request("POST", a.url + f"/api/cache/module/start?{module}")[2])
    upload = started["upload_id"]
    for number, part in enumerate(parts, 1):
        part_url = f"/api/cache/module/part?upload_id={upload}&part_number={number}"
        assert request("POST", a.url + part_url, part)[0] == 204
    complete = request(
        "POST",
        a.url + f"/api/cache/module/complete?upload_id={upload}",
        b'{"parts":[1,2]}',
        {"Content-Type": "application/json"},
    )
    assert complete[0] == 204
    expected = {
        f"/api/cache/cas/cas1?{TENANT}": cas,
        f"/api/cache/keyvalue/kv1?{TENANT}": b'{"entries":[{"value":"hello"}]}',
        f"/api/cache/gradle/g1?{TENANT}": gradle,
        "/v1/cache/nx1": nx,
        "/api/metro/cache/m1": b"".join(metro),
        f"/api/cache/module/module-1?{module}": b"".join(parts),
    }
    for node in (b, c):
        for path, body in expected.items():
            wait_for(f"{path} on {node.host}", lambda n=node, p=path, d=body: has(n, p, d), 30)
    wait_for("outboxes drained", lambda: outbox_empty(a, b, c), 30)


def test_the_same_delivery_twice_stores_once(nodes: list[MeshNode]) -> None:
    """A replication PUT sent twice is applied once; the second is 204 without its body."""
    _, b, _ = nodes
    body = os.urandom(200_000)
    message = wire.UpsertMessage(
        Producer.GRADLE, "", "twice", "application/octet-stream", False, 1_000
    )
    target = wire.url(b.internal_url, wire.REPLICATE_ARTIFACT_PATH, message.params())
    files = blob_count(b)
    before = metrics(b)
    # Two deliveries of one message are two signed requests (a peer retrying).
    assert request("PUT", target, body, signed_headers("PUT", target, body))[0] == 204
    assert request("PUT", target, body, signed_headers("PUT", target, body))[0] == 204
    after = metrics(b)
    key = (
        'kura_replication_apply_results_total{{item_type="artifact",'
        'outcome="{}",source="replication"}}'
    )
    assert after[key.format("applied")] - before.get(key.format("applied"), 0) == 1
    assert after[key.format("ignored_equal")] - before.get(key.format("ignored_equal"), 0) == 1
    assert blob_count(b) == files + 1
    assert has(b, f"/api/cache/gradle/twice?{TENANT}", body)


def test_a_clean_on_c_is_404_everywhere_and_nothing_comes_back(nodes: list[MeshNode]) -> None:
    """Clean on C reaches A and B; once every outbox drained it is still 404 everywhere."""
    a, b, c = nodes
    space = f"{TENANT}&namespace_id=proj1"
    paths = [f"/api/cache/cas/c{n}?{space}" for n in range(5)]
    for path in paths:
        assert request("POST", a.url + path, b"to be cleaned")[0] == 204
    for node in (b, c):
        for path in paths:
            wait_for("replicated", lambda n=node, p=path: has(n, p, b"to be cleaned"), 30)
    assert request("DELETE", c.url + f"/api/cache/clean?{space}")[0] == 204
    for node in (a, b, c):
        for path in paths:
            wait_for("cleaned", lambda n=node, p=path: fetch(n, p)[0] == 404, 30)
    wait_for("outboxes drained", lambda: outbox_empty(a, b, c), 30)
    for node in (a, b, c):
        for path in paths:
            assert fetch(node, path)[0] == 404


def test_a_peer_stopped_during_writes_catches_up_after_restart(nodes: list[MeshNode]) -> None:
    """C is stopped while A takes writes; restarted, it serves them, and its writes flow back."""
    a, _, c = nodes
    assert c.stop() == 0
    kv = json.dumps({"cas_id": "kv2", "entries": [{"value": "while away"}]}).encode()
    cas = os.urandom(500_000)
    assert request("PUT", a.url + f"/api/cache/keyvalue?{TENANT}", kv)[0] == 204
    assert request("POST", a.url + f"/api/cache/cas/away?{TENANT}", cas)[0] == 204
    c.start()
    wait_for("C has the CAS blob", lambda: has(c, f"/api/cache/cas/away?{TENANT}", cas), 40)
    kv_path = f"/api/cache/keyvalue/kv2?{TENANT}"
    wait_for("C has the entry", lambda: fetch(c, kv_path)[0] == 200, 40)
    assert request("PUT", c.url + f"/api/cache/gradle/back?{TENANT}", b"from C")[0] == 201
    wait_for("A has C's write", lambda: has(a, f"/api/cache/gradle/back?{TENANT}", b"from C"), 30)
    wait_for("C ready", lambda: is_ready(c, 2), 40)


def test_a_sigstopped_peer_catches_up_after_sigcont(nodes: list[MeshNode]) -> None:
    """Uploads to a frozen peer stall and back off; after SIGCONT the writes arrive."""
    a, b, _ = nodes
    body = os.urandom(4 * MiB)
    b.signal(signal.SIGSTOP)
    try:
        assert request("PUT", a.url + f"/api/cache/gradle/frozen?{TENANT}", body)[0] == 201
        wait_for(
            "A notices the stall",
            lambda: any(
                k.startswith("kura_replication_requests_total")
                and b.host in k
                and 'result="error"' in k
                for k in metrics(a)
            ),
            20,
        )
    finally:
        b.signal(signal.SIGCONT)
    wait_for("B has it", lambda: has(b, f"/api/cache/gradle/frozen?{TENANT}", body), 70)


def test_kill_9_mid_ingest_leaves_nothing_partial_and_the_retry_succeeds(
    nodes: list[MeshNode],
) -> None:
    """B is killed while it stages a replicated body; after restart it has all or nothing."""
    a, b, _ = nodes
    body = os.urandom(48 * MiB)  # three seconds at the 16 MiB/s cap
    path = f"/api/cache/gradle/big?{TENANT}"
    assert request("PUT", a.url + path, body)[0] == 201

    def staging() -> bool:
        return metrics(b).get("kura_tmp_dir_bytes", 0) > 0

    wait_for("B staging the body", staging, 20, interval=0.02)
    b.kill()
    assert fetch(a, path)[0] == 200
    # Nothing of the interrupted body was published: no manifest names it.
    db = sqlite3.connect(f"file:{b.data_dir}/kura.sqlite3?mode=ro", uri=True)
    try:
        keys = [row[0] for row in db.execute("SELECT key FROM manifests")]
    finally:
        db.close()
    assert "big" not in keys
    b.start()
    wait_for("B has the whole body", lambda: has(b, path, body), 60)
    wait_for("B ready", lambda: is_ready(b, 2), 40)


def test_a_node_joining_late_catches_up_and_only_then_turns_ready(
    nodes: list[MeshNode], tmp_path: Any
) -> None:
    """D starts after the writes; /ready turns 200 only once D serves all of them."""
    a, _, _ = nodes
    bodies = {f"/api/cache/gradle/late{n}?{TENANT}": os.urandom(2 * MiB) for n in range(16)}
    for path, body in bodies.items():
        assert request("PUT", a.url + path, body)[0] == 201
    port = nodes[0].internal_port
    seeds = ",".join(n.internal_url for n in nodes)
    late = MeshNode(
        f"{tmp_path}/late",
        HOSTS[3],
        port,
        KURA_PEERS=seeds,
        KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND=str(LIMIT),
    )
    late.start()
    try:
        answers: list[bool] = []

        def ready() -> bool:
            answers.append(is_ready(late, 3))
            return answers[-1]

        wait_for("D ready", ready, 60)
        assert answers[0] is False  # joining while it caught up
        for path, body in bodies.items():
            assert has(late, path, body), path
    finally:
        assert late.stop() == 0


def test_a_peer_of_another_tenant_is_never_admitted(nodes: list[MeshNode], tmp_path: Any) -> None:
    """A node of another tenant seeded with the mesh never admits it, nor receives its writes."""
    a, b, c = nodes
    foreign = MeshNode(
        f"{tmp_path}/foreign",
        HOSTS[4],
        a.internal_port,
        KURA_PEERS=",".join(n.internal_url for n in nodes),
        KURA_TENANT_ID="other",
    )
    foreign.start()
    try:
        wait_for("two discovery rounds", lambda: is_ready(foreign), 20)
        wait_for("a later round", lambda: get_json(foreign.url + "/ready")["known_peers"] == 0, 5)
        ring = get_json(foreign.url + "/up")["ring_members"]
        assert ring == 1
        assert request("PUT", a.url + f"/api/cache/gradle/t1?{TENANT}", b"mine")[0] == 201
        wait_for("B has it", lambda: has(b, f"/api/cache/gradle/t1?{TENANT}", b"mine"), 20)
        assert fetch(foreign, "/api/cache/gradle/t1?tenant_id=other")[0] == 404
        message = wire.UpsertMessage(Producer.GRADLE, "", "t2", "x/y", False, 5)
        target = wire.url(a.internal_url, wire.REPLICATE_ARTIFACT_PATH, message.params())
        intruder = signed_headers("PUT", target, b"intruder", tenant="other")
        assert request("PUT", target, b"intruder", intruder)[0] == 403
        for node in (a, b, c):
            assert get_json(node.url + "/ready")["known_peers"] == 2
    finally:
        foreign.stop()


def test_public_downloads_lower_the_replication_rate_until_they_stop(
    nodes: list[MeshNode],
) -> None:
    """Seven downloads in flight divide the ceiling by 8; it recovers when they end."""
    a, _, _ = nodes
    body = os.urandom(32 * MiB)
    path = f"/api/cache/gradle/download?{TENANT}"
    assert request("PUT", a.url + path, body)[0] == 201
    gauge = "kura_replication_bandwidth_effective_limit_bytes_per_second"
    wait_for("idle ceiling", lambda: metrics(a)[gauge] == LIMIT, 10)
    readers = []
    try:
        for _ in range(7):
            # A client that reads only the first bytes keeps its download in flight.
            sock = socket.create_connection((a.host, a.port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            readers.append(sock)
        lowered = wait_for("the rate drops", lambda: metrics(a)[gauge] <= LIMIT / 8, 10)
        assert lowered
    finally:
        for sock in readers:
            sock.close()
    wait_for("the rate recovers", lambda: metrics(a)[gauge] == LIMIT, 30)

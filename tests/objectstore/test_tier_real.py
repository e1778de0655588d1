"""The object-store tier end to end: real ``twistd kura`` processes against moto's S3 server.

Every path of issue 18: uploads after writes, a node killed before its
queue drained, a store that is away and comes back, a fresh node reading
everything through, single-flight fetches, cleans and deletes seen through
the store, a corrupt object, eviction that loses nothing, the queue's cap,
start-up refusals, and the per-operation metrics.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kura.domain.failpoints import EXIT_STATUS
from tests.support.mesh import get_json, metrics, request, wait_for
from tests.support.real import RealNode
from tests.support.s3 import MotoS3, tier_environ

pytestmark = pytest.mark.realnode

NS = "tenant_id=default&namespace_id=app"
#: A ccache entry (ccache names entries by a 40-hex hash).
CCACHE = "/ccache/" + "3" * 40
#: A fast follower, so cleans made elsewhere show up within a test.
FAST_POLL = {"KURA_OBJECT_STORE_TOMBSTONE_POLL_MS": "100"}


def cas(key: str) -> str:
    return f"/api/cache/cas/{key}?{NS}"


def put(node: RealNode, key: str, body: bytes) -> int:
    return request("POST", node.url + cas(key), body)[0]


def get(node: RealNode, key: str) -> tuple[int, bytes]:
    status, _, body = request("GET", node.url + cas(key))
    return status, body


def queued(node: RealNode) -> int:
    return int(get_json(node.url + "/status/rollout")["object_store_uploads"])


def drained(node: RealNode) -> bool:
    return queued(node) == 0


def comes_back(store: MotoS3, bucket: str, node: RealNode) -> None:
    """Start ``store`` (away until now) with ``bucket``; wait until ``node`` drained its queue.

    The caller stops ``store``.
    """
    store.start()
    store.client.create_bucket(Bucket=bucket)
    wait_for("the queue to drain", lambda: drained(node), timeout=90)


def test_a_write_is_uploaded_with_its_manifest_and_checksum(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """A write is acknowledged, then its object appears with version, digest and checksum."""
    node = nodes("a", **tier_environ(moto_s3.endpoint, bucket))
    body = b"artifact bytes" * 100
    assert put(node, "c1", body) == 204
    wait_for("the upload", lambda: drained(node) and moto_s3.keys(bucket, "cache/ns/"))
    (key,) = moto_s3.keys(bucket, "cache/ns/")
    assert key.startswith("cache/ns/_app/")
    head = moto_s3.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    digest = hashlib.sha256(body).hexdigest()
    assert head["Metadata"]["kura-sha256"] == digest
    assert int(head["Metadata"]["kura-version"]) > 0
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digest)).decode()
    stored = moto_s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert stored == body
    samples = metrics(node)
    assert samples['kura_object_store_requests_total{operation="put",result="ok"}'] >= 1
    assert samples['kura_object_store_request_duration_seconds_count{operation="put"}'] >= 1


def test_a_fresh_node_reads_through_everything_another_wrote(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """An empty node serves small, large and key-value artifacts written by another node."""
    env = tier_environ(moto_s3.endpoint, bucket)
    writer = nodes("writer", **env)
    small, large = b"s" * 100, bytes(range(256)) * 4096  # 1 MiB: a staged body
    assert put(writer, "small", small) == 204
    assert put(writer, "large", large) == 204
    kv = json.dumps({"cas_id": "k1", "entries": [{"value": "x"}]}).encode()
    assert request("PUT", writer.url + f"/api/cache/keyvalue?{NS}", kv)[0] == 204
    wait_for("the uploads", lambda: drained(writer))

    reader = nodes("reader", **env)
    assert get(reader, "small") == (200, small)
    assert get(reader, "large") == (200, large)
    status, _, value = request("GET", reader.url + f"/api/cache/keyvalue/k1?{NS}")
    assert (status, value) == (200, b'{"entries":[{"value":"x"}]}')
    assert get(reader, "never-written")[0] == 404
    samples = metrics(reader)
    assert samples['kura_object_store_read_through_total{result="hit"}'] == 3
    assert samples['kura_object_store_read_through_total{result="miss"}'] == 1
    # Published locally: the second read is a local hit, no new store request.
    gets = samples['kura_object_store_requests_total{operation="get",result="ok"}']
    assert get(reader, "large") == (200, large)
    assert metrics(reader)['kura_object_store_requests_total{operation="get",result="ok"}'] == gets
    # Read-through copies are not uploaded again.
    assert queued(reader) == 0


def test_concurrent_misses_fetch_once(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """Eight simultaneous misses of one artifact make one store GET and all get the body."""
    env = tier_environ(moto_s3.endpoint, bucket)
    writer = nodes("writer", **env)
    body = b"x" * 3_000_000
    assert put(writer, "shared", body) == 204
    wait_for("the upload", lambda: drained(writer))
    reader = nodes("reader", **env)
    answers: list[tuple[int, bytes]] = []
    barrier = threading.Barrier(8)

    def fetch() -> None:
        barrier.wait()
        answers.append(get(reader, "shared"))

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [(200, body)] * 8
    assert metrics(reader)['kura_object_store_requests_total{operation="get",result="ok"}'] == 1


def test_a_node_killed_before_uploading_uploads_after_restart(
    moto_s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    """Rows queued while the store was unreachable survive SIGKILL and drain after restart."""
    down = MotoS3()  # never started: its port refuses connections
    node = RealNode(str(tmp_path / "a"), **tier_environ(down.endpoint, bucket))
    node.start()
    try:
        # Side by side, while the uploader fails and retries: the count stays exact.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: put(node, f"k{i}", b"body %d" % i), range(40)))
        assert statuses == [204] * 40
        assert queued(node) == 40
        assert get(node, "k3") == (200, b"body 3")  # local reads go on
    finally:
        node.kill()
    restarted = RealNode(str(tmp_path / "a"), **tier_environ(moto_s3.endpoint, bucket))
    restarted.start()
    try:
        wait_for("the queue to drain", lambda: drained(restarted), timeout=60)
        assert len(moto_s3.keys(bucket, "cache/ns/")) == 40
    finally:
        restarted.kill()


def test_a_crash_after_the_upload_before_its_row_is_deleted_uploads_again(
    moto_s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    """Killed after the store took a large body and before its queue row went, the
    restarted node puts it again: the object is whole and the queue empties."""
    env = tier_environ(moto_s3.endpoint, bucket, KURA_OBJECT_STORE_MULTIPART_THRESHOLD_BYTES="5MiB")
    body = os.urandom(1024) * (12 * 1024)  # 12 MiB: a multipart upload
    crashing = RealNode(
        str(tmp_path / "a"), **env, KURA_FAILPOINTS="after_object_upload_before_dequeue:exit"
    )
    crashing.start()
    try:
        assert put(crashing, "big", body) == 204
        assert crashing.process.wait(30) == EXIT_STATUS
    finally:
        crashing.kill()
    (key,) = moto_s3.keys(bucket, "cache/ns/")
    first = moto_s3.client.head_object(Bucket=bucket, Key=key)["LastModified"]
    restarted = RealNode(str(tmp_path / "a"), **env)
    restarted.start()
    try:
        wait_for("the queue to drain", lambda: drained(restarted), timeout=60)
        samples = metrics(restarted)
        assert samples['kura_object_store_requests_total{operation="put",result="ok"}'] >= 1
        head = moto_s3.client.head_object(Bucket=bucket, Key=key)
        assert head["LastModified"] >= first
        stored = moto_s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert stored == body
    finally:
        restarted.kill()


def test_a_store_that_goes_away_and_comes_back(
    bucket: str, moto_s3: MotoS3, nodes: Callable[..., RealNode]
) -> None:
    """With the store down, writes and local reads work, misses are 404 and the node
    stays ready; when it returns, the queue drains."""
    later = MotoS3()
    env = tier_environ(later.endpoint, bucket, KURA_OBJECT_STORE_READ_DEADLINE_MS="2000")
    node = nodes("a", **env)
    for index in range(3):
        assert put(node, f"k{index}", b"v%d" % index) == 204
    assert get(node, "k1") == (200, b"v1")
    assert get(node, "missing")[0] == 404  # within the deadline, never a 5xx
    assert request("GET", node.url + "/ready")[0] == 200
    assert queued(node) == 3
    failed_put = 'kura_object_store_requests_total{operation="put",result="error"}'
    wait_for("a failed put", lambda: metrics(node).get(failed_put))
    try:
        comes_back(later, bucket, node)
        assert len(later.keys(bucket, "cache/ns/")) == 3
    finally:
        later.stop()


def test_a_clean_on_one_node_is_honoured_by_another(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """A namespace clean and an artifact delete on A reach B (which held copies) through
    the store's tombstones; the store drops the covered objects; a newer write survives."""
    env = tier_environ(moto_s3.endpoint, bucket, KURA_ALLOW_ANONYMOUS_DELETE="true", **FAST_POLL)
    a = nodes("a", **env)
    b = nodes("b", **env)
    assert put(a, "c1", b"one") == 204
    assert request("PUT", a.url + CCACHE, b"cc")[0] == 200
    wait_for("the uploads", lambda: drained(a))
    assert get(b, "c1") == (200, b"one")  # B now holds a local copy
    assert request("GET", b.url + CCACHE)[2] == b"cc"

    clean = "/api/cache/clean?tenant_id=default&namespace_id=app"
    assert request("DELETE", a.url + clean)[0] == 204
    assert request("DELETE", a.url + CCACHE)[0] == 204
    wait_for("B to apply the clean", lambda: get(b, "c1")[0] == 404)
    wait_for("B to apply the delete", lambda: request("GET", b.url + CCACHE)[0] == 404)
    wait_for(
        "the store to drop the objects",
        lambda: drained(a) and not moto_s3.keys(bucket, "cache/ns/"),
    )
    assert moto_s3.keys(bucket, "cache/tombstones/")

    # A write after the clean wins over it everywhere (last writer wins).
    assert put(a, "c1", b"two") == 204
    wait_for("the upload", lambda: drained(a))
    fresh = nodes("c", **env)
    assert get(fresh, "c1") == (200, b"two")


def test_a_corrupt_object_is_a_miss_never_served(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """An object whose bytes do not match its digest metadata is answered 404, nothing kept."""
    env = tier_environ(moto_s3.endpoint, bucket)
    writer = nodes("writer", **env)
    assert put(writer, "c1", b"good bytes") == 204
    wait_for("the upload", lambda: drained(writer))
    (key,) = moto_s3.keys(bucket, "cache/ns/")
    metadata = moto_s3.client.head_object(Bucket=bucket, Key=key)["Metadata"]
    moto_s3.client.put_object(Bucket=bucket, Key=key, Body=b"evil bytes", Metadata=metadata)

    reader = nodes("reader", **env)
    assert get(reader, "c1")[0] == 404
    assert get(reader, "c1")[0] == 404
    assert metrics(reader)['kura_object_store_read_through_total{result="corrupt"}'] == 2


def test_eviction_never_drops_what_the_store_lacks(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """With the store away, a full disk evicts nothing still queued; once uploaded,
    evicted artifacts come back through the store."""
    later = MotoS3()
    body = b"e" * 400_000
    node = nodes(
        "a",
        **tier_environ(later.endpoint, bucket),
        KURA_CAS_CAPACITY_BYTES="1000000",
    )
    for index in range(4):  # 1.6 MB into a 1 MB cache
        assert put(node, f"e{index}", body) == 204
    for index in range(4):
        assert get(node, f"e{index}") == (200, body)
    try:
        comes_back(later, bucket, node)
        for index in range(4, 8):  # now eviction may make room
            assert put(node, f"e{index}", body) == 204
        assert metrics(node).get("kura_evicted_bytes_total", 0) > 0
        for index in range(8):
            assert get(node, f"e{index}") == (200, body)
    finally:
        later.stop()


def test_a_full_upload_queue_refuses_writes_with_503(
    bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """At the queue's cap a new write is a 503 JSON error; what was acknowledged stays."""
    down = MotoS3()
    node = nodes("a", **tier_environ(down.endpoint, bucket), KURA_OBJECT_STORE_UPLOAD_QUEUE_MAX="2")
    assert put(node, "k1", b"1") == 204
    assert put(node, "k2", b"2") == 204
    status, headers, body = request("POST", node.url + cas("k3"), b"3")
    assert headers["content-type"] == "application/json"
    assert status == 503
    assert "upload queue is full" in json.loads(body)["message"]
    assert get(node, "k3")[0] == 404
    assert get(node, "k1") == (200, b"1")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"KURA_OBJECT_STORE_URL": "http://bucket/prefix"}, "KURA_OBJECT_STORE_URL must be s3://"),
        (
            {
                "KURA_OBJECT_STORE_URL": "s3://kura-cache/x",
                # Nothing anywhere in botocore's chain (instance metadata included).
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_EC2_METADATA_DISABLED": "true",
            },
            "no AWS credentials were found",
        ),
    ],
)
def test_bad_configuration_stops_the_node_with_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], message: str
) -> None:
    """A bad URL or missing credentials: the process exits non-zero naming the problem."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)  # the node inherits the test's environment
    node = RealNode(str(tmp_path / "a"), **environ)
    with pytest.raises(RuntimeError, match="node exited"):
        node.start(timeout=30)
    assert message in node.log()


def test_a_large_body_goes_up_in_parts_and_comes_back_whole(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """Above the threshold a body is a multipart upload (16 MiB parts, SHA-256 each); a
    fresh node reads it through intact."""
    env = tier_environ(moto_s3.endpoint, bucket, KURA_OBJECT_STORE_MULTIPART_THRESHOLD_BYTES="5MiB")
    writer = nodes("writer", **env)
    body = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)  # 20 MiB: two parts
    assert put(writer, "big", body) == 204
    wait_for("the upload", lambda: drained(writer), timeout=60)
    (key,) = moto_s3.keys(bucket, "cache/ns/")
    head = moto_s3.client.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-2")  # S3's mark of a two-part upload
    assert head["Metadata"]["kura-sha256"] == hashlib.sha256(body).hexdigest()
    reader = nodes("reader", **env)
    status, served = get(reader, "big")
    assert status == 200 and served == body


def test_reapi_reads_read_through(
    moto_s3: MotoS3, bucket: str, nodes: Callable[..., RealNode]
) -> None:
    """A blob and an action result written over gRPC on one node are read over gRPC on a
    fresh one (GetActionResult, whose outputs are read through to validate it, and ByteStream)."""
    import grpc

    from kura.reapi.proto import re_pb2
    from tests.reapi.test_reapi_real import Client, blob_name, digest_of

    env = tier_environ(moto_s3.endpoint, bucket)
    writer, reader = nodes("writer", **env), nodes("reader", **env)
    blob = b"compiled object" * 1000
    action = digest_of(b"an action")
    result = re_pb2.ActionResult(stdout_raw=b"ok")
    with grpc.insecure_channel(writer.grpc_target) as channel:
        client = Client(channel, None)
        assert client.put(blob, instance="") == [0]
        # The action result refers to the blob, so that reads find it complete.
        result.output_files.add(path="out.o", digest=digest_of(blob))
        client.call(
            client.ac.UpdateActionResult,
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result),
        )
    wait_for("the uploads", lambda: drained(writer))
    with grpc.insecure_channel(reader.grpc_target) as channel:
        client = Client(channel, None)
        fetched = client.call(
            client.ac.GetActionResult, re_pb2.GetActionResultRequest(action_digest=action)
        )
        assert fetched.stdout_raw == b"ok"
        assert client.read(blob_name(digest_of(blob), instance="")) == blob
    assert metrics(reader)['kura_object_store_read_through_total{result="hit"}'] >= 2

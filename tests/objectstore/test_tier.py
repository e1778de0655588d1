"""The object-store tier's logic on a fake clock: in-memory nodes, storage inline,
an in-memory store (``memory_s3``). The same paths against a real S3 API are
in ``test_tier_real.py``; these pin the timing (backoff, deadline) and the
order of requests, which real processes cannot show deterministically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from kura.objectstore import naming
from kura.objectstore.queue import UploadQueue
from kura.service import KuraNode
from kura.storage.interfaces import IWriteHooks
from kura.storage.runner import ImmediateRunner
from kura.testing import ControlledRunner, Exchange, request, sample, succeeded
from kura.testing import test_config as config_for
from tests.objectstore.memory_s3 import MemoryS3

GRADLE = "/api/cache/gradle/{key}?tenant_id=default"
KEYVALUE = "/api/cache/keyvalue?tenant_id=default"
CCACHE = "/ccache/" + "3" * 40


class TierNodes:
    """In-memory nodes with the tier on, all sharing one :class:`MemoryS3`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.s3 = MemoryS3()
        self.running: list[KuraNode] = []

    def start(self, name: str = "a", *, runner: Any = None, **environ: str) -> KuraNode:
        data_dir = str(self.base / name)
        os.makedirs(data_dir, exist_ok=True)
        config = config_for(
            data_dir,
            KURA_OBJECT_STORE_URL="s3://kura-bucket/cache",
            KURA_ALLOW_ANONYMOUS_DELETE="true",
            **environ,
        )
        node = KuraNode(
            config,
            MemoryReactorClock(),
            registry=CollectorRegistry(),
            runner=runner or ImmediateRunner(),
            object_store=self.s3,  # type: ignore[arg-type]  # the in-memory stand-in
        )
        node.startService()
        succeeded(node.started)
        self.running.append(node)
        return node


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[TierNodes]:
    nodes = TierNodes(tmp_path)
    yield nodes
    for node in nodes.running:
        succeeded(node.stopService())


def put(node: KuraNode, key: str, body: bytes) -> int:
    return request(node, "PUT", GRADLE.format(key=key), body).status


def store_requests(tier: TierNodes) -> list[str]:
    """The requests made, the follower's listings left out."""
    return [r for r in tier.s3.requests if r != "list"]


def depth(node: KuraNode) -> int:
    assert node.object_tier is not None
    return node.object_tier.queue.depth


def test_a_write_is_queued_in_its_transaction_then_uploaded(tier: TierNodes) -> None:
    """The row exists once the write is acknowledged; the next turn uploads it and drops it."""
    node = tier.start()
    assert put(node, "g1", b"gradle bytes") == 201
    assert depth(node) == 1
    assert node.store.metadata.object_upload_count() == 1
    assert tier.s3.objects == {}
    node.reactor.advance(0)
    assert depth(node) == 0
    assert node.store.metadata.object_upload_count() == 0
    ((key, (metadata, body)),) = tier.s3.objects.items()
    assert key.startswith("cache/ns/_/") and body == b"gradle bytes"
    stored = naming.parse_metadata(metadata)
    manifest = node.store.cached_manifest(key.rsplit("/", 1)[1])
    assert manifest is not None and stored.version_ms == manifest.version_ms
    assert sample(node, "kura_object_store_uploads") == 0
    assert sample(node, "kura_object_store_requests_total", operation="put", result="ok") == 1


def test_a_store_that_is_down_costs_one_request_per_backoff(tier: TierNodes) -> None:
    """Failures back off (about 1 s, then 2 s) and the queue drains once the store is back."""
    node = tier.start()
    tier.s3.down = True
    for index in range(3):
        assert put(node, f"g{index}", b"x%d" % index) == 201
    node.reactor.advance(0)
    first = len(store_requests(tier))
    assert first >= 1 and depth(node) == 3
    node.reactor.advance(0.7)  # inside the first backoff (1 s +-20 %)
    assert len(store_requests(tier)) == first
    node.reactor.advance(0.6)
    assert len(store_requests(tier)) > first
    assert sample(node, "kura_object_store_requests_total", operation="put", result="error") >= 2
    tier.s3.down = False
    for _ in range(10):
        node.reactor.advance(1)
    assert depth(node) == 0 and len(tier.s3.objects) == 3


def test_a_replaced_version_is_not_uploaded(tier: TierNodes) -> None:
    """Two writes of one key-value entry before the queue's turn: only the newer is put."""
    node = tier.start()
    for value in ("old", "new"):
        body = json.dumps({"cas_id": "k1", "entries": [{"value": value}]}).encode()
        assert request(node, "PUT", KEYVALUE, body).status == 204
    assert depth(node) == 2
    node.reactor.advance(0)
    assert store_requests(tier) == ["put"]
    ((_, (metadata, body)),) = tier.s3.objects.items()
    assert b"new" in body and metadata[naming.INLINE] == "1"
    assert depth(node) == 0


def test_a_delete_is_a_tombstone_and_no_upload_of_what_it_deleted(tier: TierNodes) -> None:
    """A write then its delete, both queued: the write is skipped, the tombstone written."""
    node = tier.start()
    assert request(node, "PUT", CCACHE, b"cc").status == 200
    assert request(node, "DELETE", CCACHE).status == 204
    node.reactor.advance(0)
    assert store_requests(tier) == ["put", "head"]  # the tombstone, then the (absent) object
    ((key, _),) = tier.s3.objects.items()
    tombstone = naming.parse_tombstone_key("cache", key)
    assert tombstone is not None and tombstone.artifact_id is not None


def test_at_the_cap_writes_get_503_and_nothing_is_lost(tier: TierNodes) -> None:
    """The queue refuses the write that would pass its cap; acknowledged writes stay."""
    node = tier.start(KURA_OBJECT_STORE_UPLOAD_QUEUE_MAX="2")
    tier.s3.down = True
    assert put(node, "g1", b"1") == 201
    assert put(node, "g2", b"2") == 201
    refused = request(node, "PUT", GRADLE.format(key="g3"), b"3")
    assert refused.status == 503
    assert "upload queue is full" in json.loads(refused.body)["message"]
    assert request(node, "GET", GRADLE.format(key="g3")).status == 404
    assert node.store.metadata.object_upload_count() == 2


def test_eviction_keeps_what_the_store_lacks(tier: TierNodes) -> None:
    """Over capacity with the store down nothing is evicted; once uploaded, eviction resumes."""
    node = tier.start(KURA_CAS_CAPACITY_BYTES="3000")
    tier.s3.down = True
    for index in range(4):
        node.reactor.advance(1)
        assert put(node, f"g{index}", b"e" * 1000) == 201
    for index in range(4):
        assert request(node, "GET", GRADLE.format(key=f"g{index}")).status == 200
    assert sample(node, "kura_evicted_bytes_total") == 0
    tier.s3.down = False
    for _ in range(5):
        node.reactor.advance(1)
    assert depth(node) == 0
    assert put(node, "g4", b"e" * 1000) == 201
    assert sample(node, "kura_evicted_bytes_total") >= 1000


def _get(node: KuraNode, key: str) -> Exchange:
    client = Exchange(node)
    client.send(f"GET {GRADLE.format(key=key)} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    return client


def test_concurrent_misses_share_one_fetch_and_a_slow_store_is_a_miss(
    tier: TierNodes,
) -> None:
    """Two misses wait on one GET and both get the body; past the deadline a miss is a 404."""
    writer = tier.start("writer")
    assert put(writer, "g1", b"shared body") == 201
    writer.reactor.advance(0)
    runner = ControlledRunner()
    runner.hold = lambda f: getattr(f, "__name__", "") == "get_to_file"
    reader = tier.start("reader", runner=runner, KURA_OBJECT_STORE_READ_DEADLINE_MS="2000")
    first, second = _get(reader, "g1"), _get(reader, "g1")
    assert len(runner.held) == 1
    assert first.responses() == [] and second.responses() == []
    runner.release()
    for client in (first, second):
        (response,) = client.responses()
        assert (response.status, response.body) == (200, b"shared body")
    assert sample(reader, "kura_object_store_read_through_total", result="hit") == 1

    assert put(writer, "g2", b"late") == 201
    writer.reactor.advance(0)
    slow = _get(reader, "g2")
    reader.reactor.advance(1.9)
    assert slow.responses() == []
    reader.reactor.advance(0.2)
    (response,) = slow.responses()
    assert response.status == 404
    assert sample(reader, "kura_object_store_read_through_total", result="deadline") == 1
    runner.release()  # the fetch still lands, for the next reader
    assert request(reader, "GET", GRADLE.format(key="g2")).body == b"late"


def test_a_tombstone_in_the_store_removes_a_local_copy(tier: TierNodes) -> None:
    """The follower applies a clean another node wrote; a newer local write survives it."""
    writer = tier.start("writer")
    reader = tier.start("reader", KURA_OBJECT_STORE_TOMBSTONE_POLL_MS="1000")
    assert put(writer, "g1", b"one") == 201
    writer.reactor.advance(0)
    assert request(reader, "GET", GRADLE.format(key="g1")).status == 200
    assert request(writer, "DELETE", "/api/cache/clean?tenant_id=default").status == 204
    writer.reactor.advance(0)
    reader.reactor.advance(1)
    assert request(reader, "GET", GRADLE.format(key="g1")).status == 404
    assert sample(reader, "kura_object_store_tombstones_applied_total") == 1
    reader.reactor.advance(1)  # seen already: not applied twice
    assert sample(reader, "kura_object_store_tombstones_applied_total") == 1


def test_the_upload_queue_provides_the_stores_write_hooks() -> None:
    """UploadQueue is a verified IWriteHooks (what ArtifactStore calls inside its commits)."""
    assert verifyObject(IWriteHooks, UploadQueue(cap=1))


def test_an_object_versioned_far_ahead_is_a_miss(tier: TierNodes) -> None:
    """An object whose version is past KURA_MAX_CLOCK_SKEW_MS ahead is not taken (404)."""
    writer = tier.start("writer")
    assert put(writer, "g1", b"bytes") == 201
    writer.reactor.advance(0)
    ((key, (metadata, body)),) = tier.s3.objects.items()
    tier.s3.objects[key] = ({**metadata, naming.VERSION: str(10**15)}, body)
    reader = tier.start("reader", KURA_MAX_CLOCK_SKEW_MS="60000")
    assert request(reader, "GET", GRADLE.format(key="g1")).status == 404
    assert sample(reader, "kura_object_store_read_through_total", result="future") == 1

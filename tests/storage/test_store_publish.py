"""Publish order and crash consistency, start-up clean-up, versions and multipart state."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.service import KuraNode
from kura.storage.layout import Layout
from kura.storage.metadata import Outcome, WritePolicy
from kura.storage.runner import ImmediateRunner
from kura.storage.staging import TmpBudget
from kura.storage.store import ArtifactStore, StaticTargets
from kura.testing import ControlledRunner, Exchange, files_under, request, sample, succeeded
from tests.support.stored import database_bodies, stored_bodies

LWW = WritePolicy.LAST_WRITER_WINS

CAS = "/api/cache/cas/{id}?tenant_id=default"
AFTER_COMMIT = ["after_metadata_commit_before_ack"]
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}

#: A blob route per upload shape: Content-Length (small: in memory, stored in
#: the database; large: staged), chunked, multipart.
UPLOADS = ["cas", "cas-large", "metro-chunked", "module"]
#: Every fault point before the commit, per shape. A body stored in the
#: database ("cas") has no step between its bytes and its manifest, which
#: become durable in one commit: ``after_bytes_durable_before_metadata`` is
#: not one of its points (test_a_database_body_has_no_step_between_...).
BEFORE_COMMIT = [("before_fsync", shape) for shape in UPLOADS] + [
    ("after_bytes_durable_before_metadata", shape) for shape in UPLOADS if shape != "cas"
]
#: Larger than KURA_MEMORY_BODY_MAX_BYTES: staged, then renamed.
LARGE = 256 * 1024


def sent(shape: str, body: bytes) -> bytes:
    """The body ``upload`` sends for ``body`` (repeated past the in-memory limit for cas-large)."""
    return body * (LARGE // len(body) + 1) if shape == "cas-large" else body


def upload(node: KuraNode, shape: str, body: bytes) -> tuple[int, str]:
    """Upload ``body`` through ``shape``; return the final status and the GET target."""
    if shape == "cas":
        return request(node, "POST", CAS.format(id="c1"), body).status, CAS.format(id="c1")
    if shape == "cas-large":
        return request(node, "POST", CAS.format(id="c1"), sent(shape, body)).status, CAS.format(
            id="c1"
        )
    if shape == "metro-chunked":
        client = Exchange(node)
        client.send(
            b"PUT /api/metro/cache/m1 HTTP/1.1\r\nHost: kura\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        (response,) = client.responses()
        return response.status, "/api/metro/cache/m1"
    query = "tenant_id=default&hash=h1&name=n1"
    upload_id = request(node, "POST", f"/api/cache/module/start?{query}").json()["upload_id"]
    part_target = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    part = request(node, "POST", part_target, body)
    if part.status != 204:  # a fault while staging the part is the one acknowledged step
        return part.status, f"/api/cache/module/m?{query}"
    done = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        json.dumps({"parts": [1]}).encode(),
        {"Content-Type": "application/json"},
    )
    return done.status, f"/api/cache/module/m?{query}"


@pytest.mark.parametrize(("point", "shape"), BEFORE_COMMIT)
def test_failure_before_the_commit_leaves_nothing(nodes: Any, point: str, shape: str) -> None:
    """A fault before the commit: no ack, no artifact, no file, before or after a restart."""
    node = nodes.start(KURA_FAILPOINTS=f"{point}:error")
    status, target = upload(node, shape, b"payload-bytes")
    assert status == 500
    assert request(node, "GET", target).status == 404
    assert files_under(node.store.layout.uploads) == []
    assert files_under(node.store.layout.blobs) == []
    assert database_bodies(node.config.data_dir) == []
    # Only acknowledged multipart parts stay staged (and reserved).
    assert node.store.tmp_budget.used == node.store.metadata.staged_part_bytes()
    reopened = nodes.restart(node)
    assert request(reopened, "GET", target).status == 404
    assert files_under(reopened.store.layout.uploads) == []
    assert files_under(reopened.store.layout.blobs) == []
    assert reopened.store.metadata.used_bytes == 0


@pytest.mark.parametrize("shape", UPLOADS)
@pytest.mark.parametrize("point", AFTER_COMMIT)
def test_failure_after_the_commit_keeps_the_whole_artifact(
    nodes: Any, point: str, shape: str
) -> None:
    """A fault after the commit (before the ack): the artifact survives a restart byte-exact."""
    body = bytes(range(256)) * 40
    node = nodes.start(KURA_FAILPOINTS=f"{point}:error")
    status, target = upload(node, shape, body)
    assert status == 500
    reopened = nodes.restart(node)
    response = request(reopened, "GET", target)
    assert response.status == 200
    assert response.body == sent(shape, body)
    stored = stored_bodies(reopened.config.data_dir)
    assert stored == ((0, 1) if shape == "cas" else (1, 0))
    assert files_under(reopened.store.layout.uploads) == []


def test_a_database_body_has_no_step_between_its_bytes_and_its_manifest(nodes: Any) -> None:
    """``after_bytes_durable_before_metadata`` never fires for a body stored with its
    manifest: the upload is acknowledged and stored whole, in one commit."""
    node = nodes.start(KURA_FAILPOINTS="after_bytes_durable_before_metadata:error")
    assert request(node, "POST", CAS.format(id="c1"), b"payload-bytes").status == 204
    reopened = nodes.restart(node)
    assert request(reopened, "GET", CAS.format(id="c1")).body == b"payload-bytes"
    assert stored_bodies(reopened.config.data_dir) == (0, 1)


def test_failed_write_is_counted_as_an_error(nodes: Any) -> None:
    """A storage fault during a write counts as a write error and a 500."""
    node = nodes.start(KURA_FAILPOINTS="before_fsync:error")
    request(node, "POST", CAS.format(id="c1"), b"x")
    assert sample(node, "kura_artifact_writes_total", producer="xcode", result="error") == 1
    route = "/api/cache/cas/{id}"
    assert sample(node, "kura_http_requests_total", route=route, status="500") == 1


@pytest.mark.parametrize(
    ("point", "environ"),
    [("before_fsync", {}), ("after_bytes_durable_before_metadata", FILES)],
    ids=["database", "files"],
)
def test_retry_after_a_failed_publish_succeeds(
    nodes: Any, point: str, environ: dict[str, str]
) -> None:
    """Once the fault is gone, the same upload is stored."""
    node = nodes.start(KURA_FAILPOINTS=f"{point}:error", **environ)
    assert request(node, "POST", CAS.format(id="c1"), b"v").status == 500
    healthy = nodes.restart(node, **environ)
    assert request(healthy, "POST", CAS.format(id="c1"), b"v").status == 204
    assert request(healthy, "GET", CAS.format(id="c1")).body == b"v"


def test_published_artifacts_survive_a_restart(nodes: Any) -> None:
    """Acknowledged blobs and key-value entries are there after a restart."""
    node = nodes.start()
    request(node, "POST", CAS.format(id="c1"), b"blob")
    request(
        node,
        "PUT",
        "/api/cache/keyvalue?tenant_id=default",
        b'{"cas_id":"k1","entries":[{"value":"kv"}]}',
    )
    reopened = nodes.restart(node)
    assert request(reopened, "GET", CAS.format(id="c1")).body == b"blob"
    kv = request(reopened, "GET", "/api/cache/keyvalue/k1?tenant_id=default")
    assert kv.body == b'{"entries":[{"value":"kv"}]}'
    assert reopened.store.metadata.used_bytes == 4


def test_start_up_removes_staging_leftovers_and_orphans(nodes: Any) -> None:
    """Start-up wipes uploads/, unknown blob files and parts of unknown uploads; keeps the rest."""
    node = nodes.start(**FILES)
    request(node, "POST", CAS.format(id="live"), b"live")
    query = "tenant_id=default&hash=h&name=n"
    upload_id = request(node, "POST", f"/api/cache/module/start?{query}").json()["upload_id"]
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"part")
    layout = node.store.layout
    (live_blob,) = files_under(layout.blobs)
    nodes.stop(node)
    planted = [
        os.path.join(layout.uploads, "0123456789abcdef"),
        os.path.join(layout.blobs, "ab", "ab" + "0" * 62 + "-deadbeef0000"),
        os.path.join(layout.blobs, live_blob.split(os.sep)[0], "stray-name"),
        os.path.join(layout.parts, "unknown-upload", "1.part"),
        os.path.join(layout.parts, upload_id, "7.part"),
    ]
    for path in planted:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"junk")
        # Left by an earlier process: older than this start (see kura/storage/sweep.py).
        os.utime(path, (1_000_000, 1_000_000))
    reopened = nodes.start(**FILES)
    for path in planted:
        assert not os.path.exists(path), path
    assert files_under(layout.blobs) == [live_blob]
    assert files_under(layout.parts) == [os.path.join(upload_id, "1.part")]
    assert request(reopened, "GET", CAS.format(id="live")).body == b"live"
    assert reopened.store.tmp_budget.used == 4  # the acknowledged part is still staged


def test_multipart_upload_survives_a_restart(nodes: Any) -> None:
    """Acknowledged parts are durable: an upload started before a restart completes after it."""
    node = nodes.start()
    query = "tenant_id=default&hash=h&name=n"
    upload_id = request(node, "POST", f"/api/cache/module/start?{query}").json()["upload_id"]
    part = "/api/cache/module/part?upload_id={}&part_number={}"
    request(node, "POST", part.format(upload_id, 1), b"before-")
    reopened = nodes.restart(node)
    assert request(reopened, "POST", part.format(upload_id, 2), b"after").status == 204
    done = request(
        reopened,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts":[1,2]}',
        {"Content-Type": "application/json"},
    )
    assert done.status == 204
    assert request(reopened, "GET", f"/api/cache/module/m?{query}").body == b"before-after"
    assert reopened.store.tmp_budget.used == 0
    assert files_under(reopened.store.layout.parts) == []


def test_unfinished_uploads_expire(nodes: Any) -> None:
    """The janitor forgets uploads older than the TTL and frees their parts."""
    node = nodes.start(
        KURA_MULTIPART_UPLOAD_TTL_MS="10000", KURA_MULTIPART_JANITOR_INTERVAL_MS="1000"
    )
    query = "tenant_id=default&hash=h&name=n"
    upload_id = request(node, "POST", f"/api/cache/module/start?{query}").json()["upload_id"]
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    request(node, "POST", part, b"abandoned")
    node.reactor.advance(5)
    assert request(node, "POST", part, b"still-alive").status == 204
    node.reactor.advance(6)
    assert request(node, "POST", part, b"late").status == 404
    assert files_under(node.store.layout.parts) == []
    assert node.store.tmp_budget.used == 0
    assert sample(node, "kura_multipart_uploads") == 0


def test_second_node_on_the_same_data_dir_is_refused(nodes: Any) -> None:
    """A second node on a locked data dir exits naming the lock; the first keeps serving."""
    first = nodes.start()
    with pytest.raises(SystemExit) as raised:
        nodes.start()
    assert ".kura.writer.lock" in str(raised.value)
    assert request(first, "POST", CAS.format(id="c1"), b"v").status == 204
    assert request(first, "GET", "/ready").status == 200


# -- versions and tombstones (store level) ----------------------------------------------------


def _publish(node: KuraNode, key: str, body: bytes, version: int | None) -> Outcome:
    staging = node.store.stage(limit=1 << 20, expected_length=len(body))
    staging.write(body)
    staged = succeeded(Deferred.fromCoroutine(staging.finish()))
    result = succeeded(
        Deferred.fromCoroutine(
            node.store.publish_blob(
                ArtifactAddress(Producer.GRADLE, "ns", key),
                staged,
                content_type="application/octet-stream",
                policy=WritePolicy.LAST_WRITER_WINS,
                version_ms=version,
            )
        )
    )
    return result.outcome


@pytest.mark.parametrize("environ", [{}, FILES], ids=["database", "files"])
def test_last_writer_wins_by_version(nodes: Any, environ: dict[str, str]) -> None:
    """Replicated writes apply only when their version is newer; losers leave no body."""
    node = nodes.start(**environ)
    assert _publish(node, "k", b"v100", 100) is Outcome.APPLIED
    assert _publish(node, "k", b"v050", 50) is Outcome.IGNORED_STALE
    assert _publish(node, "k", b"same", 100) is Outcome.IGNORED_EQUAL
    assert _publish(node, "k", b"v200", 200) is Outcome.APPLIED
    response = request(node, "GET", "/api/cache/gradle/k?tenant_id=default&namespace_id=ns")
    assert response.body == b"v200"
    stored = stored_bodies(node.config.data_dir)
    assert stored == ((1, 0) if environ else (0, 1))
    assert node.store.tmp_budget.used == 0


def test_namespace_tombstone_beats_older_writes(node: KuraNode) -> None:
    """A write older than the namespace's clean is ignored; a newer one is stored."""
    succeeded(Deferred.fromCoroutine(node.store.delete_namespace("ns", version_ms=1000)))
    assert _publish(node, "k", b"old", 999) is Outcome.IGNORED_TOMBSTONE
    assert _publish(node, "k", b"old", 1000) is Outcome.IGNORED_TOMBSTONE
    assert files_under(node.store.layout.blobs) == []
    assert _publish(node, "k", b"new", 1001) is Outcome.APPLIED


def test_client_versions_strictly_increase(node: KuraNode) -> None:
    """Client writes get wall-clock versions that never repeat, even within one ms."""
    versions = [node.store.next_version() for _ in range(5)]
    assert versions == sorted(set(versions))
    node.reactor.advance(100)
    assert node.store.next_version() >= 100_000


def bare_store(tmp_path: Any, runner: Any, targets: tuple[str, ...] = ()) -> ArtifactStore:
    """An :class:`ArtifactStore` on its own (no node), with ``runner`` for its hops."""
    return ArtifactStore(
        layout=Layout(str(tmp_path / "data"), str(tmp_path / "data" / "tmp")),
        runner=runner,
        clock=MemoryReactorClock(),
        node_tenant="default",
        capacity_bytes=1 << 20,
        tmp_budget=TmpBudget(1 << 20),
        manifest_cache_bytes=1 << 20,
        max_unfinished_uploads=10,
        replication_targets=StaticTargets(targets),
    )


def test_commit_writes_outbox_rows_in_the_same_transaction(tmp_path: Any) -> None:
    """A write queues one outbox row per replication target in the transaction of its data."""
    store = bare_store(tmp_path, ImmediateRunner(), ("http://peer-a:7443", "http://peer-b:7443"))
    succeeded(Deferred.fromCoroutine(store.start()))
    address = ArtifactAddress(Producer.XCODE, "x", "action_cache/k")
    put = store.put_inline(address, b"{}", content_type="application/json", policy=LWW)
    succeeded(Deferred.fromCoroutine(put))
    succeeded(Deferred.fromCoroutine(store.delete_namespace("x")))
    batch = succeeded(Deferred.fromCoroutine(store.outbox_batch(0, 10)))
    assert [(m.target, m.operation["type"]) for m in batch] == [
        ("http://peer-a:7443", "upsert_artifact"),
        ("http://peer-b:7443", "upsert_artifact"),
        ("http://peer-a:7443", "delete_namespace"),
        ("http://peer-b:7443", "delete_namespace"),
    ]
    assert store.outbox_depth == 4
    # A clean that does not apply (older than the tombstone) queues nothing.
    peer_a = ("http://peer-a:7443",)
    succeeded(
        Deferred.fromCoroutine(store.delete_namespace("y", version_ms=10**15, targets=peer_a))
    )
    older = store.delete_namespace("y", version_ms=1, targets=peer_a)
    assert succeeded(Deferred.fromCoroutine(older)) is Outcome.IGNORED_OLDER
    assert len(succeeded(Deferred.fromCoroutine(store.outbox_batch(0, 10)))) == 5
    succeeded(Deferred.fromCoroutine(store.stop()))


@pytest.mark.parametrize(("targets", "heard"), [((), 0), (("http://peer-a:7443",), 1)])
def test_commit_listeners_hear_of_writes_that_queue_rows_for_them(
    tmp_path: Any, targets: tuple[str, ...], heard: int
) -> None:
    """A write with nowhere to replicate wakes no listener; one with a target does."""
    store = bare_store(tmp_path, ImmediateRunner(), targets)
    succeeded(Deferred.fromCoroutine(store.start()))
    commits: list[int] = []
    store.add_commit_listener(lambda: commits.append(1))
    address = ArtifactAddress(Producer.XCODE, "x", "action_cache/k")
    put = store.put_inline(address, b"{}", content_type="application/json", policy=LWW)
    succeeded(Deferred.fromCoroutine(put))
    assert len(commits) == heard
    assert store.outbox_depth == len(targets)
    # Other commits (here a namespace clean) are always announced.
    succeeded(Deferred.fromCoroutine(store.delete_namespace("x")))
    assert len(commits) == heard + 1
    succeeded(Deferred.fromCoroutine(store.stop()))


class RecordingRunner(ImmediateRunner):
    """Runs inline and records the name of every blocking call."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.names.append(getattr(f, "__name__", repr(f)))
        return super().run(f, *args, **kwargs)


@pytest.mark.parametrize(
    ("size", "memory_limit", "in_memory"),
    [(4096, "65536", True), (65536, "65536", True), (65537, "65536", False), (10, "0", False)],
)
def test_small_bodies_skip_staging_and_are_stored_in_the_database_in_one_commit(
    nodes: Any, size: int, memory_limit: str, in_memory: bool
) -> None:
    """Up to KURA_MEMORY_BODY_MAX_BYTES: no staging file; the commit stores the body."""
    runner = RecordingRunner()
    node = nodes.start(runner=runner, KURA_MEMORY_BODY_MAX_BYTES=memory_limit)
    body = os.urandom(size)
    runner.names.clear()
    assert request(node, "POST", CAS.format(id="small"), body).status == 204
    # In memory: the one hop that commits the manifest stores the body with it.
    assert ("seal" in runner.names) is not in_memory
    assert ("_place" in runner.names) is not in_memory
    assert runner.names.count("commit") == 1
    stored = stored_bodies(node.config.data_dir)
    assert stored == ((0, 1) if in_memory else (1, 0))
    assert node.store.tmp_budget.used == 0
    assert files_under(node.store.layout.uploads) == []
    assert request(node, "GET", CAS.format(id="small")).body == body
    reopened = nodes.restart(node)
    assert request(reopened, "GET", CAS.format(id="small")).body == body


def test_stop_closes_the_database_only_after_the_commit_in_flight(tmp_path: Any) -> None:
    """A transaction running on a storage thread finishes before the writer is closed."""
    runner = ControlledRunner()
    store = bare_store(tmp_path, runner)
    succeeded(Deferred.fromCoroutine(store.start()))
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "MetadataStore.commit"
    address = ArtifactAddress(Producer.XCODE, "x", "action_cache/k")
    put = Deferred.fromCoroutine(
        store.put_inline(address, b"{}", content_type="application/json", policy=LWW)
    )
    stopped = Deferred.fromCoroutine(store.stop())
    assert [f.__qualname__ for f, *_ in runner.held] == ["MetadataStore.commit"]
    assert "MetadataStore.close" not in runner.calls
    assert not stopped.called
    runner.release()
    succeeded(put)
    succeeded(stopped)
    assert runner.calls[-1] == "MetadataStore.close"

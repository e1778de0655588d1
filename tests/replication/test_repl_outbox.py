"""Outbox delivery between in-memory nodes: durable, idempotent, never blocked by one peer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from repl_support import MemoryMesh, host_of, outbox_rows, public, ready, url_of
from twisted.internet.defer import Deferred

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.domain.failpoints import BEFORE_OUTBOX_DELETE_AFTER_PEER_ACK, Failpoints
from kura.service import KuraNode
from kura.storage.metadata import WritePolicy
from kura.testing import sample, succeeded
from tests.support.stored import stored_bodies

CAS = "/api/cache/cas/abc?tenant_id=default"
GRADLE = "/api/cache/gradle/g1?tenant_id=default"
KV_PUT = "/api/cache/keyvalue?tenant_id=default"
KV_GET = "/api/cache/keyvalue/c1?tenant_id=default"


@pytest.fixture
def mesh(tmp_path: object) -> Iterator[MemoryMesh]:
    built = MemoryMesh(str(tmp_path))
    yield built
    built.stop()


def settled(mesh: MemoryMesh, *nodes: KuraNode) -> None:
    """Run until every node knows every other and is ready."""
    mesh.run_until(
        lambda: all(
            len(n.state.membership.known_peers) == len(nodes) - 1 and ready(n) for n in nodes
        ),
        60,
    )


def pair(mesh: MemoryMesh, **environ: str) -> tuple[KuraNode, KuraNode]:
    a = mesh.add(0, [1], **environ)
    b = mesh.add(1, [0], **environ)
    settled(mesh, a, b)
    return a, b


def errors(node: KuraNode, target: int, operation: str = "upsert_artifact") -> float:
    return sample(
        node,
        "kura_replication_requests_total",
        target=f"{host_of(target)}:7443",
        operation=operation,
        result="error",
    )


def test_every_protocol_written_on_one_node_is_readable_on_the_other(mesh: MemoryMesh) -> None:
    """CAS, key-value, Gradle, module multipart, Nx and Metro writes all replicate byte-exact."""
    a, b = pair(mesh)
    kv = json.dumps({"cas_id": "c1", "entries": [{"value": "v"}]}).encode()
    assert public(a, "POST", CAS, b"cas body").status == 204
    assert public(a, "PUT", KV_PUT, kv).status == 204
    assert public(a, "PUT", GRADLE, b"gradle body").status == 201
    assert public(a, "PUT", "/v1/cache/nx1", b"nx body").status == 200
    assert public(a, "PUT", "/api/metro/cache/m1", b"metro body").status == 200
    module = "tenant_id=default&hash=h1&name=App"
    started = public(a, "POST", f"/api/cache/module/start?{module}")
    upload_id = started.json()["upload_id"]
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    assert public(a, "POST", part, b"module body").status == 204
    complete = f"/api/cache/module/complete?upload_id={upload_id}"
    headers = {"Content-Type": "application/json"}
    assert public(a, "POST", complete, b'{"parts":[1]}', **headers).status == 204
    expected = {
        CAS: b"cas body",
        KV_GET: b'{"entries":[{"value":"v"}]}',
        GRADLE: b"gradle body",
        "/v1/cache/nx1": b"nx body",
        "/api/metro/cache/m1": b"metro body",
        f"/api/cache/module/m?{module}": b"module body",
    }
    mesh.run_until(lambda: not a.store.outbox_depth, 10)
    for target, body in expected.items():
        response = public(b, "GET", target)
        assert (response.status, response.body) == (200, body), target
    assert outbox_rows(b) == []  # replicated writes are not sent on again
    assert b.store.outbox_depth == 0


def test_clean_replicates_and_nothing_comes_back(mesh: MemoryMesh) -> None:
    """A clean on one node empties the namespace on both, and stays empty."""
    a, b = pair(mesh)
    assert public(a, "PUT", GRADLE, b"doomed").status == 201
    mesh.run_until(lambda: public(b, "GET", GRADLE).status == 200, 10)
    assert public(b, "DELETE", "/api/cache/clean?tenant_id=default").status == 204
    mesh.run_until(lambda: public(a, "GET", GRADLE).status == 404, 10)
    mesh.run_until(lambda: not outbox_rows(a) and not outbox_rows(b), 10)
    mesh.advance(30)
    assert public(a, "GET", GRADLE).status == 404
    assert public(b, "GET", GRADLE).status == 404


def test_unreachable_peer_keeps_its_rows_and_is_retried_with_backoff(mesh: MemoryMesh) -> None:
    """Rows for a down peer stay queued; retries back off instead of spinning."""
    a, b = pair(mesh)
    mesh.down.add(host_of(1))
    assert public(a, "PUT", GRADLE, b"while down").status == 201
    mesh.advance(60)
    attempts = errors(a, 1)
    # Retries at ~2, 4, 8, 16, 32 s (+-20 %); a fixed 2 s retry would make 30.
    assert 3 <= attempts <= 7
    assert len(outbox_rows(a)) == 1
    mesh.down.discard(host_of(1))
    waited = mesh.run_until(lambda: not a.store.outbox_depth, 70)
    assert public(b, "GET", GRADLE).body == b"while down"
    assert waited <= 62


def test_outbox_survives_a_restart(mesh: MemoryMesh) -> None:
    """Rows written before a restart are delivered by the restarted node."""
    a, b = pair(mesh)
    mesh.down.add(host_of(1))
    assert public(a, "PUT", GRADLE, b"durable intent").status == 201
    mesh.remove(0)
    mesh.down.discard(host_of(1))
    a = mesh.add(0, [1])
    assert a.store.outbox_depth == 1
    mesh.run_until(lambda: not a.store.outbox_depth, 30)
    assert public(b, "GET", GRADLE).body == b"durable intent"


def test_rows_for_targets_that_left_for_good_are_dropped(mesh: MemoryMesh) -> None:
    """A row for a target that is no longer a replication target is dropped and counted."""
    a, b = pair(mesh)
    gone = "http://127.0.0.99:7443"
    # Written while ``gone`` was still a target: one row for it, one for b.
    put = a.store.put_inline(
        ArtifactAddress(Producer.GRADLE, "", "g1"),
        b"x",
        content_type="application/octet-stream",
        policy=WritePolicy.LAST_WRITER_WINS,
        targets=(gone, url_of(1)),
    )
    succeeded(Deferred.fromCoroutine(put))
    assert a.store.outbox_depth == 2
    mesh.run_until(lambda: not a.store.outbox_depth, 10)
    dropped = sample(
        a,
        "kura_replication_requests_total",
        target="127.0.0.99:7443",
        operation="upsert_artifact",
        result="dropped_stale_target",
    )
    assert dropped == 1
    assert public(b, "GET", GRADLE).status == 200


def test_poison_message_backs_off_alone(mesh: MemoryMesh) -> None:
    """A message the peer refuses retries on its own backoff; later rows still flow."""
    a, b = pair(mesh)
    poison = ArtifactAddress(Producer.GRADLE, "", "bad key")  # the receiver refuses it (400)
    succeeded(
        Deferred.fromCoroutine(
            a.store.put_inline(
                poison, b"x", content_type="text/plain", policy=WritePolicy.LAST_WRITER_WINS
            )
        )
    )
    mesh.advance(0.5)
    assert errors(a, 1) == 1
    assert public(a, "PUT", GRADLE, b"after the poison").status == 201
    mesh.run_until(lambda: public(b, "GET", GRADLE).status == 200, 1)
    mesh.advance(40)
    assert len(outbox_rows(a)) == 1  # the poison stays, retried rarely
    assert errors(a, 1) <= 5


def test_stalled_upload_is_cut_by_byte_progress_and_retried(mesh: MemoryMesh) -> None:
    """An upload to a frozen peer is aborted after the stall limit and redelivered later."""
    a, b = pair(mesh, KURA_REPLICATION_UPLOAD_STALL_MS="3000")
    mesh.frozen.add(host_of(1))
    assert public(a, "PUT", GRADLE, b"s" * 200_000).status == 201
    mesh.advance(2.9)
    assert a.replication.outbox.inflight == 1
    mesh.advance(0.2)
    assert a.replication.outbox.inflight == 0
    assert errors(a, 1) == 1
    mesh.frozen.discard(host_of(1))
    mesh.run_until(lambda: not a.store.outbox_depth, 70)
    assert public(b, "GET", GRADLE).body == b"s" * 200_000


def test_slow_but_progressing_upload_is_not_a_stall(mesh: MemoryMesh) -> None:
    """A throttled upload longer than the stall limit completes (no total deadline)."""
    a, b = pair(
        mesh,
        KURA_REPLICATION_UPLOAD_STALL_MS="2000",
        KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND="262144",
    )
    body = b"p" * (2 * 1024 * 1024)
    assert public(a, "PUT", GRADLE, body).status == 201
    took = mesh.run_until(lambda: not a.store.outbox_depth, 60)
    assert took >= 7  # 2 MiB at 256 KiB/s
    assert errors(a, 1) == 0
    assert public(b, "GET", GRADLE).body == body


def test_artifact_gone_locally_counts_as_delivered(mesh: MemoryMesh) -> None:
    """An upsert whose artifact was deleted meanwhile is dropped without a request."""
    a, b = pair(mesh)
    mesh.down.add(host_of(1))
    assert public(a, "PUT", GRADLE, b"short-lived").status == 201
    mesh.advance(1)  # the upload fails while the peer is down
    assert public(a, "DELETE", "/api/cache/clean?tenant_id=default").status == 204
    mesh.advance(1)
    mesh.down.discard(host_of(1))
    mesh.run_until(lambda: not a.store.outbox_depth, 70)
    puts = sample(
        b, "kura_http_requests_total", route="/_internal/replicate/artifact", status="204"
    )
    assert puts == 0
    assert public(b, "GET", GRADLE).status == 404


def test_redelivery_after_an_unrecorded_ack_stores_once(mesh: MemoryMesh) -> None:
    """A crash between the peer's ack and the row delete redelivers; the peer stores once."""
    a, b = pair(mesh)
    outbox = a.replication.outbox
    outbox._failpoints = Failpoints([(BEFORE_OUTBOX_DELETE_AFTER_PEER_ACK, "error")])
    assert public(a, "PUT", GRADLE, b"twice").status == 201
    mesh.run_until(lambda: public(b, "GET", GRADLE).status == 200, 5)
    assert len(outbox_rows(a)) == 1
    outbox._failpoints = Failpoints()
    mesh.run_until(lambda: not a.store.outbox_depth, 70)
    applied = "kura_replication_apply_results_total"
    labels = {"source": "replication", "item_type": "artifact"}
    assert sample(b, applied, outcome="applied", **labels) == 1
    assert sample(b, applied, outcome="ignored_equal", **labels) >= 1
    assert sum(stored_bodies(b.config.data_dir)) == 1  # stored once


def test_a_dead_peer_does_not_delay_a_live_one(mesh: MemoryMesh) -> None:
    """With one peer down, the other still receives every write at once."""
    a = mesh.add(0, [1, 2])
    b = mesh.add(1, [0, 2])
    c = mesh.add(2, [0, 1])
    settled(mesh, a, b, c)
    mesh.down.add(host_of(2))
    mesh.advance(10)
    for n in range(20):
        assert public(a, "PUT", f"/api/cache/gradle/k{n}?tenant_id=default", b"x").status == 201
    mesh.run_until(
        lambda: all(
            public(b, "GET", f"/api/cache/gradle/k{n}?tenant_id=default").status == 200
            for n in range(20)
        ),
        1,
    )
    assert len(outbox_rows(a)) == 20  # C's rows wait for C


def test_full_outbox_sheds_writes_with_retry_after(mesh: MemoryMesh) -> None:
    """At KURA_OUTBOX_MAX_DEPTH queued rows, writes get 503 + Retry-After until it drains."""
    a, _ = pair(mesh, KURA_OUTBOX_MAX_DEPTH="2")
    mesh.down.add(host_of(1))
    assert public(a, "PUT", "/api/cache/gradle/k1?tenant_id=default", b"1").status == 201
    assert public(a, "PUT", "/api/cache/gradle/k2?tenant_id=default", b"2").status == 201
    shed = public(a, "PUT", "/api/cache/gradle/k3?tenant_id=default", b"3")
    assert shed.status == 503
    assert shed.headers["retry-after"] == "1"
    assert "replication" in shed.json()["message"]
    assert public(a, "GET", "/api/cache/gradle/k1?tenant_id=default").status == 200
    mesh.down.discard(host_of(1))
    mesh.run_until(lambda: not a.store.outbox_depth, 70)
    assert public(a, "PUT", "/api/cache/gradle/k3?tenant_id=default", b"3").status == 201


def test_malformed_rows_are_dropped_not_retried_forever(mesh: MemoryMesh) -> None:
    """A row no code can deliver (unknown operation) is logged, counted and dropped."""
    a, _ = pair(mesh)

    def insert(conn: Any) -> None:
        conn.execute(
            "INSERT INTO outbox (target, operation, created_at_ms) VALUES (?, ?, 0)",
            (url_of(1), '{"type":"frobnicate"}'),
        )

    succeeded(a.store._commit(insert))  # a row as a future version might have written it
    mesh.advance(3)
    assert outbox_rows(a) == []
    assert errors(a, 1, "frobnicate") == 1


def test_a_backlog_for_a_down_peer_is_read_once(mesh: MemoryMesh) -> None:
    """Waking the worker reads only rows committed since its last look, not the backlog."""
    a, b = pair(mesh)
    mesh.down.add(host_of(1))
    for n in range(30):
        assert public(a, "PUT", f"/api/cache/gradle/k{n}?tenant_id=default", b"x").status == 201
    mesh.advance(5)
    reads: list[tuple[int, int]] = []
    real_batch = a.store.outbox_batch

    async def counted(after_seq: int, limit: int) -> Any:
        rows = await real_batch(after_seq, limit)
        reads.append((after_seq, len(rows)))
        return rows

    a.store.outbox_batch = counted  # type: ignore[method-assign]
    assert public(a, "PUT", "/api/cache/gradle/new?tenant_id=default", b"y").status == 201
    mesh.advance(20)
    assert reads and sum(count for _, count in reads) == 1  # only the new row was read
    assert len(outbox_rows(a)) == 31
    mesh.down.discard(host_of(1))
    mesh.run_until(lambda: not a.store.outbox_depth, 120)
    assert public(b, "GET", "/api/cache/gradle/k29?tenant_id=default").status == 200

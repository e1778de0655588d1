"""Artifact tombstones on the wire: the receiver, the outbox and catch-up (in-memory nodes)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from repl_support import MemoryMesh, host_of, outbox_rows, public, ready, url_of
from test_repl_receiver import InternalExchange, applied, internal, put, upsert

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.replication import wire
from kura.service import KuraNode
from kura.testing import memory_node, request, sample
from kura.web.admission import UNMATCHED, RequestHead
from tests.support.mesh import MESH_SECRET

KEY = "c" * 40
CCACHE = f"/ccache/{KEY}"


def ccache_id(node: KuraNode, key: str = KEY) -> str:
    return node.store.artifact_id(ArtifactAddress(Producer.CCACHE, "ccache", key))


def replicated(key: str = KEY, version: int = 5000) -> str:
    """The upsert of ccache entry ``key`` at ``version``, as a peer sends it."""
    return upsert(key, version, producer=Producer.CCACHE, namespace="ccache")


def artifact_delete(node: KuraNode, version: int, key: str = KEY) -> str:
    message = wire.ArtifactDeleteMessage(ccache_id(node, key), "ccache", version)
    return wire.url("", wire.REPLICATE_ARTIFACT_PATH, message.params())


@pytest.fixture
def node(tmp_path: object) -> Iterator[KuraNode]:
    """A node with a (never reachable) peer, so client writes queue outbox rows."""
    started = memory_node(
        f"{tmp_path}/data",
        KURA_PEERS="http://127.0.0.9:0",
        KURA_PEER_SECRET=MESH_SECRET,
        KURA_ALLOW_ANONYMOUS_DELETE="true",
    )
    yield started
    started.stopService()


# -- the receiver --------------------------------------------------------------------------------


def test_a_replicated_delete_drops_the_entry_and_older_copies_never_return(
    node: KuraNode,
) -> None:
    assert put(node, replicated(version=1000), b"entry").status == 204
    assert request(node, "GET", CCACHE).body == b"entry"
    assert internal(node, "DELETE", artifact_delete(node, 5000)).status == 204
    assert request(node, "GET", CCACHE).status == 404
    assert applied(node, "applied", "artifact_delete") == 1
    # The same delivery again: idempotent.
    assert internal(node, "DELETE", artifact_delete(node, 5000)).status == 204
    assert applied(node, "ignored_older", "artifact_delete") == 1
    # A copy at or below the delete's version is refused from its head.
    for version in (4000, 5000):
        assert put(node, replicated(version=version), b"late copy").status == 204
    assert applied(node, "ignored_tombstone") == 2
    assert request(node, "GET", CCACHE).status == 404
    assert node.store.outbox_depth == 0  # a peer's delete is not sent on


def test_a_newer_write_after_a_replicated_delete_is_served(node: KuraNode) -> None:
    assert internal(node, "DELETE", artifact_delete(node, 5000)).status == 204
    assert put(node, replicated(version=6000), b"written again").status == 204
    assert request(node, "GET", CCACHE).body == b"written again"
    assert node.store.metadata.artifact_tombstone_version(ccache_id(node)) is None


def test_a_delete_older_than_the_stored_version_leaves_it(node: KuraNode) -> None:
    assert put(node, replicated(version=7000), b"newer").status == 204
    assert internal(node, "DELETE", artifact_delete(node, 5000)).status == 204
    assert applied(node, "ignored_stale", "artifact_delete") == 1
    assert request(node, "GET", CCACHE).body == b"newer"


@pytest.mark.parametrize(
    "query",
    [
        "artifact_id=xyz&namespace_id=ccache&version_ms=5",
        "artifact_id=" + "a" * 64 + "&namespace_id=ccache&version_ms=0",
        "artifact_id=" + "a" * 64 + "&namespace_id=ccache",
        "artifact_id=" + "a" * 64 + "&namespace_id=a/b&version_ms=5",
        "namespace_id=ccache&version_ms=5",
    ],
)
def test_invalid_deletes_are_rejected(node: KuraNode, query: str) -> None:
    response = internal(node, "DELETE", f"{wire.REPLICATE_ARTIFACT_PATH}?{query}")
    assert response.status == 400
    assert node.store.metadata.artifact_tombstones_page(None, 10) == []


def test_a_delete_too_far_ahead_is_refused_for_a_later_retry(node: KuraNode) -> None:
    """It would refuse every write of the key until our clock caught up."""
    far = int(node.reactor.seconds() * 1000) + 10 * 300_000
    assert internal(node, "DELETE", artifact_delete(node, far)).status == 422
    assert node.store.metadata.artifact_tombstones_page(None, 10) == []


def test_an_unsigned_delete_is_refused(node: KuraNode) -> None:
    exchange = InternalExchange(node, sign=False)
    target = artifact_delete(node, 5000)
    response = exchange.request("DELETE", target, b"", {"X-Kura-Tenant-Id": "default"})
    assert response.status == 401


def test_a_client_delete_queues_one_row_per_peer_and_tombstone_pages_list_it(
    node: KuraNode,
) -> None:
    keys = ["b" * 40, "a" * 40, "d" * 40]
    for key in keys:
        assert request(node, "DELETE", f"/ccache/{key}").status == 204
    rows = [m.operation for m in outbox_rows(node)]
    assert [r["type"] for r in rows] == ["delete_artifact"] * 3
    ids = sorted(ccache_id(node, key) for key in keys)
    page = internal(node, "GET", wire.ARTIFACT_TOMBSTONES_PATH + "?limit=2").json()
    assert [t["artifact_id"] for t in page["artifact_tombstones"]] == ids[:2]
    assert page["next_after"] == ids[1]
    assert all(t["namespace_id"] == "ccache" for t in page["artifact_tombstones"])
    rest = internal(node, "GET", f"{wire.ARTIFACT_TOMBSTONES_PATH}?limit=2&after={ids[1]}")
    assert [t["artifact_id"] for t in rest.json()["artifact_tombstones"]] == ids[2:]
    assert rest.json()["next_after"] is None
    for item in page["artifact_tombstones"]:
        assert wire.ArtifactDeleteMessage.from_json(item).version_ms > 0


def test_the_node_purges_tombstones_after_the_retention(tmp_path: object) -> None:
    """KURA_TOMBSTONE_RETENTION_MS reaches the node's sweep; the gauge and counter follow."""
    started = memory_node(
        f"{tmp_path}/data", KURA_TOMBSTONE_RETENTION_MS="60000", KURA_ALLOW_ANONYMOUS_DELETE="true"
    )
    try:
        started.reactor.advance(1_700_000_000)
        assert request(started, "DELETE", CCACHE).status == 204
        started.reactor.advance(6)  # one sweep interval (a tenth of the retention)
        assert sample(started, "kura_artifact_tombstones") == 1
        started.reactor.advance(60)
        assert sample(started, "kura_artifact_tombstones_purged_total") == 1
        assert sample(started, "kura_artifact_tombstones") == 0
        assert started.store.metadata.artifact_tombstones_page(None, 10) == []
    finally:
        started.stopService()


def test_a_replicated_tombstone_ages_from_the_delete_not_from_its_arrival(node: KuraNode) -> None:
    """A tombstone caught up days later is purged when the deleting node purges its own."""
    node.reactor.advance(1_700_000_000)
    now = int(node.reactor.seconds() * 1000)
    old = now - 5 * 86_400_000
    assert internal(node, "DELETE", artifact_delete(node, old)).status == 204
    assert internal(node, "DELETE", artifact_delete(node, now + 1000, key="e" * 40)).status == 204
    aged = {
        t.version_ms: t.deleted_at_ms
        for t in node.store.metadata.artifact_tombstones_page(None, 10)
    }
    assert aged == {old: old, now + 1000: now}  # never in the future


# -- a mesh of in-memory nodes -------------------------------------------------------------------


@pytest.fixture
def mesh(tmp_path: object) -> Iterator[MemoryMesh]:
    built = MemoryMesh(str(tmp_path))
    yield built
    built.stop()


def pair(mesh: MemoryMesh) -> tuple[KuraNode, KuraNode]:
    a = mesh.add(0, [1, 2])
    b = mesh.add(1, [0, 2])
    mesh.run_until(lambda: all(ready(n) and n.state.membership.known_peers for n in (a, b)), 60)
    return a, b


def drained_to(node: KuraNode, peer: int) -> bool:
    return not [row for row in outbox_rows(node) if row.target == url_of(peer)]


def as_previous_release(node: KuraNode) -> None:
    """Make ``node``'s internal plane answer as a release before artifact tombstones: 404."""
    gate = node.replication.gate
    classify = gate.classify

    def without_tombstones(head: RequestHead) -> tuple[Any, Mapping[str, str]]:
        path = head.path.decode()
        if (head.method == "DELETE" and path == wire.REPLICATE_ARTIFACT_PATH) or (
            path == wire.ARTIFACT_TOMBSTONES_PATH
        ):
            return UNMATCHED, {}
        return classify(head)

    gate.classify = without_tombstones  # type: ignore[method-assign]


def test_a_delete_on_one_node_reaches_the_other(mesh: MemoryMesh) -> None:
    a, b = pair(mesh)
    assert public(a, "PUT", CCACHE, b"entry").status == 200
    mesh.run_until(lambda: public(b, "GET", CCACHE).status == 200, 10)
    assert public(a, "DELETE", CCACHE).status == 204
    mesh.run_until(lambda: public(b, "GET", CCACHE).status == 404, 10)
    mesh.run_until(lambda: drained_to(a, 1), 10)
    assert b.store.metadata.artifact_tombstone_version(ccache_id(b)) is not None
    ok = sample(
        a,
        "kura_replication_requests_total",
        target=host_of(1) + ":" + url_of(1).rsplit(":", 1)[1],
        operation="delete_artifact",
        result="ok",
    )
    assert ok == 1
    # Written again after the delete: the newer version replicates.
    assert public(b, "PUT", CCACHE, b"again").status == 200
    mesh.run_until(lambda: public(a, "GET", CCACHE).body == b"again", 10)


def test_catch_up_does_not_bring_a_deleted_entry_back(mesh: MemoryMesh) -> None:
    """B misses the delete and still offers the entry; a node joining later never stores it.

    A and B do not name C, so no outbox row carries the delete to C: only its
    catch-up can tell it.
    """
    a = mesh.add(0, [1])
    b = mesh.add(1, [0])
    mesh.run_until(lambda: all(ready(n) and n.state.membership.known_peers for n in (a, b)), 60)
    assert public(a, "PUT", CCACHE, b"doomed").status == 200
    mesh.run_until(lambda: public(b, "GET", CCACHE).status == 200, 10)
    mesh.down.add(host_of(1))
    assert public(a, "DELETE", CCACHE).status == 204
    mesh.advance(1)
    mesh.down.discard(host_of(1))
    assert public(b, "GET", CCACHE).status == 200  # not delivered yet
    # C applies A's tombstones before any manifest, whichever peer it walks first.
    c = mesh.add(2, [0, 1])
    mesh.run_until(lambda: ready(c) and len(c.state.membership.known_peers) == 2, 60)
    assert public(c, "GET", CCACHE).status == 404
    assert sample(c, "kura_bootstrap_applied_items_total", item_type="artifact_delete") == 1
    mesh.run_until(lambda: drained_to(a, 1), 70)
    for node in (a, b, c):
        assert public(node, "GET", CCACHE).status == 404
    assert c.store.metadata.artifact_tombstone_version(ccache_id(c)) is not None


def test_a_peer_of_the_previous_release_gets_no_row_it_cannot_take(mesh: MemoryMesh) -> None:
    """404 on the delete route: the row is dropped and counted, not retried forever."""
    a, b = pair(mesh)
    as_previous_release(b)
    assert public(a, "PUT", CCACHE, b"entry").status == 200
    mesh.run_until(lambda: public(b, "GET", CCACHE).status == 200, 10)
    assert public(a, "DELETE", CCACHE).status == 204
    mesh.run_until(lambda: drained_to(a, 1), 10)
    dropped = sample(
        a,
        "kura_replication_requests_total",
        target=host_of(1) + ":" + url_of(1).rsplit(":", 1)[1],
        operation="delete_artifact",
        result="dropped_unsupported",
    )
    assert dropped == 1
    assert public(b, "GET", CCACHE).status == 200  # an old peer keeps its copy until upgraded


def test_catch_up_from_a_peer_of_the_previous_release_completes(mesh: MemoryMesh) -> None:
    """Its 404 on the artifact tombstone pages ends that phase; manifests still come."""
    a = mesh.add(0, [1])
    as_previous_release(a)
    assert public(a, "PUT", CCACHE, b"entry").status == 200
    b = mesh.add(1, [0])
    mesh.run_until(lambda: ready(b) and b.state.membership.known_peers, 60)
    assert public(b, "GET", CCACHE).body == b"entry"
    assert sample(b, "kura_bootstrap_runs_total", result="ok") == 1

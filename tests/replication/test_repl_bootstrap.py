"""Catch-up between in-memory nodes: tombstones first, bodies once, resumable, watched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from repl_support import MemoryMesh, host_of, public, ready, url_of
from twisted.internet.defer import Deferred

from kura.service import KuraNode
from kura.testing import sample

KV = json.dumps({"cas_id": "c1", "entries": [{"value": "v"}]}).encode()


@pytest.fixture
def mesh(tmp_path: object) -> Iterator[MemoryMesh]:
    built = MemoryMesh(str(tmp_path))
    yield built
    built.stop()


def gradle(n: int) -> str:
    return f"/api/cache/gradle/k{n}?tenant_id=default"


def pair(mesh: MemoryMesh) -> tuple[KuraNode, KuraNode]:
    a = mesh.add(0, [1, 2])
    b = mesh.add(1, [0, 2])
    mesh.run_until(lambda: all(ready(n) and n.state.membership.known_peers for n in (a, b)), 60)
    return a, b


def drained_to(node: KuraNode, peer: int) -> bool:
    """Whether ``node`` has no outbox rows left for peer ``peer``."""
    rows = node.store.metadata.outbox_batch(0, 100_000)
    return not [row for row in rows if row.target == url_of(peer)]


def runs(node: KuraNode, result: str) -> float:
    return sample(node, "kura_bootstrap_runs_total", result=result)


def test_late_joiner_catches_up_and_only_then_turns_ready(mesh: MemoryMesh) -> None:
    """A node that joins later pulls every artifact, and is ready only once it has them."""
    a, _ = pair(mesh)
    bodies = {gradle(n): bytes([n]) * 400_000 for n in range(4)}
    for target, body in bodies.items():
        assert public(a, "PUT", target, body).status == 201
    assert public(a, "PUT", "/api/cache/keyvalue?tenant_id=default", KV).status == 204
    mesh.run_until(lambda: drained_to(a, 1), 30)
    # C catches up slowly (1.6 MB at 200 kB/s: longer than the 5 s settle window).
    c = mesh.add(2, [0, 1], KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND="200000")
    mesh.run_until(lambda: len(c.state.membership.known_peers) == 2, 10)
    assert not ready(c)
    took = mesh.run_until(lambda: ready(c), 60)
    assert took > 5
    for target, body in bodies.items():
        assert public(c, "GET", target).body == body
    response = public(c, "GET", "/api/cache/keyvalue/c1?tenant_id=default")
    assert response.body == b'{"entries":[{"value":"v"}]}'
    assert sample(c, "kura_bootstrap_applied_items_total", item_type="artifact") == 5
    assert c.store.outbox_depth == 0  # caught-up items are not sent on


def test_each_body_is_fetched_once_when_several_peers_offer_it(mesh: MemoryMesh) -> None:
    """Two peers hold the same artifacts; the joiner downloads every body once."""
    a, b = pair(mesh)
    total = 0
    for n in range(6):
        body = bytes([n]) * (100_000 + n)
        total += len(body)
        assert public(a, "PUT", gradle(n), body).status == 201
    mesh.run_until(lambda: drained_to(a, 1), 30)
    c = mesh.add(2, [0, 1])
    mesh.run_until(lambda: ready(c) and len(c.state.membership.known_peers) == 2, 60)
    assert sample(c, "kura_replication_body_bytes_total", direction="fetched") == total
    served = sum(sample(n, "kura_replication_body_bytes_total", direction="served") for n in (a, b))
    assert served == total
    assert runs(c, "ok") == 2


def test_deleted_namespaces_are_not_resurrected(mesh: MemoryMesh) -> None:
    """Tombstones come first: a cleaned namespace stays empty on a node that joins later."""
    a, b = pair(mesh)
    cas = "/api/cache/cas/x1?tenant_id=default&namespace_id=p1"
    assert public(a, "POST", cas, b"doomed").status == 204
    mesh.run_until(lambda: public(b, "GET", cas).status == 200, 10)
    # B misses the clean (it is down), so it still offers the artifact.
    mesh.down.add(host_of(1))
    assert public(a, "DELETE", "/api/cache/clean?tenant_id=default&namespace_id=p1").status == 204
    mesh.advance(1)
    mesh.down.discard(host_of(1))
    c = mesh.add(2, [0, 1])
    mesh.run_until(lambda: ready(c) and len(c.state.membership.known_peers) == 2, 60)
    mesh.run_until(lambda: drained_to(a, 1) and drained_to(a, 2), 70)
    for node in (a, b, c):
        assert public(node, "GET", cas).status == 404
    assert public(c, "POST", cas, b"new").status == 204  # newer writes still apply


def test_catch_up_resumes_from_its_cursor(mesh: MemoryMesh) -> None:
    """A run that failed mid-walk resumes at the page where it stopped (newest first)."""
    a, _ = pair(mesh)
    for n in range(6):
        assert public(a, "PUT", gradle(n), b"r").status == 201
        mesh.advance(0.01)  # distinct versions
    mesh.run_until(lambda: drained_to(a, 1), 30)
    asked: list[Any] = []
    real_page = a.store.recent_manifests_page
    failures = [1]

    async def flaky_page(before: Any, since: int | None, limit: int) -> Any:
        asked.append(before)
        if before is not None and failures:
            failures.pop()
            raise OSError("disk hiccup")
        return await real_page(before, since, limit)

    a.store.recent_manifests_page = flaky_page  # type: ignore[method-assign]
    c = mesh.add(2, [0])
    c.replication.bootstrap._page_limit = 2
    mesh.run_until(lambda: ready(c) and c.state.membership.known_peers, 60)
    first = asked[1]
    assert asked[:4] == [None, first, first, asked[3]]
    assert asked[3] < first  # newest first: the walk goes down in versions
    assert runs(c, "error") == 1 and runs(c, "ok") == 1
    # Nothing was walked twice: 6 manifests, 6 walked.
    assert sample(c, "kura_bootstrap_walked_items_total", order="recent") == 6
    for n in range(6):
        assert public(c, "GET", gradle(n)).status == 200


def test_a_silent_peer_fails_the_run_after_the_progress_timeout(mesh: MemoryMesh) -> None:
    """The watchdog ends a catch-up that makes no progress, and the retry succeeds."""
    a, _ = pair(mesh)
    assert public(a, "PUT", gradle(0), b"z").status == 201
    mesh.run_until(lambda: drained_to(a, 1), 30)
    real_page = a.store.tombstones_page
    hung: list[Deferred[None]] = []

    async def silent_page(after: str | None, limit: int) -> Any:
        waiting: Deferred[None] = Deferred()
        hung.append(waiting)
        await waiting
        return await real_page(after, limit)

    a.store.tombstones_page = silent_page  # type: ignore[method-assign]
    c = mesh.add(2, [0], KURA_BOOTSTRAP_TIMEOUT_MS="2000")
    took = mesh.run_until(lambda: runs(c, "timeout") == 1, 30)
    assert 2 <= took < 3
    assert hung and not ready(c)
    a.store.tombstones_page = real_page  # type: ignore[method-assign]
    mesh.run_until(lambda: ready(c) and c.state.membership.known_peers, 60)
    assert public(c, "GET", gradle(0)).body == b"z"

"""Catch-up at scale between in-memory nodes: newest first, resumable, incremental, visible."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from repl_support import MemoryMesh, public, ready, url_of
from twisted.logger import formatEvent, globalLogPublisher

from kura.replication.bootstrap import PROGRESS, PROGRESS_SECONDS
from kura.service import KuraNode
from kura.testing import sample

#: A small skew, so that versions written a few simulated seconds before a
#: pass are below its watermark.
SKEW = {"KURA_MAX_CLOCK_SKEW_MS": "1000"}
BODY = 100_000


@pytest.fixture
def mesh(tmp_path: object) -> Iterator[MemoryMesh]:
    built = MemoryMesh(str(tmp_path))
    yield built
    built.stop()


def gradle(n: int) -> str:
    return f"/api/cache/gradle/k{n}?tenant_id=default"


def seeded(mesh: MemoryMesh, count: int, first: int = 0) -> KuraNode:
    """Node A (index 0, no peers but C) holding ``count`` artifacts of distinct versions."""
    a = mesh.nodes.get("127.0.0.2") or mesh.add(0, [2], **SKEW)
    for n in range(first, first + count):
        assert public(a, "PUT", gradle(n), bytes([n]) * BODY).status == 201
        mesh.advance(0.01)
    # Older than the next pass's floor (watermark less the skew).
    mesh.advance(5)
    return a


def joiner(mesh: MemoryMesh, **environ: str) -> KuraNode:
    c = mesh.add(2, [0], **SKEW, **environ)
    c.replication.bootstrap._page_limit = 2
    return c


def walked(node: KuraNode) -> float:
    return sample(node, "kura_bootstrap_walked_items_total", order="recent")


def fetched(node: KuraNode) -> float:
    return sample(node, "kura_replication_body_bytes_total", direction="fetched")


def caught_up(node: KuraNode) -> bool:
    return ready(node) and bool(node.state.membership.known_peers)


def test_the_newest_artifacts_arrive_first(mesh: MemoryMesh) -> None:
    """Versions come newest first: the artifacts builds ask for are there soonest."""
    seeded(mesh, 6)
    c = joiner(mesh)
    order: list[str] = []
    publish = c.store.publish_blob

    async def recording(address: Any, *args: Any, **kwargs: Any) -> Any:
        order.append(address.key)
        return await publish(address, *args, **kwargs)

    c.store.publish_blob = recording  # type: ignore[method-assign]
    mesh.run_until(lambda: caught_up(c), 60)
    assert order == [f"k{n}" for n in reversed(range(6))]


def test_a_restart_in_the_middle_of_a_catch_up_resumes_where_it_stopped(
    mesh: MemoryMesh,
) -> None:
    """The durable watermark: the restarted node walks only what it had not (the counters)."""
    seeded(mesh, 10)
    # 1 MB at 100 kB/s: about 10 s of simulated time.
    slow = {"KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND": "100000"}
    c = joiner(mesh, **slow)
    mesh.run_until(lambda: walked(c) >= 4, 60)
    reasons = c.state.readiness()[1]
    assert f"bootstrap in progress: peer {url_of(0)} 4/10 items" in reasons
    assert sample(c, "kura_bootstrap_peer_items", peer="127.0.0.2:7443", state="remaining") == 6
    first_walked = walked(c)
    mesh.remove(2)
    c = joiner(mesh, **slow)
    mesh.run_until(lambda: caught_up(c), 120)
    # Nothing the first process resolved is walked or fetched again (a body
    # cut off mid-page by the restart is fetched whole once more).
    assert walked(c) == 10 - first_walked
    assert fetched(c) == (10 - first_walked) * BODY
    for n in range(10):
        assert public(c, "GET", gradle(n)).body == bytes([n]) * BODY
    assert sample(c, "kura_bootstrap_peer_items", peer="127.0.0.2:7443", state="remaining") == 0


def test_after_a_full_pass_a_restart_only_walks_what_changed(mesh: MemoryMesh) -> None:
    """A steady-state restart costs the writes made since the watermark, not the store."""
    seeded(mesh, 8)
    c = joiner(mesh)
    mesh.run_until(lambda: caught_up(c), 60)
    assert walked(c) == 8
    mesh.remove(2)
    seeded(mesh, 3, first=8)  # written while C is down
    mesh.advance(1)
    c = joiner(mesh)
    mesh.run_until(lambda: caught_up(c), 60)
    assert walked(c) == 3
    for n in range(11):
        assert public(c, "GET", gradle(n)).status == 200


def test_readiness_waits_for_the_catch_up_and_names_its_progress(mesh: MemoryMesh) -> None:
    """/ready stays 503 while the pass runs, with the peer and its items in the reason,
    and a progress line is logged every 10 s."""
    seeded(mesh, 4)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        c = joiner(mesh, KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND="20000")
        mesh.run_until(lambda: walked(c) >= 2, 60)
        ready_now, reasons = c.state.readiness()
        assert not ready_now
        assert f"bootstrap in progress: peer {url_of(0)} 2/4 items" in reasons
        took = mesh.run_until(lambda: caught_up(c), 60)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert walked(c) == 4
    lines = [formatEvent(e) for e in logged if e.get("log_format") == PROGRESS]
    assert lines and all(line.startswith(f"catch-up from {url_of(0)}: ") for line in lines)
    assert "/4 items" in lines[-1] and "(recent order, 1 segment(s))" in lines[-1]
    assert len(lines) <= took / PROGRESS_SECONDS + 2

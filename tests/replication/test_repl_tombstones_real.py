"""ccache deletes across real meshes of ``twistd kura`` processes (marker ``realnode``).

A delete on one node reaches the others, a node that was down during it does
not bring the entry back when it returns (neither through its own copy nor
through the peers' catch-up from it), and a write after the delete
replicates. Mixed with a node of the previous release (a rolling upgrade):
the old node cannot take the delete (404), the row is dropped and counted
instead of piling up, and the node learns the delete by catching up once it
runs this release.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.mesh import (
    MeshNode,
    get_json,
    is_ready,
    mesh,
    metrics,
    request,
    start_all,
    wait_for,
)
from tests.support.release import previous_release

pytestmark = pytest.mark.realnode


def entry(key: str) -> str:
    return f"/ccache/{key}"


def status_of(node: MeshNode, key: str) -> int:
    return request("GET", node.url + entry(key))[0]


def serves(node: MeshNode, key: str, body: bytes) -> bool:
    status, _, served = request("GET", node.url + entry(key))
    return status == 200 and served == body


def outbox_empty(*nodes: MeshNode) -> bool:
    return all(get_json(n.url + "/status/rollout")["outbox_messages"] == 0 for n in nodes)


def whole_log(node: MeshNode) -> str:
    with open(node.log_path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def known_peers(node: MeshNode) -> int:
    return int(get_json(node.url + "/ready")["known_peers"])


def counted(node: MeshNode, prefix: str, *labels: str) -> float:
    return sum(
        value
        for name, value in metrics(node).items()
        if name.startswith(prefix) and all(label in name for label in labels)
    )


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: Any) -> Iterator[list[MeshNode]]:
    built = mesh(str(tmp_path_factory.mktemp("tombstones")), 3, KURA_LOG_FORMAT="text")
    try:
        start_all(built, timeout=60)
        yield built
    finally:
        for node in built:
            node.stop()


def test_a_delete_on_a_is_404_on_b_and_c(nodes: list[MeshNode]) -> None:
    a, b, c = nodes
    key, body = "1" * 40, os.urandom(3000)
    assert request("PUT", a.url + entry(key), body)[0] == 200
    for node in (b, c):
        wait_for("replicated", lambda n=node: serves(n, key, body), 30)
    assert request("DELETE", a.url + entry(key))[0] == 204
    for node in (a, b, c):
        wait_for("deleted", lambda n=node: status_of(n, key) == 404, 30)
    wait_for("outboxes drained", lambda: outbox_empty(a, b, c), 30)
    for node in (a, b, c):
        assert status_of(node, key) == 404


def test_a_node_down_during_the_delete_does_not_bring_it_back(nodes: list[MeshNode]) -> None:
    """C holds the entry and misses the delete; back, it drops it, and A and B never refetch it."""
    a, b, c = nodes
    key, body = "2" * 40, os.urandom(200_000)
    assert request("PUT", b.url + entry(key), body)[0] == 200
    wait_for("C has it", lambda: serves(c, key, body), 30)
    assert c.stop() == 0
    for node in (a, b):  # C left their views: they catch up from it when it is back
        wait_for("C left", lambda n=node: known_peers(n) == 1, 30)
    assert request("DELETE", a.url + entry(key))[0] == 204
    wait_for("B dropped it", lambda: status_of(b, key) == 404, 30)
    c.start()
    # A and B catch up from C (it left and rejoined) while C still offers the
    # entry, and C catches up from them: everyone ends without it.
    wait_for("C dropped it", lambda: status_of(c, key) == 404, 40)
    for node in (a, b, c):
        wait_for("ready", lambda n=node: is_ready(n, 2), 60)
    wait_for("outboxes drained", lambda: outbox_empty(a, b, c), 30)
    for node in (a, b, c):
        assert status_of(node, key) == 404


def test_a_put_after_the_delete_replicates(nodes: list[MeshNode]) -> None:
    a, b, c = nodes
    key = "3" * 40
    assert request("PUT", a.url + entry(key), b"first")[0] == 200
    for node in (b, c):
        wait_for("replicated", lambda n=node: serves(n, key, b"first"), 30)
    assert request("DELETE", b.url + entry(key))[0] == 204
    for node in (a, b, c):
        wait_for("deleted", lambda n=node: status_of(n, key) == 404, 30)
    assert request("PUT", c.url + entry(key), b"rebuilt")[0] == 200
    for node in (a, b, c):
        wait_for("written again", lambda n=node: serves(n, key, b"rebuilt"), 30)


def test_a_rolling_upgrade_with_a_previous_release_node(tmp_path: Any) -> None:
    """The old node 404s the delete: dropped and counted; upgraded, it catches up the delete."""
    old_source = previous_release(str(tmp_path))
    new, old = mesh(str(tmp_path), 2, KURA_LOG_FORMAT="text")
    old = MeshNode(
        old.data_dir,
        old.host,
        old.internal_port,
        source=old_source,
        KURA_PEERS=new.internal_url,
        KURA_LOG_FORMAT="text",
    )
    try:
        start_all([new, old], timeout=60)
        # The new node caught up from the old one without its artifact tombstones.
        assert "serves no artifact tombstones" in whole_log(new)
        key, body = "4" * 40, os.urandom(5000)
        assert request("PUT", new.url + entry(key), body)[0] == 200
        wait_for("the old node has it", lambda: serves(old, key, body), 30)
        assert request("DELETE", new.url + entry(key))[0] == 204
        assert status_of(new, key) == 404
        wait_for("the row is gone", lambda: outbox_empty(new), 30)
        dropped = counted(
            new,
            "kura_replication_requests_total",
            'operation="delete_artifact"',
            'result="dropped_unsupported"',
        )
        assert dropped == 1
        assert serves(old, key, body)  # as every release before served a deleted entry
        assert "does not know artifact deletes" in whole_log(new)
        # The upgrade: the same data directory, this release.
        assert old.stop() == 0
        upgraded = MeshNode(
            old.data_dir,
            old.host,
            old.internal_port,
            KURA_PEERS=new.internal_url,
            KURA_LOG_FORMAT="text",
        )
        old = upgraded
        upgraded.start()
        wait_for("the upgraded node dropped it", lambda: status_of(upgraded, key) == 404, 40)
        for node in (new, upgraded):
            wait_for("ready", lambda n=node: is_ready(n, 1), 60)
        assert status_of(new, key) == 404  # its catch-up from the upgraded node refused it
        assert request("PUT", upgraded.url + entry(key), b"rebuilt")[0] == 200
        wait_for("written again", lambda: serves(new, key, b"rebuilt"), 30)
    finally:
        new.stop()
        old.stop()

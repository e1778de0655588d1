"""A rolling upgrade from unsigned peers to signed peers, on two real nodes.

Node A runs the previous release's configuration (peers, no secret; on this
release that takes ``KURA_INTERNAL_INSECURE=true``, and on the wire it is the
previous release: it neither signs nor checks). Node B runs the new one: a
peer secret plus ``KURA_PEER_ACCEPT_UNSIGNED_UNTIL``. The documented steps
(``docs/operations.md``, "Upgrading to signed peers") are played out:

1. mixed mesh: both replicate to each other while the window is open;
2. the window closes on B (the operator removes it): A's unsigned writes are
   refused and wait in A's outbox, nothing is lost;
3. A is upgraded (restarted with the secret): its backlog reaches B, and
   both directions work signed.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tests.support.mesh import (
    HOSTS,
    MESH_SECRET,
    MeshNode,
    get_json,
    metrics,
    request,
    shared_port,
    wait_for,
)

pytestmark = pytest.mark.realnode

TENANT = "tenant_id=default"


def has(node: MeshNode, path: str, body: bytes) -> bool:
    status, _, answer = request("GET", node.url + path)
    return status == 200 and answer == body


def outbox(node: MeshNode) -> int:
    return int(get_json(node.url + "/status/rollout")["outbox_messages"])


def test_unsigned_to_signed_without_losing_a_write(tmp_path: Any) -> None:
    """Old and new configurations replicate both ways; closing the window loses nothing."""
    hosts = list(HOSTS[:2])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]
    old = {"KURA_PEER_SECRET": "", "KURA_INTERNAL_INSECURE": "true", "KURA_PEERS": urls[1]}
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    window = {"KURA_PEER_ACCEPT_UNSIGNED_UNTIL": until.isoformat().replace("+00:00", "Z")}
    new = {"KURA_PEER_SECRET": MESH_SECRET, "KURA_PEERS": urls[0]}
    a = MeshNode(f"{tmp_path}/a", hosts[0], port, **old)
    b = MeshNode(f"{tmp_path}/b", hosts[1], port, **new, **window)
    a.start()
    b.start()
    try:
        # 1. A mixed mesh replicates both ways.
        assert request("PUT", a.url + f"/api/cache/gradle/from-a?{TENANT}", b"a1")[0] == 201
        assert request("PUT", b.url + f"/api/cache/gradle/from-b?{TENANT}", b"b1")[0] == 201
        wait_for("A's write on B", lambda: has(b, f"/api/cache/gradle/from-a?{TENANT}", b"a1"), 30)
        wait_for("B's write on A", lambda: has(a, f"/api/cache/gradle/from-b?{TENANT}", b"b1"), 30)
        accepted = metrics(b).get('kura_peer_auth_total{result="unsigned_accepted",side="server"}')
        assert accepted and accepted > 0
        assert "KURA_PEER_ACCEPT_UNSIGNED_UNTIL" in b.log()

        # 2. The window closes on B: A's unsigned write is refused and kept.
        b.stop()
        b = MeshNode(f"{tmp_path}/b", hosts[1], port, **new)
        b.start()
        assert request("PUT", a.url + f"/api/cache/gradle/late?{TENANT}", b"a2")[0] == 201
        refused = 'kura_peer_auth_total{result="unsigned",side="server"}'
        wait_for("B refuses A", lambda: metrics(b).get(refused, 0) > 0, 30)
        assert outbox(a) >= 1
        assert not has(b, f"/api/cache/gradle/late?{TENANT}", b"a2")

        # 3. A is upgraded: its backlog reaches B, signed.
        a.stop()
        a = MeshNode(f"{tmp_path}/a", hosts[0], port, **{**old, **new, "KURA_PEERS": urls[1]})
        a.environ.pop("KURA_INTERNAL_INSECURE")
        a.start()
        wait_for("the backlog on B", lambda: has(b, f"/api/cache/gradle/late?{TENANT}", b"a2"), 60)
        wait_for("A's outbox drained", lambda: outbox(a) == 0, 30)
        assert request("PUT", b.url + f"/api/cache/gradle/signed?{TENANT}", b"b2")[0] == 201
        wait_for("B's write on A", lambda: has(a, f"/api/cache/gradle/signed?{TENANT}", b"b2"), 30)
        assert get_json(a.url + "/status/rollout")["peer_auth_mode"] == "signed"
    finally:
        a.stop()
        b.stop()

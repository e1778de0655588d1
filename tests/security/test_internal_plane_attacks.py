"""Attacks on the internal plane, performed against real nodes (``twistd kura`` processes).

Each test is an attack that used to succeed: an unauthenticated replicated
write that pins a key forever (``version_ms`` at int64's maximum), a
far-future tombstone that refuses every later write to a namespace, a clean
of every tenant-scoped artifact, reading any artifact through catch-up, and
an internal plane reachable from the network on a single node. Each now
fails, and the cache still serves and accepts what it should.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.replication import wire
from tests.support.mesh import (
    MESH_SECRET,
    MeshNode,
    get_json,
    mesh,
    metrics,
    request,
    signed_headers,
    start_all,
    wait_for,
)
from tests.support.real import RealNode

pytestmark = pytest.mark.realnode

TENANT = "tenant_id=default"
INT64_MAX = 2**63 - 1
GRADLE = f"/api/cache/gradle/pinned?{TENANT}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[MeshNode]]:
    """Two nodes of a signed mesh (KURA_PEER_SECRET), started and ready (shared: every
    test attacks its own keys)."""
    nodes = mesh(str(tmp_path_factory.mktemp("mesh")), 2)
    start_all(nodes)
    yield nodes
    for node in nodes:
        node.stop()


def upsert_url(node: MeshNode, key: str, version: int, namespace: str = "") -> str:
    message = wire.UpsertMessage(
        Producer.GRADLE, namespace, key, "application/octet-stream", False, version
    )
    return wire.url(node.internal_url, wire.REPLICATE_ARTIFACT_PATH, message.params())


def delete_url(node: MeshNode, namespace: str, version: int) -> str:
    message = wire.DeleteMessage(namespace, version)
    return wire.url(node.internal_url, wire.REPLICATE_NAMESPACE_PATH, message.params())


def now_ms() -> int:
    return int(time.time() * 1000)


def sample(node: RealNode, name: str) -> float:
    return metrics(node).get(name, 0.0)


def artifact_delete_url(node: MeshNode, artifact_id: str, version: int) -> str:
    message = wire.ArtifactDeleteMessage(artifact_id, "", version)
    return wire.url(node.internal_url, wire.REPLICATE_ARTIFACT_PATH, message.params())


def test_a_single_node_keeps_its_internal_plane_on_loopback(tmp_path: Any) -> None:
    """Bound to every interface, a node without peers still listens internally on 127.0.0.1."""
    node = RealNode(f"{tmp_path}/single", KURA_BIND_HOST="0.0.0.0").start()
    try:
        listening = {
            c.laddr.port: c.laddr.ip
            for c in psutil.Process(node.process.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening[node.port] == "0.0.0.0"
        assert listening[node.internal_port] == "127.0.0.1"
    finally:
        node.stop()


def test_a_mesh_without_peer_authentication_refuses_to_start(tmp_path: Any) -> None:
    """Peers and neither a secret nor mTLS names: the process exits, naming the fix."""
    node = RealNode(f"{tmp_path}/lonely")
    node.environ["KURA_PEERS"] = f"http://127.0.0.9:{node.internal_port}"
    with pytest.raises(RuntimeError, match="node exited"):
        node.start(timeout=20)
    assert "KURA_PEER_SECRET" in node.log()
    assert "KURA_INTERNAL_INSECURE=true" in node.log()


def test_an_explicitly_insecure_mesh_warns_at_start(tmp_path: Any) -> None:
    """KURA_INTERNAL_INSECURE=true starts the node, says what it costs, and reports it."""
    node = RealNode(f"{tmp_path}/insecure", KURA_INTERNAL_INSECURE="true")
    node.environ["KURA_PEERS"] = f"http://127.0.0.9:{node.internal_port}"
    node.start()
    try:
        assert "accepts unauthenticated peer requests" in node.log()
        assert get_json(node.url + "/status/rollout")["peer_auth_mode"] == "insecure"
    finally:
        node.stop()


def test_unauthenticated_peer_requests_are_refused(pair: list[MeshNode]) -> None:
    """Writes, tombstones (namespace and artifact) and catch-up reads (pages in both
    orders, tombstone pages, bodies) without the mesh secret are all 401."""
    a, b = pair
    assert request("PUT", a.url + GRADLE, b"the real artifact")[0] == 201
    artifact_id = ArtifactAddress(Producer.GRADLE, "", "pinned").artifact_id("default")
    tenant = {"X-Kura-Tenant-Id": "default"}
    attacks: list[tuple[str, str, bytes]] = [
        ("PUT", upsert_url(b, "pinned", INT64_MAX - 1), b"poison"),
        ("DELETE", delete_url(b, "", INT64_MAX - 1), b""),
        ("DELETE", artifact_delete_url(b, artifact_id, INT64_MAX - 1), b""),
        ("GET", f"{b.internal_url}{wire.ARTIFACTS_PATH}/{artifact_id}", b""),
        ("GET", f"{b.internal_url}{wire.MANIFESTS_PATH}", b""),
        ("GET", f"{b.internal_url}{wire.MANIFESTS_PATH}?order=recent", b""),
        ("GET", f"{b.internal_url}{wire.TOMBSTONES_PATH}", b""),
        ("GET", f"{b.internal_url}{wire.ARTIFACT_TOMBSTONES_PATH}", b""),
        ("GET", f"{b.internal_url}{wire.STATUS_PATH}", b""),
    ]
    for method, url, body in attacks:
        status, _, answer = request(method, url, body or None, tenant)
        assert status == 401, (method, url, status, answer)
        assert b"poison" not in answer and b"the real artifact" not in answer
    forged = signed_headers("PUT", attacks[0][1], b"poison", secret="x" * 40)
    assert request("PUT", attacks[0][1], b"poison", forged)[0] == 401
    # Nothing stuck: B serves the real artifact and a later write still wins.
    wait_for("replicated", lambda: request("GET", b.url + GRADLE)[2] == b"the real artifact", 30)
    assert request("PUT", b.url + f"/api/cache/gradle/after?{TENANT}", b"later")[0] == 201
    refused = 'kura_peer_auth_total{result="unsigned",side="server"}'
    assert sample(b, refused) >= len(attacks)


def test_a_replayed_signed_request_is_refused(pair: list[MeshNode]) -> None:
    """A captured, correctly signed request works once; sent again it is a replay."""
    _, b = pair
    url = upsert_url(b, "replayed", now_ms())
    headers = signed_headers("PUT", url, b"body")
    assert request("PUT", url, b"body", headers)[0] == 204
    assert request("PUT", url, b"body", headers)[0] == 401


def test_a_body_swapped_under_its_signature_is_refused(pair: list[MeshNode]) -> None:
    """The signature covers the body's digest: other bytes are refused, nothing stored."""
    _, b = pair
    url = upsert_url(b, "swapped", now_ms())
    headers = signed_headers("PUT", url, b"the signed bytes")
    status, _, body = request("PUT", url, b"other bytes here", headers)
    assert status == 400 and b"signed SHA-256" in body
    assert request("GET", b.url + f"/api/cache/gradle/swapped?{TENANT}")[0] == 404
    assert sample(b, 'kura_replication_rejected_total{reason="digest_mismatch"}') == 1


def test_versions_beyond_int64_or_far_in_the_future_are_refused(pair: list[MeshNode]) -> None:
    """A signed peer still cannot pin a key or a namespace with an absurd version."""
    _, b = pair
    overflow = upsert_url(b, "pin", 1).replace("version_ms=1", f"version_ms={INT64_MAX + 1}")
    status, _, body = request("PUT", overflow, b"x", signed_headers("PUT", overflow, b"x"))
    assert status == 400 and b"version_ms" in body
    ahead = now_ms() + 10 * 60 * 1000
    pin = upsert_url(b, "pin", ahead)
    assert request("PUT", pin, b"x", signed_headers("PUT", pin, b"x"))[0] == 422
    tombstone = delete_url(b, "", ahead)
    assert request("DELETE", tombstone, None, signed_headers("DELETE", tombstone))[0] == 422
    assert sample(b, 'kura_replication_rejected_total{reason="clock_skew"}') == 2
    # Nothing was pinned: ordinary writes to that key and namespace go through.
    assert request("PUT", b.url + f"/api/cache/gradle/pin?{TENANT}", b"fine")[0] == 201
    assert request("GET", b.url + f"/api/cache/gradle/pin?{TENANT}")[2] == b"fine"


def test_a_signed_mesh_still_replicates_both_ways(pair: list[MeshNode]) -> None:
    """With every request signed and checked, writes and cleans still reach the peer."""
    a, b = pair
    path = f"/api/cache/cas/s1?{TENANT}&namespace_id=p"
    assert request("POST", b.url + path, os.urandom(300_000))[0] == 204
    wait_for("on A", lambda: request("GET", a.url + path)[0] == 200, 30)
    assert request("DELETE", a.url + f"/api/cache/clean?{TENANT}&namespace_id=p")[0] == 204
    wait_for("cleaned on B", lambda: request("GET", b.url + path)[0] == 404, 30)
    assert sample(b, 'kura_peer_auth_total{result="ok",side="server"}') > 0
    assert sample(b, 'kura_peer_auth_total{result="ok",side="client"}') > 0
    assert "cleaned from a peer" in b.log()
    for node in (a, b):
        assert MESH_SECRET not in node.log()
        assert MESH_SECRET not in str(metrics(node))

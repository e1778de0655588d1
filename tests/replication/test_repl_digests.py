"""Bodies verified end to end between peers: declared digests, checked before publishing.

The receiving side (a peer's upsert, a catch-up body) checks every body
against the digest its sender declared, signed or not, and stores nothing
that does not match; the sending side sends only bodies that still match the
digest stored with them, and a node that finds its copy damaged fetches it
again from a peer that has it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from repl_support import MemoryMesh, blob_files, public, ready, url_of
from test_repl_receiver import TENANT, InternalExchange, upsert

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.replication import wire
from kura.service import KuraNode
from kura.testing import Exchange, memory_node, sample
from tests.support.corruption import flip_byte
from tests.support.mesh import MESH_SECRET

GRADLE = "/api/cache/gradle/{}?tenant_id=default"
DIGEST = "X-Kura-Content-Sha256"
#: The environment of a mesh that does not sign (peers admitted by network or mTLS).
UNSIGNED = {"KURA_PEER_SECRET": "", "KURA_INTERNAL_INSECURE": "true"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(node: KuraNode, key: str) -> str | None:
    address = ArtifactAddress(Producer.GRADLE, "", key)
    manifest = node.store.metadata.get_manifest(node.store.artifact_id(address))
    return None if manifest is None else manifest.digest


def rejected(node: KuraNode) -> float:
    return sample(node, "kura_replication_rejected_total", reason="digest_mismatch")


# -- the receiver ---------------------------------------------------------------------------


@pytest.fixture(params=["signed", "unsigned"])
def receiver(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[tuple[KuraNode, bool]]:
    """A node receiving replicated writes from peers that sign, or from peers that do not."""
    signed = request.param == "signed"
    environ = {"KURA_PEER_SECRET": MESH_SECRET} if signed else UNSIGNED
    node = memory_node(
        f"{tmp_path}/data",
        KURA_PEERS="http://127.0.0.9:0",
        KURA_MAX_KEYVALUE_BYTES="100000",
        **environ,
    )
    yield node, signed
    node.stopService()


def send(node: KuraNode, signed: bool, target: str, body: bytes, declared: bytes | None) -> Any:
    """PUT ``body`` to the internal plane declaring the digest of ``declared`` (if any)."""
    exchange = InternalExchange(node, sign=signed)
    headers = dict(TENANT)
    if declared is not None:
        headers[DIGEST] = sha(declared)
    if signed:  # the signature covers the declared digest
        headers = {**exchange.signed("PUT", target, declared or b""), **headers}
    return Exchange.request(exchange, "PUT", target, body, headers)


@pytest.mark.parametrize("size", [100, 300_000], ids=["memory", "staged"])
def test_a_body_that_is_not_the_declared_one_is_refused_and_nothing_is_stored(
    receiver: tuple[KuraNode, bool], size: int
) -> None:
    """Signed or not, a replicated body checked against its declared digest: 400, counted."""
    node, signed = receiver
    body = os.urandom(size)
    response = send(node, signed, upsert("k1"), body, declared=body[:-1] + b"!")
    assert response.status == 400
    what = "signed" if signed else "declared"
    assert response.json() == {
        "message": f"Replicated body does not match its {what} SHA-256 digest"
    }
    assert rejected(node) == 1
    assert blob_files(node) == [] and digest_of(node, "k1") is None
    assert node.store.tmp_budget.used == 0
    assert public(node, "GET", GRADLE.format("k1")).status == 404


@pytest.mark.parametrize("size", [100, 300_000], ids=["memory", "staged"])
def test_a_body_that_matches_is_stored_with_the_declared_digest(
    receiver: tuple[KuraNode, bool], size: int
) -> None:
    """The digest the sender declared is the one stored (computed here as the body landed)."""
    node, signed = receiver
    body = os.urandom(size)
    assert send(node, signed, upsert("k1"), body, declared=body).status == 204
    assert digest_of(node, "k1") == sha(body)
    assert public(node, "GET", GRADLE.format("k1")).body == body
    assert rejected(node) == 0


def test_an_inline_body_is_checked_too(receiver: tuple[KuraNode, bool]) -> None:
    """Key-value values are verified against their declared digest before they are stored."""
    node, signed = receiver
    value = b'{"entries":[{"value":"v"}]}'
    target = upsert("action_cache/c1", producer=Producer.XCODE, inline=True)
    assert send(node, signed, target, value, declared=b"{}").status == 400
    assert rejected(node) == 1
    assert send(node, signed, target, value, declared=value).status == 204
    response = public(node, "GET", "/api/cache/keyvalue/c1?tenant_id=default")
    assert response.body == value


def test_a_previous_release_that_declares_nothing_is_stored_with_the_digest_computed_here(
    tmp_path: object,
) -> None:
    """An unsigned peer of the previous release sends no digest: the body lands as sent."""
    node = memory_node(f"{tmp_path}/data", KURA_PEERS="http://127.0.0.9:0", **UNSIGNED)
    try:
        body = os.urandom(70_000)
        assert send(node, False, upsert("k1"), body, declared=None).status == 204
        assert digest_of(node, "k1") == sha(body)
    finally:
        node.stopService()


@pytest.mark.parametrize("value", ["nothex" * 8, "A" * 64, "a" * 63])
def test_a_malformed_declared_digest_is_a_400(tmp_path: object, value: str) -> None:
    """An unsigned peer's digest header must be one lowercase hex SHA-256."""
    node = memory_node(f"{tmp_path}/data", KURA_PEERS="http://127.0.0.9:0", **UNSIGNED)
    try:
        exchange = InternalExchange(node, sign=False)
        response = Exchange.request(
            exchange, "PUT", upsert("k1"), b"body", {**TENANT, DIGEST: value}
        )
        assert response.status == 400 and "X-Kura-Content-Sha256" in response.json()["message"]
        assert blob_files(node) == []
    finally:
        node.stopService()


def test_catch_up_pages_and_bodies_declare_the_stored_digest(
    receiver: tuple[KuraNode, bool],
) -> None:
    """A page names each manifest's digest, and the body response declares it, signed or not."""
    node, signed = receiver
    body = os.urandom(5000)
    assert public(node, "PUT", GRADLE.format("k1"), body).status == 201
    exchange = InternalExchange(node, sign=signed)
    page = exchange.request("GET", wire.MANIFESTS_PATH, headers=TENANT).json()
    (item,) = page["manifests"]
    assert item["digest"] == sha(body)
    assert wire.PeerManifest.from_json(item).digest == sha(body)
    fetched = InternalExchange(node, sign=signed).request(
        "GET", f"{wire.ARTIFACTS_PATH}/{item['artifact_id']}", headers=TENANT
    )
    assert fetched.body == body
    assert fetched.headers["x-kura-content-sha256"] == sha(body)


def test_peer_manifests_of_either_release_parse() -> None:
    """A previous release's page item (no digest) parses; a digest present must be valid."""
    old = {
        "artifact_id": "a" * 64,
        "producer": "gradle",
        "namespace_id": "",
        "key": "k",
        "content_type": "application/octet-stream",
        "inline": False,
        "size": 3,
        "version_ms": 1,
    }
    assert wire.PeerManifest.from_json(old).digest is None
    assert wire.PeerManifest.from_json({**old, "digest": None}).digest is None
    assert wire.PeerManifest.from_json({**old, "digest": "b" * 64}).digest == "b" * 64
    with pytest.raises(ValueError, match="digest"):
        wire.PeerManifest.from_json({**old, "digest": "B" * 64})
    # What this release sends: the previous release's fields, plus a digest when known.
    assert wire.PeerManifest.from_json(old).to_json() == old
    assert json.loads(json.dumps(wire.PeerManifest(**{**old, "digest": "c" * 64}).to_json())) == {
        **old,
        "digest": "c" * 64,
    }


# -- between nodes --------------------------------------------------------------------------


@pytest.fixture
def mesh(tmp_path: object) -> Iterator[MemoryMesh]:
    built = MemoryMesh(str(tmp_path))
    yield built
    built.stop()


def pair(mesh: MemoryMesh, **environ: str) -> tuple[KuraNode, KuraNode]:
    a = mesh.add(0, [1], **environ)
    b = mesh.add(1, [0], **environ)
    mesh.run_until(lambda: all(ready(n) and n.state.membership.known_peers for n in (a, b)), 60)
    return a, b


def drained(node: KuraNode) -> bool:
    return node.store.metadata.outbox_batch(0, 100_000) == []


def blob_of(node: KuraNode, key: str) -> str:
    address = ArtifactAddress(Producer.GRADLE, "", key)
    manifest = node.store.metadata.get_manifest(node.store.artifact_id(address))
    assert manifest is not None and manifest.blob_path is not None
    return node.store.layout.absolute(manifest.blob_path)


def test_a_blob_corrupted_before_it_is_sent_is_never_replicated(mesh: MemoryMesh) -> None:
    """The outbox checks the body before sending it: A forgets it, B never receives it."""
    a, b = pair(mesh)
    assert public(a, "PUT", GRADLE.format("g1"), os.urandom(80_000)).status == 201
    flip_byte(blob_of(a, "g1"))
    mesh.run_until(lambda: drained(a), 30)
    mesh.advance(5)
    assert public(b, "GET", GRADLE.format("g1")).status == 404
    assert public(a, "GET", GRADLE.format("g1")).status == 404
    assert sample(a, "kura_corrupt_artifacts_total") == 1
    assert rejected(b) == 0  # not even offered
    # A asked its peer for it again; B never had it.
    assert sample(a, "kura_artifact_repairs_total", result="unavailable") == 1


def corrupt_in_database(node: KuraNode, key: str) -> None:
    """Change the bytes of ``key``'s body kept in the database, as a disk would,
    and forget the copy held in memory (so the next read goes to SQLite)."""
    address = ArtifactAddress(Producer.GRADLE, "", key)
    conn = sqlite3.connect(node.store.layout.database)
    with conn:
        changed = conn.execute(
            "UPDATE key_values SET value = zeroblob(length(value)) WHERE artifact_id = ?",
            (node.store.artifact_id(address),),
        ).rowcount
    conn.close()
    assert changed == 1
    node.store.bodies.clear()


@pytest.mark.parametrize("size", [50_000, 80_000], ids=["database", "file"])
def test_a_corrupted_blob_is_not_handed_out_in_a_catch_up(mesh: MemoryMesh, size: int) -> None:
    """A late joiner catching up from a node whose copy rotted does not get the bytes
    (a small body is kept in the database, a larger one in a file)."""
    a = mesh.add(0, [])
    mesh.run_until(lambda: ready(a), 30)
    good = os.urandom(size)
    assert public(a, "PUT", GRADLE.format("bad"), os.urandom(size)).status == 201
    assert public(a, "PUT", GRADLE.format("good"), good).status == 201
    if size <= a.store.memory_body_bytes:
        corrupt_in_database(a, "bad")
    else:
        flip_byte(blob_of(a, "bad"))
    c = mesh.add(2, [0])
    mesh.run_until(lambda: ready(c) and c.state.membership.known_peers, 60)
    assert public(c, "GET", GRADLE.format("good")).body == good
    assert public(c, "GET", GRADLE.format("bad")).status == 404
    assert sample(a, "kura_corrupt_artifacts_total") == 1
    assert rejected(c) == 0


@pytest.mark.parametrize("environ", [{}, UNSIGNED], ids=["signed", "unsigned"])
def test_bytes_changed_in_transit_are_refused_by_the_receiver(
    mesh: MemoryMesh, environ: dict[str, str]
) -> None:
    """A sender that sends other bytes than it declares (its check bypassed here, as a
    corrupting link would): the receiver refuses them, for upserts and catch-up alike."""
    a = mesh.add(0, [], **environ)
    mesh.run_until(lambda: ready(a), 30)
    assert public(a, "PUT", GRADLE.format("g1"), os.urandom(80_000)).status == 201
    flip_byte(blob_of(a, "g1"))
    store: Any = a.store

    async def blind(manifest: Any, fd: int, *status: Any) -> bool:
        return True

    store.verify_open = blind
    b = mesh.add(1, [0], **environ)
    mesh.advance(30)
    assert public(b, "GET", GRADLE.format("g1")).status == 404
    assert blob_files(b) == []
    assert rejected(b) >= 1
    assert sample(b, "kura_bootstrap_runs_total", result="ok") == 0  # retried, never taken


def test_a_node_fetches_its_damaged_copy_again_from_a_peer(mesh: MemoryMesh) -> None:
    """Corruption found at a read: a miss now, the intact bytes again from the peer."""
    a, b = pair(mesh)
    body = os.urandom(120_000)
    assert public(a, "PUT", GRADLE.format("g1"), body).status == 201
    mesh.run_until(lambda: public(b, "GET", GRADLE.format("g1")).status == 200, 30)
    flip_byte(blob_of(b, "g1"))
    assert public(b, "GET", GRADLE.format("g1")).status == 404
    mesh.run_until(lambda: sample(b, "kura_artifact_repairs_total", result="fetched") == 1, 30)
    assert public(b, "GET", GRADLE.format("g1")).body == body
    assert digest_of(b, "g1") == sha(body)
    assert b.store.outbox_depth == 0  # a repair is not sent on
    assert url_of(0) in b.state.membership.known_peers

"""Concurrent writers of one key: one stored copy, never interleaved, never stored twice."""

from __future__ import annotations

from typing import Any

import pytest

from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, files_under, request

GRADLE = "/api/cache/gradle/shared?tenant_id=default"

#: route target, method, status for the writer that stored, status for the other.
ROUTES = [
    (GRADLE, "PUT", 201, 200),
    ("/api/cache/cas/shared?tenant_id=default", "POST", 204, 204),
    ("/v1/cache/shared", "PUT", 200, 200),
    ("/api/metro/cache/shared", "PUT", 200, 200),
]


def open_upload(node: KuraNode, method: str, target: str, size: int) -> Exchange:
    client = Exchange(node)
    client.send(
        f"{method} {target} HTTP/1.1\r\nHost: kura\r\nContent-Length: {size}\r\n\r\n".encode()
    )
    return client


def assert_single_copy(node: KuraNode, target: str, expected: bytes) -> None:
    assert request(node, "GET", target).body == expected
    assert len(files_under(node.store.layout.blobs)) == 1
    assert files_under(node.store.layout.uploads) == []
    assert node.store.tmp_budget.used == 0
    assert node.store.metadata.used_bytes == len(expected)


@pytest.mark.parametrize(("target", "method", "stored", "existing"), ROUTES)
@pytest.mark.parametrize("first_to_finish", ["a", "b"])
def test_interleaved_uploads_of_one_new_key(
    node: KuraNode,
    target: str,
    method: str,
    stored: int,
    existing: int,
    first_to_finish: str,
) -> None:
    """Bodies interleaved on two connections: the first to finish is stored, whole."""
    bodies = {"a": b"A" * 300_000 + b"end-of-a", "b": b"B" * 300_000 + b"end-of-b"}
    size = len(bodies["a"])
    clients = {name: open_upload(node, method, target, size) for name in ("a", "b")}
    half = size // 2
    for name in ("a", "b"):
        clients[name].send(bodies[name][:half])
    assert node.store.tmp_budget.used == 2 * size
    second = "b" if first_to_finish == "a" else "a"
    clients[first_to_finish].send(bodies[first_to_finish][half:])
    clients[second].send(bodies[second][half:])
    (winner,) = clients[first_to_finish].responses()
    (loser,) = clients[second].responses()
    assert winner.status == stored
    assert loser.status == existing
    assert_single_copy(node, target, bodies[first_to_finish])


def test_writers_in_one_group_commit_store_one_copy(nodes: Any) -> None:
    """Two complete uploads of one key committed in the same transaction: the first wins."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    clients = {name: open_upload(node, "PUT", GRADLE, 5) for name in ("a", "b")}
    # A transaction's hop: alone, or writing small bodies first.
    commits = ("MetadataStore.commit", "ArtifactStore._write_and_commit")
    runner.hold = lambda f: getattr(f, "__qualname__", "") in commits
    # A key-value write takes the committer; both uploads then queue behind it.
    kv_body = b'{"cas_id":"k","entries":[{"value":""}]}'
    kv = Exchange(node)
    kv.send(
        b"PUT /api/cache/keyvalue?tenant_id=default HTTP/1.1\r\nHost: kura\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(kv_body), kv_body)
    )
    clients["a"].send(b"aaaaa")
    clients["b"].send(b"bbbbb")
    assert len(runner.held) == 1
    runner.release()  # the key-value transaction
    assert len(runner.held) == 1  # one transaction carrying both uploads
    runner.release()
    assert runner.held == []
    (a,) = clients["a"].responses()
    (b,) = clients["b"].responses()
    assert (a.status, b.status) == (201, 200)
    assert kv.responses()[0].status == 204
    runner.hold = lambda f: False
    assert_single_copy(node, GRADLE, b"aaaaa")


def test_existing_key_is_not_stored_twice(node: KuraNode) -> None:
    """Uploading a stored key again never writes a second file or changes the bytes."""
    assert request(node, "PUT", GRADLE, b"original").status == 201
    for _ in range(3):
        assert request(node, "PUT", GRADLE, b"replacement").status == 200
    assert_single_copy(node, GRADLE, b"original")

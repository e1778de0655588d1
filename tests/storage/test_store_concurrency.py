"""Concurrent writers of one key: one stored copy, never interleaved, never stored twice."""

from __future__ import annotations

from typing import Any

import pytest

from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, files_under, request
from tests.support.stored import stored_bodies

GRADLE = "/api/cache/gradle/shared?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}
LAYOUTS = pytest.mark.parametrize("environ", [{}, FILES], ids=["database", "files"])

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
    # One body stored, in a file or in the database.
    assert sum(stored_bodies(node.config.data_dir)) == 1
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


@LAYOUTS
def test_writers_in_one_group_commit_store_one_copy(nodes: Any, environ: dict[str, str]) -> None:
    """Two complete uploads of one key committed in the same transaction: the first wins."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner, **environ)
    clients = {name: open_upload(node, "PUT", GRADLE, 5) for name in ("a", "b")}
    # A transaction's hop (which stores the bodies kept in the database).
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "MetadataStore.commit"
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


@LAYOUTS
def test_existing_key_is_not_stored_twice(nodes: Any, environ: dict[str, str]) -> None:
    """Uploading a stored key again never stores a second body or changes the bytes."""
    node = nodes.start(**environ)
    assert request(node, "PUT", GRADLE, b"original").status == 201
    for _ in range(3):
        assert request(node, "PUT", GRADLE, b"replacement").status == 200
    assert_single_copy(node, GRADLE, b"original")

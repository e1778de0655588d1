"""Small bodies kept in the metadata database: stored with their manifest, no file.

A body received in memory (``KURA_MEMORY_BODY_MAX_BYTES``) is written into
``key_values`` by the transaction that records its manifest. These tests
hold the rest of the store to that layout: reads (whole, ranges, HEAD, from
the body cache or from SQLite), damage, eviction, deletes, crashes and a
restart.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from kura.service import KuraNode
from kura.testing import files_under, request, sample
from tests.conftest import anonymous_deletes
from tests.support.stored import database_bodies

CAS = "/api/cache/cas/{id}?tenant_id=default"
GRADLE = "/api/cache/gradle/{key}?tenant_id=default"
CCACHE = "/ccache/{key}"
BODY = b"0123456789abcdef" * 256  # 4 KiB: received in memory


def rows(node: KuraNode, query: str) -> list[tuple[Any, ...]]:
    """``query`` against the node's metadata database, from a connection of our own."""
    conn = sqlite3.connect(node.store.layout.database)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def test_a_small_body_is_stored_with_its_manifest_and_no_file(node: KuraNode) -> None:
    assert request(node, "POST", CAS.format(id="c1"), BODY).status == 204
    assert database_bodies(node.config.data_dir) == [("c1", len(BODY))]
    assert files_under(node.store.layout.blobs) == []
    assert node.store.metadata.used_bytes == len(BODY)  # counted against the capacity
    response = request(node, "GET", CAS.format(id="c1"))
    assert (response.status, response.body) == (200, BODY)
    assert response.headers["content-length"] == str(len(BODY))


def test_a_body_over_the_memory_limit_is_still_a_file(nodes: Any) -> None:
    node = nodes.start(KURA_MEMORY_BODY_MAX_BYTES="1024")
    assert request(node, "POST", CAS.format(id="c1"), BODY).status == 204
    assert database_bodies(node.config.data_dir) == []
    assert len(files_under(node.store.layout.blobs)) == 1
    assert request(node, "GET", CAS.format(id="c1")).body == BODY


def test_with_memory_bodies_off_even_an_empty_body_is_a_file(nodes: Any) -> None:
    node = nodes.start(KURA_MEMORY_BODY_MAX_BYTES="0")
    assert request(node, "POST", CAS.format(id="empty"), b"").status == 204
    assert database_bodies(node.config.data_dir) == []
    assert len(files_under(node.store.layout.blobs)) == 1
    assert request(node, "GET", CAS.format(id="empty")).body == b""


def test_ranges_validators_and_head_are_those_of_any_blob(node: KuraNode) -> None:
    request(node, "POST", CAS.format(id="c1"), BODY)
    whole = request(node, "GET", CAS.format(id="c1"))
    etag = whole.headers["etag"]
    part = request(node, "GET", CAS.format(id="c1"), headers={"Range": "bytes=16-31"})
    assert (part.status, part.body) == (206, BODY[16:32])
    assert part.headers["content-range"] == f"bytes 16-31/{len(BODY)}"
    if_range = request(
        node, "GET", CAS.format(id="c1"), headers={"Range": "bytes=0-3", "If-Range": etag}
    )
    assert (if_range.status, if_range.body) == (206, BODY[:4])
    stale = request(
        node, "GET", CAS.format(id="c1"), headers={"Range": "bytes=0-3", "If-Range": '"1-1"'}
    )
    assert (stale.status, stale.body) == (200, BODY)
    assert request(node, "GET", CAS.format(id="c1"), headers={"Range": "bytes=9999-"}).status == 416
    head = request(node, "HEAD", CAS.format(id="c1"))
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-length"] == str(len(BODY))


def test_a_body_not_held_in_memory_is_read_back_checked_and_held_again(node: KuraNode) -> None:
    request(node, "POST", CAS.format(id="c1"), BODY)
    assert len(node.store.bodies) == 1  # the commit held what it stored
    node.store.bodies.clear()
    assert request(node, "GET", CAS.format(id="c1")).body == BODY
    assert len(node.store.bodies) == 1


def test_a_damaged_body_is_forgotten_and_answered_as_a_miss(node: KuraNode) -> None:
    request(node, "POST", CAS.format(id="c1"), BODY)
    node.store.bodies.clear()
    conn = sqlite3.connect(node.store.layout.database)
    with conn:
        conn.execute("UPDATE key_values SET value = ?", (b"X" * len(BODY),))
    conn.close()
    assert request(node, "GET", CAS.format(id="c1")).status == 404
    assert database_bodies(node.config.data_dir) == []
    assert node.store.metadata.used_bytes == 0
    assert sample(node, "kura_damaged_artifacts_total") == 1


def test_a_newer_version_replaces_the_body_and_the_cached_copy(node: KuraNode) -> None:
    target = CCACHE.format(key="a" * 40)
    assert request(node, "PUT", target, b"first").status in (200, 201, 204)
    node.reactor.advance(1)
    assert request(node, "PUT", target, b"second!").status in (200, 201, 204)
    assert request(node, "GET", target).body == b"second!"
    node.store.bodies.clear()
    assert request(node, "GET", target).body == b"second!"
    assert database_bodies(node.config.data_dir) == [("a" * 40, 7)]
    assert node.store.metadata.used_bytes == 7


def test_a_newer_version_in_a_file_takes_the_older_body_out_of_memory(node: KuraNode) -> None:
    target = CCACHE.format(key="a" * 40)
    request(node, "PUT", target, b"small")
    assert len(node.store.bodies) == 1
    node.reactor.advance(1)
    large = b"L" * (100 * 1024)  # past KURA_MEMORY_BODY_MAX_BYTES: a file
    assert request(node, "PUT", target, large).status in (200, 201, 204)
    assert (len(node.store.bodies), node.store.bodies.used_bytes) == (0, 0)
    assert database_bodies(node.config.data_dir) == []
    assert request(node, "GET", target).body == large


def test_eviction_drops_database_bodies_least_recently_used_first(nodes: Any) -> None:
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(3 * 1000))
    for key in ("aa", "bb", "cc", "dd"):
        node.reactor.advance(1)
        assert request(node, "PUT", GRADLE.format(key=key), key.encode() * 500).status == 201
    assert database_bodies(node.config.data_dir) == [("bb", 1000), ("cc", 1000), ("dd", 1000)]
    assert request(node, "GET", GRADLE.format(key="aa")).status == 404
    assert node.store.metadata.used_bytes == 3000
    assert len(node.store.bodies) == 3
    assert sample(node, "kura_evicted_bytes_total") == 1000


@anonymous_deletes
def test_deletes_take_the_body_with_the_manifest(node: KuraNode) -> None:
    for key in ("a", "b"):
        request(node, "PUT", CCACHE.format(key=key * 40), b"body-" + key.encode())
    request(node, "POST", CAS.format(id="c1"), BODY)
    assert request(node, "DELETE", CCACHE.format(key="a" * 40)).status in (200, 204)
    assert request(node, "GET", CCACHE.format(key="a" * 40)).status == 404
    assert [key for key, _ in database_bodies(node.config.data_dir)] == ["b" * 40, "c1"]
    assert len(node.store.bodies) == 2
    assert request(node, "DELETE", "/api/cache/clean?tenant_id=default").status == 204
    # ccache's entries live in a namespace of their own
    assert [key for key, _ in database_bodies(node.config.data_dir)] == ["b" * 40]
    assert len(node.store.bodies) == 1
    assert node.store.metadata.used_bytes == len(b"body-b")


def test_a_fault_before_the_commit_stores_nothing(nodes: Any) -> None:
    """The body is written in the transaction (``before_fsync`` fires there),
    so nothing of it outlives a fault (``after_bytes_durable_before_metadata``
    has no step of its own: the bytes and the manifest become durable in
    the same commit)."""
    node = nodes.start(KURA_FAILPOINTS="before_fsync:error")
    assert request(node, "POST", CAS.format(id="c1"), BODY).status == 500
    assert request(node, "GET", CAS.format(id="c1")).status == 404
    assert rows(node, "SELECT COUNT(*) FROM key_values") == [(0,)]
    node = nodes.restart(node)
    assert request(node, "GET", CAS.format(id="c1")).status == 404
    assert node.store.metadata.used_bytes == 0


def test_bodies_and_their_accounting_survive_a_restart(nodes: Any) -> None:
    node = nodes.start()
    request(node, "POST", CAS.format(id="c1"), BODY)
    request(node, "PUT", GRADLE.format(key="k"), b"gradle")
    node = nodes.restart(node)
    assert len(node.store.bodies) == 0
    assert node.store.metadata.used_bytes == len(BODY) + 6
    assert request(node, "GET", CAS.format(id="c1")).body == BODY
    assert request(node, "GET", GRADLE.format(key="k")).body == b"gradle"


def test_critical_memory_pressure_empties_the_body_cache(
    node: KuraNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    request(node, "POST", CAS.format(id="c1"), BODY)
    assert len(node.store.bodies) == 1
    monkeypatch.setattr(node.memory, "_measure", lambda: node.memory.hard_bytes)
    node.memory.check()
    assert sample(node, "kura_memory_actions_total", action="body_cache_drop") == 1
    assert len(node.store.bodies) == 0
    assert request(node, "GET", CAS.format(id="c1")).body == BODY

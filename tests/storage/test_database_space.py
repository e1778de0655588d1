"""Space freed in the metadata database goes back to the filesystem.

Small bodies live in the database (``key_values``); deleting or evicting
them frees pages that later writes reuse, but the file keeps its size. A
store whose small bodies give way to large files would then use its
capacity in files *plus* the database's old peak. These tests hold the
database to giving free pages back, paced, and an older store to being
converted at open (or left as it was, and said so, when it is too big).
Real SQLite files throughout; sizes are read from the file itself.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from kura.service import KuraNode
from kura.storage import metadata, store
from kura.testing import request, sample, succeeded
from tests.support.stored import stored_bodies

GRADLE = "/api/cache/gradle/{key}?tenant_id=default"
SMALL = 4096  # received in memory: kept in the database
COUNT = 600
#: Room for the small bodies, and then for one file that evicts them all.
CAPACITY = COUNT * SMALL + 1024
BIG = CAPACITY - 1024  # over the memory-body limit: a file


def database(node: KuraNode, query: str) -> Any:
    """One value of ``query`` on the node's database, from a connection of our own."""
    conn = sqlite3.connect(node.store.layout.database)
    try:
        return conn.execute(query).fetchone()[0]
    finally:
        conn.close()


def file_bytes(node: KuraNode) -> int:
    """The database file's size once its WAL is checkpointed into it."""
    conn = sqlite3.connect(node.store.layout.database)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return os.path.getsize(node.store.layout.database)


def fill_then_evict(node: KuraNode) -> None:
    """COUNT small bodies into the database, then one file that evicts them all."""
    for n in range(COUNT):
        assert request(node, "PUT", GRADLE.format(key=f"s{n}"), os.urandom(SMALL)).status == 201
    assert stored_bodies(node.config.data_dir) == (0, COUNT)
    assert request(node, "PUT", GRADLE.format(key="big"), os.urandom(BIG)).status == 201
    assert stored_bodies(node.config.data_dir) == (1, 0)


def returned(node: KuraNode, **limits: int) -> int:
    return succeeded(Deferred.fromCoroutine(node.store.return_free_space(**limits)))


def test_a_new_store_gives_the_space_of_evicted_bodies_back(nodes: Any) -> None:
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(CAPACITY))
    assert database(node, "PRAGMA auto_vacuum") == metadata.INCREMENTAL_VACUUM
    fill_then_evict(node)
    peak = file_bytes(node)
    free = database(node, "PRAGMA freelist_count") * 4096
    assert free >= COUNT * SMALL  # evicted: free inside the file, the file as big as ever

    # Bounded per call, and what is kept stays free for the next bodies.
    first = returned(node, keep_bytes=512 * 1024, most_bytes=1024 * 1024)
    assert first == 1024 * 1024
    everything = first + returned(node, keep_bytes=512 * 1024, most_bytes=64 * 1024 * 1024)
    assert everything == free - 512 * 1024
    assert database(node, "PRAGMA freelist_count") * 4096 == 512 * 1024
    assert file_bytes(node) == peak - everything
    assert returned(node, keep_bytes=512 * 1024) == 0  # nothing beyond the reserve

    # Nothing was lost on the way; the store still takes small bodies.
    assert database(node, "PRAGMA integrity_check") == "ok"
    big = request(node, "GET", GRADLE.format(key="big"))
    assert (big.status, len(big.body)) == (200, BIG)
    assert request(node, "PUT", GRADLE.format(key="again"), b"x" * SMALL).status == 201
    assert request(node, "GET", GRADLE.format(key="again")).body == b"x" * SMALL


def test_the_node_gives_free_space_back_a_bounded_share_each_second(
    nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "FREE_SPACE_KEPT", 0)
    monkeypatch.setattr(store, "FREE_SPACE_PER_CALL", 256 * 1024)
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(CAPACITY))
    fill_then_evict(node)
    free = database(node, "PRAGMA freelist_count") * 4096
    node.reactor.advance(1.0)
    assert sample(node, "kura_database_space_returned_bytes_total") == 256 * 1024
    for _ in range(free // (256 * 1024) + 1):
        node.reactor.advance(1.0)
    assert sample(node, "kura_database_space_returned_bytes_total") == free
    assert database(node, "PRAGMA freelist_count") == 0


def as_made_before_incremental_vacuum(path: str) -> None:
    """Rewrite the database the way a store made before this mode has it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("VACUUM")
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    finally:
        conn.close()


def logged(events: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [e for e in events if text in e.get("log_format", "")]


@pytest.fixture
def events() -> Any:
    caught: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(caught.append)
    yield caught
    globalLogPublisher.removeObserver(caught.append)


def test_an_older_store_is_converted_at_open(nodes: Any, events: list[dict[str, Any]]) -> None:
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(CAPACITY))
    for n in range(20):
        assert request(node, "PUT", GRADLE.format(key=f"s{n}"), b"%d" % n * 1000).status == 201
    nodes.stop(node)
    as_made_before_incremental_vacuum(node.store.layout.database)

    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(CAPACITY))
    assert database(node, "PRAGMA auto_vacuum") == metadata.INCREMENTAL_VACUUM
    assert node.store.metadata.space.returns_free_pages
    assert len(logged(events, "converted in")) == 1
    for n in range(20):
        assert request(node, "GET", GRADLE.format(key=f"s{n}")).body == b"%d" % n * 1000
    # The twenty evicted by one file: their pages go back now.
    assert request(node, "PUT", GRADLE.format(key="big"), os.urandom(BIG)).status == 201
    assert stored_bodies(node.config.data_dir) == (1, 0)
    assert returned(node, keep_bytes=0) > 0


def test_an_older_store_too_big_to_convert_works_as_before_and_says_so(
    nodes: Any, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(CAPACITY))
    nodes.stop(node)
    as_made_before_incremental_vacuum(node.store.layout.database)
    monkeypatch.setattr(metadata, "CONVERT_AT_OPEN_MAX_BYTES", 0)

    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(CAPACITY))
    assert database(node, "PRAGMA auto_vacuum") == 0
    warnings = logged(events, "too big to convert")
    assert len(warnings) == 1 and warnings[0]["path"] == node.store.layout.database
    fill_then_evict(node)  # evicts as ever; the free pages are reused, not returned
    assert returned(node, keep_bytes=0) == 0
    node.reactor.advance(5.0)
    assert sample(node, "kura_database_space_returned_bytes_total") == 0
    assert request(node, "PUT", GRADLE.format(key="again"), b"x" * SMALL).status == 201


def test_a_failing_return_is_logged_once_until_it_works_again(
    nodes: Any, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = nodes.start()
    working = node.store.return_free_space

    async def full_disk(**limits: int) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(node.store, "return_free_space", full_disk)
    for _ in range(3):
        node.reactor.advance(1.0)
    assert len(logged(events, "free space failed")) == 1
    monkeypatch.setattr(node.store, "return_free_space", working)
    node.reactor.advance(1.0)
    node.reactor.advance(1.0)
    assert len(logged(events, "works again")) == 1
    assert len(logged(events, "free space failed")) == 1

"""Artifact tombstones: a delete drops the artifact and keeps it dropped until retention ends."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from kura.domain.artifacts import ArtifactAddress, Manifest, Producer
from kura.storage.layout import Layout
from kura.storage.metadata import ArtifactTombstone, MetadataStore, Outcome, WritePolicy
from kura.storage.runner import ImmediateRunner
from kura.storage.staging import TmpBudget
from kura.storage.store import ArtifactStore, StaticTargets
from kura.storage.tombstones import PAUSE_SECONDS, TombstoneSweeper, sweep_interval
from kura.testing import succeeded

LWW = WritePolicy.LAST_WRITER_WINS
PEERS = ("http://peer-a:7443", "http://peer-b:7443")
ADDRESS = ArtifactAddress(Producer.CCACHE, "ccache", "a" * 40)
DAY_MS = 86_400_000


def run(coroutine: Any) -> Any:
    return succeeded(Deferred.fromCoroutine(coroutine))


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest.fixture
def store(tmp_path: Any, clock: Clock) -> Iterator[ArtifactStore]:
    built = ArtifactStore(
        layout=Layout(str(tmp_path / "data"), str(tmp_path / "data" / "tmp")),
        runner=ImmediateRunner(),
        clock=clock,
        node_tenant="default",
        capacity_bytes=1 << 20,
        tmp_budget=TmpBudget(1 << 20),
        manifest_cache_bytes=1 << 20,
        max_unfinished_uploads=10,
        replication_targets=StaticTargets(PEERS),
    )
    run(built.start())
    yield built
    run(built.stop())


def artifact_id(store: ArtifactStore, address: ArtifactAddress = ADDRESS) -> str:
    return store.artifact_id(address)


def put(store: ArtifactStore, body: bytes, version_ms: int | None = None, **options: Any) -> Any:
    """A key-value style write (inline), last-writer-wins."""
    return run(
        store.put_inline(
            ADDRESS,
            body,
            content_type="application/octet-stream",
            policy=LWW,
            version_ms=version_ms,
            **options,
        )
    )


def publish_blob(store: ArtifactStore, address: ArtifactAddress, body: bytes) -> Manifest:
    staging = store.stage(limit=len(body), expected_length=len(body))
    staging.write(body)
    staged = run(staging.finish())
    result = run(
        store.publish_blob(address, staged, content_type="application/octet-stream", policy=LWW)
    )
    return result.manifest  # type: ignore[no-any-return]


def body_stored(store: ArtifactStore, manifest: Manifest) -> bool:
    """Whether ``manifest``'s body is still kept: its file, or its row in the database."""
    if manifest.in_database:
        return store.metadata.get_inline(manifest.artifact_id) is not None
    assert manifest.blob_path is not None
    return os.path.exists(store.layout.absolute(manifest.blob_path))


def tombstones(store: ArtifactStore) -> list[ArtifactTombstone]:
    return run(store.artifact_tombstones_page(None, 100))


def operations(store: ArtifactStore) -> list[tuple[str, str]]:
    return [(m.target, m.operation["type"]) for m in run(store.outbox_batch(0, 100))]


def test_a_delete_drops_the_artifact_and_leaves_a_tombstone_with_outbox_rows(
    store: ArtifactStore, clock: Clock
) -> None:
    """Manifest gone, tombstone at the delete's version, one delete row per target: one commit."""
    written = put(store, b"entry").manifest
    commits: list[int] = []
    store.add_commit_listener(lambda: commits.append(1))
    outcome = run(store.delete_artifact(artifact_id(store), "ccache"))
    assert outcome is Outcome.APPLIED
    assert len(commits) == 1
    assert run(store.manifest(artifact_id(store))) is None
    (tombstone,) = tombstones(store)
    assert tombstone.artifact_id == artifact_id(store)
    assert tombstone.namespace_id == "ccache"
    assert tombstone.version_ms > written.version_ms
    assert tombstone.deleted_at_ms == int(clock.seconds() * 1000)
    rows = run(store.outbox_batch(0, 100))
    deletes = [m for m in rows if m.operation["type"] == "delete_artifact"]
    assert [m.target for m in deletes] == list(PEERS)
    assert deletes[0].operation == {
        "type": "delete_artifact",
        "artifact_id": artifact_id(store),
        "namespace_id": "ccache",
        "version_ms": tombstone.version_ms,
    }
    assert store.outbox_depth == 4  # the write's two rows and the delete's two


@pytest.mark.parametrize("in_files", [False, True], ids=["database", "files"])
def test_a_deleted_blob_gives_its_bytes_and_its_file_back(
    store: ArtifactStore, in_files: bool
) -> None:
    """The body goes with the manifest, from its file or from the database."""
    if in_files:
        # Small bodies in files, as a store written before metadata schema 4 keeps them.
        store.memory_body_bytes = 0
    published = publish_blob(store, ADDRESS, b"b" * 1000)
    assert published.in_database is not in_files
    assert body_stored(store, published)
    assert store.metadata.used_bytes == 1000
    assert run(store.delete_artifact(artifact_id(store), "ccache")) is Outcome.APPLIED
    assert not body_stored(store, published)
    assert store.bodies.get(published) is None
    assert store.metadata.used_bytes == 0


def test_deleting_an_absent_artifact_still_tombstones_it(store: ArtifactStore) -> None:
    """A copy still on its way from a peer must not land after the delete."""
    assert run(store.delete_artifact(artifact_id(store), "ccache")) is Outcome.APPLIED
    assert len(tombstones(store)) == 1
    assert operations(store) == [(PEERS[0], "delete_artifact"), (PEERS[1], "delete_artifact")]


def test_older_and_equal_replicated_writes_lose_to_the_tombstone(store: ArtifactStore) -> None:
    put(store, b"v1", version_ms=1000, targets=())
    run(store.delete_artifact(artifact_id(store), "ccache", 2000, targets=()))
    for version in (1500, 2000):
        result = put(store, b"late copy", version_ms=version, targets=())
        assert result.outcome is Outcome.IGNORED_TOMBSTONE
        preview = run(store.apply_preview(artifact_id(store), "ccache", version))
        assert preview is Outcome.IGNORED_TOMBSTONE
    assert run(store.manifest(artifact_id(store))) is None
    assert store.metadata.get_inline(artifact_id(store)) is None
    assert operations(store) == []


def test_a_newer_write_wins_over_the_tombstone_and_clears_it(store: ArtifactStore) -> None:
    run(store.delete_artifact(artifact_id(store), "ccache", 2000, targets=()))
    assert run(store.apply_preview(artifact_id(store), "ccache", 2001)) is None
    result = put(store, b"again", version_ms=2001)
    assert result.outcome is Outcome.APPLIED
    assert tombstones(store) == []
    assert store.metadata.get_inline(artifact_id(store)) == b"again"
    assert operations(store) == [(PEERS[0], "upsert_artifact"), (PEERS[1], "upsert_artifact")]


def test_a_client_write_after_a_delete_is_served(store: ArtifactStore) -> None:
    """A client's re-PUT gets a fresh version, above the tombstone's."""
    put(store, b"v1")
    run(store.delete_artifact(artifact_id(store), "ccache"))
    assert put(store, b"v2").outcome is Outcome.APPLIED
    assert store.metadata.get_inline(artifact_id(store)) == b"v2"
    assert tombstones(store) == []


def test_a_client_write_wins_over_a_tombstone_versioned_ahead_of_our_clock(
    store: ArtifactStore, clock: Clock
) -> None:
    """A peer whose clock runs ahead deleted it: a client writing here afterwards still wins."""
    ahead = int(clock.seconds() * 1000) + 60_000
    run(store.delete_artifact(artifact_id(store), "ccache", ahead, targets=()))
    result = put(store, b"rewritten")
    assert result.outcome is Outcome.APPLIED
    assert result.manifest.version_ms == ahead + 1
    assert store.metadata.get_inline(artifact_id(store)) == b"rewritten"
    assert store.metadata.get_manifest(artifact_id(store)).version_ms == ahead + 1
    assert tombstones(store) == []
    # Later client writes keep rising above it (last-writer-wins on this key).
    assert put(store, b"again").manifest.version_ms == ahead + 2
    assert store.metadata.get_inline(artifact_id(store)) == b"again"


def test_a_delete_older_than_the_stored_version_leaves_it(store: ArtifactStore) -> None:
    put(store, b"newer", version_ms=5000, targets=())
    outcome = run(store.delete_artifact(artifact_id(store), "ccache", 4000, targets=()))
    assert outcome is Outcome.IGNORED_STALE
    assert store.metadata.get_inline(artifact_id(store)) == b"newer"
    assert tombstones(store) == []


def test_a_delete_at_the_stored_version_wins(store: ArtifactStore) -> None:
    """Ties go to the delete on every node alike (writes lose at an equal tombstone too)."""
    put(store, b"same", version_ms=5000, targets=())
    assert run(store.delete_artifact(artifact_id(store), "ccache", 5000, targets=())) is (
        Outcome.APPLIED
    )
    assert run(store.manifest(artifact_id(store))) is None


def test_replaying_a_delete_is_ignored_and_a_newer_one_moves_the_tombstone(
    store: ArtifactStore,
) -> None:
    run(store.delete_artifact(artifact_id(store), "ccache", 3000, targets=()))
    for version in (3000, 2000):
        outcome = run(store.delete_artifact(artifact_id(store), "ccache", version, targets=PEERS))
        assert outcome is Outcome.IGNORED_OLDER
    assert operations(store) == []
    assert run(store.delete_artifact(artifact_id(store), "ccache", 4000, targets=())) is (
        Outcome.APPLIED
    )
    assert [t.version_ms for t in tombstones(store)] == [4000]


def test_a_client_delete_beats_a_replica_from_a_clock_that_runs_ahead(
    store: ArtifactStore, clock: Clock
) -> None:
    """The stored version lies ahead of our clock: the delete still removes it."""
    ahead = int(clock.seconds() * 1000) + 60_000
    put(store, b"from a fast peer", version_ms=ahead, targets=())
    assert run(store.delete_artifact(artifact_id(store), "ccache")) is Outcome.APPLIED
    (tombstone,) = tombstones(store)
    assert tombstone.version_ms == ahead + 1
    # Aged from our clock, not the future: retention is not stretched.
    assert tombstone.deleted_at_ms == int(clock.seconds() * 1000)
    assert put(store, b"later write").outcome is Outcome.APPLIED  # versions keep rising


def test_eviction_writes_no_tombstone(tmp_path: Any, clock: Clock) -> None:
    """Evicted entries were not deleted by a client: a peer may bring them back."""
    store = ArtifactStore(
        layout=Layout(str(tmp_path / "data"), str(tmp_path / "data" / "tmp")),
        runner=ImmediateRunner(),
        clock=clock,
        node_tenant="default",
        capacity_bytes=1500,
        tmp_budget=TmpBudget(1 << 20),
        manifest_cache_bytes=1 << 20,
        max_unfinished_uploads=10,
    )
    run(store.start())
    try:
        for key in ("a" * 40, "b" * 40):
            publish_blob(store, ArtifactAddress(Producer.CCACHE, "ccache", key), b"x" * 1000)
        assert run(store.manifest(artifact_id(store))) is None  # "a..." was evicted
        assert tombstones(store) == []
    finally:
        run(store.stop())


# -- the metadata operations themselves ------------------------------------------------------


@pytest.fixture
def metadata(tmp_path: Any) -> Iterator[MetadataStore]:
    built = MetadataStore(str(tmp_path / "kura.sqlite3"), str(tmp_path))
    built.open()
    yield built
    built.close()


def tombstone(n: int, deleted_at_ms: int) -> ArtifactTombstone:
    return ArtifactTombstone(f"{n:064x}", "ccache", deleted_at_ms, deleted_at_ms)


def test_purge_forgets_only_tombstones_past_the_cutoff_in_bounded_batches(
    metadata: MetadataStore,
) -> None:
    metadata.commit(
        [
            lambda conn, n=n: metadata.delete_artifact(conn, tombstone(n, 1000 + n), (), 0)
            for n in range(10)
        ]
    )
    # Before 1005: five tombstones qualify; a batch of three takes the oldest three.
    (purged,) = metadata.commit([lambda conn: metadata.purge_artifact_tombstones(conn, 1005, 3)])
    assert purged == 3
    left = {t.deleted_at_ms for t in metadata.artifact_tombstones_page(None, 100)}
    assert left == {1003, 1004, 1005, 1006, 1007, 1008, 1009}
    (purged,) = metadata.commit([lambda conn: metadata.purge_artifact_tombstones(conn, 1005, 3)])
    assert purged == 2
    assert metadata.artifact_tombstone_count() == 5


def test_tombstone_pages_follow_the_cursor(metadata: MetadataStore) -> None:
    metadata.commit(
        [
            lambda conn, n=n: metadata.delete_artifact(conn, tombstone(n, 10), (), 0)
            for n in range(5)
        ]
    )
    first = metadata.artifact_tombstones_page(None, 2)
    rest = metadata.artifact_tombstones_page(first[-1].artifact_id, 10)
    assert [t.artifact_id for t in first + rest] == [f"{n:064x}" for n in range(5)]


def test_the_tombstone_and_the_manifest_drop_share_one_transaction(
    metadata: MetadataStore,
) -> None:
    """A failing delete (here: its outbox insert) leaves the artifact and no tombstone."""
    manifest = Manifest(
        artifact_id="f" * 64,
        producer="ccache",
        namespace_id="ccache",
        key="k",
        content_type="application/octet-stream",
        inline=True,
        blob_path=None,
        size=1,
        version_ms=5,
        created_at_ms=5,
    )
    metadata.commit([lambda conn: metadata.apply_artifact(conn, manifest, b"x", LWW, (), 5)])

    class Unwritable:
        def __iter__(self) -> Iterator[str]:
            raise sqlite3.OperationalError("disk I/O error")

    (result,) = metadata.commit(
        [
            lambda conn: metadata.delete_artifact(
                conn, ArtifactTombstone("f" * 64, "ccache", 9, 9), Unwritable(), 9
            )
        ]
    )
    assert isinstance(result, sqlite3.OperationalError)
    assert metadata.get_manifest("f" * 64) is not None
    assert metadata.artifact_tombstone_version("f" * 64) is None


# -- the retention sweep -----------------------------------------------------------------------


def test_the_sweep_purges_tombstones_older_than_the_retention(
    store: ArtifactStore, clock: Clock
) -> None:
    purged: list[int] = []
    counts: list[int] = []
    sweeper = TombstoneSweeper(
        store=store,
        clock=clock,
        retention_ms=7 * DAY_MS,
        on_purged=purged.append,
        on_count=counts.append,
    )
    run(store.delete_artifact(artifact_id(store), "ccache"))
    clock.advance(6 * 86_400)
    other = ArtifactAddress(Producer.CCACHE, "ccache", "b" * 40)
    run(store.delete_artifact(store.artifact_id(other), "ccache"))
    sweeper.start()
    assert purged == [] and counts == [2]  # nothing is a week old yet
    clock.advance(86_400)  # the first is a week old now, and kept until a sweep passes
    clock.advance(sweep_interval(7 * DAY_MS))
    assert purged == [1]
    assert [t.artifact_id for t in tombstones(store)] == [store.artifact_id(other)]
    assert counts[-1] == 1
    sweeper.stop()


def test_a_large_backlog_is_purged_in_paced_batches(store: ArtifactStore, clock: Clock) -> None:
    for n in range(7):
        run(store.delete_artifact(f"{n:064x}", "ccache"))
    clock.advance(2 * 86_400)
    purged: list[int] = []
    sweeper = TombstoneSweeper(
        store=store, clock=clock, retention_ms=DAY_MS, on_purged=purged.append, batch=3
    )
    sweep = Deferred.fromCoroutine(sweeper.sweep())
    assert purged == [3] and not sweep.called  # waits before the next batch
    clock.advance(PAUSE_SECONDS)
    assert purged == [3, 3]
    clock.advance(PAUSE_SECONDS)
    assert purged == [3, 3, 1]
    assert succeeded(sweep) == 7
    assert tombstones(store) == []


def test_the_interval_is_a_tenth_of_the_retention_within_bounds() -> None:
    assert sweep_interval(7 * DAY_MS) == 600.0
    assert sweep_interval(60_000) == 6.0
    assert sweep_interval(1) == 1.0

"""Recency pages of the metadata store: keyset order, ties, the floor, totals, the index."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

from kura.domain.artifacts import Manifest
from kura.storage.metadata import MetadataStore, WritePolicy


def manifest(n: int, version: int) -> Manifest:
    artifact_id = f"{n:02x}" * 32
    return Manifest(
        artifact_id=artifact_id,
        producer="gradle",
        namespace_id="",
        key=f"k{n}",
        content_type="application/octet-stream",
        inline=False,
        blob_path=f"blobs/{artifact_id[:2]}/{artifact_id}-0",
        size=10 + n,
        version_ms=version,
        created_at_ms=version,
    )


def apply(store: MetadataStore, m: Manifest, conn: sqlite3.Connection) -> object:
    return store.apply_artifact(conn, m, None, WritePolicy.LAST_WRITER_WINS, (), 0)


def store_with(tmp_path: Path, versions: dict[int, int]) -> MetadataStore:
    store = MetadataStore(str(tmp_path / "kura.sqlite3"), str(tmp_path))
    store.open()
    manifests = [manifest(n, v) for n, v in versions.items()]
    store.commit([functools.partial(apply, store, m) for m in manifests])
    return store


def test_pages_walk_every_manifest_once_newest_first_with_ties_broken_by_id(
    tmp_path: Path,
) -> None:
    versions = {1: 100, 2: 300, 3: 300, 4: 200, 5: 300, 6: 50}
    store = store_with(tmp_path, versions)
    seen: list[str] = []
    before = None
    while True:
        page = store.recent_manifests_page(before, None, 2)
        seen += [m.key for m in page]
        if len(page) < 2:
            break
        before = (page[-1].version_ms, page[-1].artifact_id)
    assert seen == ["k5", "k3", "k2", "k4", "k1", "k6"]
    assert [m.key for m in store.recent_manifests_page(None, 100, 10)] == ["k5", "k3", "k2", "k4"]
    assert store.manifest_totals(None) == (6, sum(10 + n for n in versions))
    assert store.manifest_totals(150) == (4, 12 + 13 + 14 + 15)
    store.close()


def test_recency_pages_are_served_from_the_version_index(tmp_path: Path) -> None:
    store = store_with(tmp_path, {1: 1})
    store.close()
    db = sqlite3.connect(tmp_path / "kura.sqlite3")
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT artifact_id FROM manifests WHERE version_ms > ? "
        "AND (version_ms, artifact_id) < (?, ?) ORDER BY version_ms DESC, artifact_id DESC "
        "LIMIT 10",
        (0, 5, "x"),
    ).fetchall()
    db.close()
    text = " ".join(str(row[-1]) for row in plan)
    assert "manifests_by_version" in text and "TEMP B-TREE" not in text, text

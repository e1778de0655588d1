"""The metadata schema version: checked at open, older stores migrated, newer ones refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kura.domain.errors import StorageFault
from kura.storage import metadata
from kura.storage.metadata import SCHEMA_VERSION, MetadataStore, SchemaVersionError
from tests.support.real import RealNode

#: The schema of release 1 (user_version 1), frozen as that release wrote it.
RELEASE_1_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    artifact_id    TEXT PRIMARY KEY,
    producer       TEXT NOT NULL,
    namespace_id   TEXT NOT NULL,
    key            TEXT NOT NULL,
    content_type   TEXT NOT NULL,
    inline         INTEGER NOT NULL,
    blob_path      TEXT,
    size           INTEGER NOT NULL,
    version_ms     INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    last_access_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS manifests_by_namespace ON manifests (namespace_id, artifact_id);
CREATE INDEX IF NOT EXISTS manifests_by_access ON manifests (last_access_ms) WHERE inline = 0;
CREATE TABLE IF NOT EXISTS key_values (
    artifact_id TEXT PRIMARY KEY,
    value       BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS namespace_tombstones (
    namespace_id TEXT PRIMARY KEY,
    version_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS multipart_uploads (
    upload_id     TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    namespace_id  TEXT NOT NULL,
    category      TEXT NOT NULL,
    hash          TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    total_bytes   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS multipart_parts (
    upload_id   TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    target        TEXT NOT NULL,
    operation     TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"""


def store_of_release_1(path: Path) -> None:
    """A metadata store as the first release's ``open`` left it, with one blob artifact."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(RELEASE_1_SCHEMA)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO manifests VALUES ('a1', 'gradle', 'ns', 'k', 'application/octet-stream', "
        "0, 'blobs/a1/a1-000000000000', 42, 7, 7, 7)"
    )
    conn.close()


def pragma(path: Path, name: str) -> int:
    """The integer value of ``PRAGMA name`` in the database at ``path``."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])
    finally:
        conn.close()


def user_version(path: Path) -> int:
    return pragma(path, "user_version")


def test_a_new_store_gets_the_current_version(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "kura.sqlite3"), str(tmp_path))
    store.open()
    store.close()
    assert user_version(tmp_path / "kura.sqlite3") == SCHEMA_VERSION


def test_a_store_of_the_current_release_opens_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "kura.sqlite3"
    store_of_release_1(path)
    store = MetadataStore(str(path), str(tmp_path))
    store.open()
    try:
        manifest = store.get_manifest("a1")
        assert manifest is not None and manifest.size == 42
        assert store.used_bytes == 42
    finally:
        store.close()
    assert user_version(path) == SCHEMA_VERSION


def test_a_release_1_store_gains_schema_2_in_place(tmp_path: Path) -> None:
    """The real 1 -> 2 step: digests (unknown for old rows), tombstones, watermarks, recency."""
    path = tmp_path / "kura.sqlite3"
    store_of_release_1(path)
    for _ in range(2):  # the second open finds version 2 and migrates nothing
        store = MetadataStore(str(path), str(tmp_path))
        store.open()
        store.close()
    assert user_version(path) == SCHEMA_VERSION == 4
    conn = sqlite3.connect(path)
    try:
        assert conn.execute(
            "SELECT size, digest FROM manifests WHERE artifact_id = 'a1'"
        ).fetchone() == (42, None)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert {"artifact_tombstones", "peer_watermarks", "manifests_by_version"} <= tables
    finally:
        conn.close()


def test_a_schema_2_store_gains_the_upload_queue_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real 2 -> 3 step: the store of the release before the object-store
    tier keeps its data and gains an empty upload queue."""
    path = tmp_path / "kura.sqlite3"
    store_of_release_1(path)
    with monkeypatch.context() as release_2:
        release_2.setattr(metadata, "SCHEMA_VERSION", 2)
        release_2.setattr(metadata, "MIGRATIONS", {1: metadata._schema_1_to_2})
        store = MetadataStore(str(path), str(tmp_path))
        store.open()
        store.close()
    assert user_version(path) == 2
    store = MetadataStore(str(path), str(tmp_path))
    store.open()
    try:
        assert user_version(path) == SCHEMA_VERSION
        assert store.object_upload_count() == 0
        manifest = store.get_manifest("a1")
        assert manifest is not None and manifest.size == 42
    finally:
        store.close()


def test_a_migrated_store_matches_a_new_one(tmp_path: Path) -> None:
    """Migrating release 1 yields the same tables and columns a new store gets."""

    def shape(path: Path) -> dict[str, list[str]]:
        conn = sqlite3.connect(path)
        try:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type IN ('table', 'index') "
                    "AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
            return {
                name: [row[1] for row in conn.execute(f"PRAGMA table_info({name})")]
                for name in names
            }
        finally:
            conn.close()

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    store_of_release_1(tmp_path / "old" / "kura.sqlite3")
    for name in ("old", "new"):
        store = MetadataStore(str(tmp_path / name / "kura.sqlite3"), str(tmp_path / name))
        store.open()
        store.close()
    assert shape(tmp_path / "old" / "kura.sqlite3") == shape(tmp_path / "new" / "kura.sqlite3")


def test_an_older_store_is_migrated_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step runs once, in order, from the version found."""

    def add_checksums(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE manifests ADD COLUMN checksum TEXT")

    monkeypatch.setattr(metadata, "SCHEMA_VERSION", 5)
    monkeypatch.setattr(metadata, "MIGRATIONS", {**metadata.MIGRATIONS, 4: add_checksums})
    path = tmp_path / "kura.sqlite3"
    store_of_release_1(path)
    for _ in range(2):  # the second open finds version 5 and migrates nothing
        store = MetadataStore(str(path), str(tmp_path))
        store.open()
        store.close()
    assert user_version(path) == 5
    conn = sqlite3.connect(path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(manifests)")]
    assert "checksum" in columns
    assert conn.execute("SELECT size FROM manifests WHERE artifact_id = 'a1'").fetchone() == (42,)
    conn.close()


def test_a_failed_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE manifests ADD COLUMN checksum TEXT")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(metadata, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(metadata, "MIGRATIONS", {1: half_done})
    path = tmp_path / "kura.sqlite3"
    store_of_release_1(path)
    with pytest.raises(sqlite3.OperationalError):
        MetadataStore(str(path), str(tmp_path)).open()
    assert user_version(path) == 1
    conn = sqlite3.connect(path)
    assert "checksum" not in [row[1] for row in conn.execute("PRAGMA table_info(manifests)")]
    conn.close()


def test_a_newer_store_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "kura.sqlite3"
    store_of_release_1(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaVersionError) as raised:
        MetadataStore(str(path), str(tmp_path)).open()
    assert isinstance(raised.value, StorageFault)
    message = str(raised.value)
    assert f"version {SCHEMA_VERSION + 1}" in message and f"({SCHEMA_VERSION})" in message
    assert user_version(path) == SCHEMA_VERSION + 1  # left as it was


def test_a_node_on_a_newer_store_does_not_start_and_says_why(tmp_path: Path) -> None:
    """A real node exits non-zero, its log naming the version found and the one supported."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store_of_release_1(data_dir / "kura.sqlite3")
    conn = sqlite3.connect(data_dir / "kura.sqlite3")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    node = RealNode(str(data_dir))
    try:
        with pytest.raises(RuntimeError):
            node.start(timeout=15)
        assert node.process.returncode != 0
        assert f"metadata schema version {SCHEMA_VERSION + 1} is newer" in node.log()
    finally:
        node.stop()

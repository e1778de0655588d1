"""The SQLite metadata store (WAL mode, ``synchronous=FULL``).

Tables:

``manifests``
    one row per artifact; indexed by namespace (the namespace index) and by
    last access (the LRU order for eviction).
``key_values``
    the bodies kept in the database rather than in files: those of
    key-value entries, and (since schema 4) those of blobs small enough to be
    received in memory, written in the transaction that records their
    manifest. A manifest without a ``blob_path`` has its body here.
``namespace_tombstones``
    the version at which each namespace was cleaned; older writes lose.
``artifact_tombstones``
    the version at which one artifact was deleted by a client (ccache
    ``DELETE``); older or equal writes of it lose, a newer one clears it.
    Kept for ``KURA_TOMBSTONE_RETENTION_MS`` from the delete, then purged
    (:meth:`MetadataStore.purge_artifact_tombstones`).
``multipart_uploads`` / ``multipart_parts``
    module uploads in progress and their acknowledged parts.
``outbox``
    replication messages, written in the same transaction as the data they
    describe.
``peer_watermarks``
    each peer's durable catch-up state (:mod:`kura.replication.watermark`).
``object_uploads``
    the object-store tier's durable upload queue (:mod:`kura.objectstore`):
    one row per client write or delete still to be put in the store,
    written in the transaction that publishes it; an artifact with a row
    here is never evicted.

Space: deletes and evictions free pages inside the database file, which
later writes reuse; the file keeps its size. So that a store whose small
bodies give way to large files does not hold their space for ever, the
database is in ``auto_vacuum = INCREMENTAL`` mode and
:meth:`MetadataStore.return_free_pages` gives free pages back to the
filesystem a bounded number at a time (the store's caller paces it). A
store made before that mode is converted at open when its database is small
enough to rewrite quickly (:data:`CONVERT_AT_OPEN_MAX_BYTES`); a bigger
one keeps working as before (free pages reused, never returned).

Everything here is synchronous and runs on a storage thread. Reads use one
connection per thread; writes are *operations* (callables taking the writer
connection) that :meth:`MetadataStore.commit` runs together in one transaction,
each inside its own savepoint so one failing operation never takes the
others down (group commit: one WAL fsync for the whole batch).
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs

from kura.domain.artifacts import Manifest
from kura.domain.errors import StorageFault

T = TypeVar("T")

#: The schema this release writes (``PRAGMA user_version``). A store written
#: by an older release is migrated in place at open (:data:`MIGRATIONS`); a
#: newer one is refused.
SCHEMA_VERSION = 4


#: ``PRAGMA auto_vacuum`` value of a database whose free pages can be returned.
INCREMENTAL_VACUUM = 2
#: Largest database converted to :data:`INCREMENTAL_VACUUM` at open: the
#: conversion is a ``VACUUM``, a rewrite of the whole file (and room for a
#: copy of it): 1.7 s for 265 MiB of 4 KiB bodies here, at start-up.
CONVERT_AT_OPEN_MAX_BYTES = 256 * 1024 * 1024


@attrs.frozen
class SpaceMode:
    """Whether a database returns its free pages, found (and perhaps changed) at open.

    Attributes:
        returns_free_pages: the database is in incremental-vacuum mode.
        converted_seconds: seconds the conversion at open took (``None``:
            nothing was converted).
        database_bytes: the database's size at open.
        conversion_error: why the conversion at open failed (the store
            then works as before it: free pages reused, never returned).
    """

    returns_free_pages: bool
    converted_seconds: float | None
    database_bytes: int
    conversion_error: str | None = None


class SchemaVersionError(StorageFault):
    """The metadata store was written by a newer release: the node must not start."""


#: What schema 2 added next to release 1's tables: a body digest per
#: manifest (``manifests.digest``, hex SHA-256, NULL until known), the
#: tombstones of deleted artifacts, each peer's catch-up watermark, and the
#: recency index catch-up pages are served from (newest version first).
_SCHEMA_2_TABLES = """
CREATE INDEX IF NOT EXISTS manifests_by_version ON manifests (version_ms, artifact_id);
CREATE TABLE IF NOT EXISTS artifact_tombstones (
    artifact_id   TEXT PRIMARY KEY,
    namespace_id  TEXT NOT NULL,
    version_ms    INTEGER NOT NULL,
    deleted_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS artifact_tombstones_by_age ON artifact_tombstones (deleted_at_ms);
CREATE TABLE IF NOT EXISTS peer_watermarks (
    peer          TEXT PRIMARY KEY,
    state         TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
"""


#: What schema 3 added: the object-store tier's upload queue. ``kind`` is
#: ``artifact``, ``delete_artifact`` or ``delete_namespace``; ``artifact_id``
#: is empty for a namespace clean. Rows are taken in ``seq`` order once
#: ``due_ms`` has passed; a failed attempt moves ``due_ms`` on (backoff).
_SCHEMA_3_TABLES = """
CREATE TABLE IF NOT EXISTS object_uploads (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL,
    artifact_id   TEXT NOT NULL,
    namespace_id  TEXT NOT NULL,
    version_ms    INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    due_ms        INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS object_uploads_by_artifact ON object_uploads (artifact_id);
"""


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script``'s statements one by one (``executescript`` would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _schema_1_to_2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE manifests ADD COLUMN digest TEXT")
    _run_script(conn, _SCHEMA_2_TABLES)


def _schema_2_to_3(conn: sqlite3.Connection) -> None:
    _run_script(conn, _SCHEMA_3_TABLES)


def _schema_3_to_4(conn: sqlite3.Connection) -> None:
    """No table changes: from version 4 on, a blob manifest (``inline = 0``)
    may have no ``blob_path``, its body in ``key_values``. The version bump
    is what keeps a release that would look for its file from opening the
    store; every artifact a version-3 store holds stays as it is."""


_SCHEMA = (
    """
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
    last_access_ms INTEGER NOT NULL,
    digest         TEXT
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
    + _SCHEMA_2_TABLES
    + _SCHEMA_3_TABLES
)

#: ``{version: step}``: each step takes a store from ``version`` to
#: ``version + 1`` inside the open's transaction. Version 0 is a database
#: without kura's tables (a new store), which the schema script creates.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _schema_1_to_2,
    2: _schema_2_to_3,
    3: _schema_3_to_4,
}

_MANIFEST_COLUMNS = (
    "artifact_id, producer, namespace_id, key, content_type, inline, blob_path, size, "
    "version_ms, created_at_ms, digest"
)


class Outcome(enum.StrEnum):
    """What applying a write did (also the apply-result metric label)."""

    APPLIED = "applied"
    EXISTING = "existing"
    IGNORED_STALE = "ignored_stale"
    IGNORED_EQUAL = "ignored_equal"
    IGNORED_TOMBSTONE = "ignored_tombstone"
    IGNORED_OLDER = "ignored_older"


class WritePolicy(enum.Enum):
    """How a write treats an artifact that is already stored."""

    #: Client blob uploads: an existing artifact wins; the write stores nothing.
    WRITE_ONCE = "write_once"
    #: Key-value PUTs and replicated writes: the higher ``version_ms`` wins.
    LAST_WRITER_WINS = "last_writer_wins"


@attrs.frozen
class ApplyResult:
    """The result of :func:`apply_artifact`.

    Attributes:
        outcome: what happened.
        unlink: blob paths (relative) that are garbage after the commit: the
            replaced version when applied, the new file when not.
    """

    outcome: Outcome
    unlink: tuple[str, ...] = ()


@attrs.frozen
class Upload:
    """A module multipart upload in progress."""

    upload_id: str
    tenant_id: str
    namespace_id: str
    category: str
    hash: str
    name: str
    created_at_ms: int
    total_bytes: int
    parts: dict[int, int]


@attrs.frozen
class ArtifactTombstone:
    """One deleted artifact (a row of ``artifact_tombstones``).

    Attributes:
        artifact_id: the artifact.
        namespace_id: its namespace.
        version_ms: the delete's version: writes at or below it lose.
        deleted_at_ms: when the delete happened, on the clock of the node a
            client asked (``min(version_ms, now)`` where it is applied, so
            every node of the mesh ages a tombstone alike); retention counts
            from it.
    """

    artifact_id: str
    namespace_id: str
    version_ms: int
    deleted_at_ms: int


@attrs.frozen
class ObjectUpload:
    """One row of the object-store upload queue (``object_uploads``).

    Attributes:
        seq: its place in the queue.
        kind: :data:`UPLOAD_ARTIFACT`, :data:`UPLOAD_DELETE_ARTIFACT` or
            :data:`UPLOAD_DELETE_NAMESPACE`.
        artifact_id: the artifact ("" for a namespace clean).
        namespace_id: its namespace.
        version_ms: the version written or deleted.
        attempts: failed attempts so far (the backoff grows with them).
    """

    seq: int
    kind: str
    artifact_id: str
    namespace_id: str
    version_ms: int
    attempts: int


UPLOAD_ARTIFACT = "artifact"
UPLOAD_DELETE_ARTIFACT = "delete_artifact"
UPLOAD_DELETE_NAMESPACE = "delete_namespace"


@attrs.frozen
class OutboxMessage:
    """One queued replication message for one target peer."""

    seq: int
    target: str
    operation: dict[str, Any]


def _manifest(row: Sequence[Any]) -> Manifest:
    return Manifest(
        artifact_id=row[0],
        producer=row[1],
        namespace_id=row[2],
        key=row[3],
        content_type=row[4],
        inline=bool(row[5]),
        blob_path=row[6],
        size=row[7],
        version_ms=row[8],
        created_at_ms=row[9],
        digest=row[10],
    )


class MetadataStore:
    """Synchronous access to the metadata database (call from storage threads).

    Attributes:
        used_bytes: bytes of the artifacts eviction may drop (blobs, in files
            or in the database); changed only by committed operations, read
            by the reactor for capacity decisions and gauges.
    """

    def __init__(self, path: str, data_dir: str) -> None:
        self._path = path
        self._data_dir = data_dir
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self.used_bytes = 0
        self.space = SpaceMode(returns_free_pages=False, converted_seconds=None, database_bytes=0)
        self.page_size = 4096

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def open(self) -> None:
        """Open (creating if needed) the database and set its durability mode.

        A store written by an older release is migrated in place first.

        Raises:
            SchemaVersionError: the store's schema version is newer than
                :data:`SCHEMA_VERSION` (written by a newer release).
        """
        writer = self._connect()
        # Takes effect only in a database with no table yet (a new store),
        # so before anything else; an older store is converted below.
        writer.execute(f"PRAGMA auto_vacuum = {INCREMENTAL_VACUUM}")
        writer.execute("PRAGMA journal_mode = WAL")
        # FULL: every commit fsyncs the WAL, so an acknowledged write survives
        # power loss, not only a process kill.
        writer.execute("PRAGMA synchronous = FULL")
        try:
            _bring_to_current_schema(writer)
            self.page_size = int(writer.execute("PRAGMA page_size").fetchone()[0])
            self.space = _space_mode(writer, self.page_size)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self.used_bytes = (
            self._reader()
            .execute("SELECT COALESCE(SUM(size), 0) FROM manifests WHERE inline = 0")
            .fetchone()[0]
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    # -- reads ---------------------------------------------------------------------

    def get_manifest(self, artifact_id: str) -> Manifest | None:
        row = (
            self._reader()
            .execute(
                f"SELECT {_MANIFEST_COLUMNS} FROM manifests WHERE artifact_id = ?", (artifact_id,)
            )
            .fetchone()
        )
        return None if row is None else _manifest(row)

    def free_bytes(self) -> int:
        """Bytes of free pages in the database file (as of the last commit)."""
        return int(self._reader().execute("PRAGMA freelist_count").fetchone()[0]) * self.page_size

    def get_inline(self, artifact_id: str) -> bytes | None:
        row = (
            self._reader()
            .execute("SELECT value FROM key_values WHERE artifact_id = ?", (artifact_id,))
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    def tombstone_version(self, namespace_id: str) -> int | None:
        row = (
            self._reader()
            .execute(
                "SELECT version_ms FROM namespace_tombstones WHERE namespace_id = ?",
                (namespace_id,),
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    def artifact_tombstone_version(self, artifact_id: str) -> int | None:
        row = (
            self._reader()
            .execute(
                "SELECT version_ms FROM artifact_tombstones WHERE artifact_id = ?", (artifact_id,)
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    def artifact_tombstones_page(self, after: str | None, limit: int) -> list[ArtifactTombstone]:
        """Artifact tombstones in artifact-id order, strictly after the cursor ``after``."""
        rows = self._reader().execute(
            "SELECT artifact_id, namespace_id, version_ms, deleted_at_ms FROM artifact_tombstones "
            "WHERE artifact_id > ? ORDER BY artifact_id LIMIT ?",
            (after or "", limit),
        )
        return [ArtifactTombstone(row[0], row[1], int(row[2]), int(row[3])) for row in rows]

    def oldest_access_ms(self) -> int | None:
        """When the least recently used blob (in a file or in the database) was
        last read or written (the next to be evicted; ``None`` with none
        stored). One index step."""
        row = (
            self._reader()
            .execute("SELECT MIN(last_access_ms) FROM manifests WHERE inline = 0")
            .fetchone()
        )
        return None if row[0] is None else int(row[0])

    def artifact_tombstone_count(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM artifact_tombstones").fetchone()[0])

    def blob_paths(self) -> set[str]:
        rows = self._reader().execute("SELECT blob_path FROM manifests WHERE blob_path IS NOT NULL")
        return {row[0] for row in rows}

    def blob_paths_for(self, artifact_ids: Sequence[str]) -> set[str]:
        """The blob paths of those of ``artifact_ids`` that are stored as files."""
        found: set[str] = set()
        reader = self._reader()
        for start in range(0, len(artifact_ids), 500):
            chunk = artifact_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = reader.execute(
                "SELECT blob_path FROM manifests "
                f"WHERE blob_path IS NOT NULL AND artifact_id IN ({marks})",
                chunk,
            )
            found.update(row[0] for row in rows)
        return found

    def manifests_page(self, after: str | None, limit: int) -> list[Manifest]:
        rows = self._reader().execute(
            f"SELECT {_MANIFEST_COLUMNS} FROM manifests WHERE artifact_id > ? "
            "ORDER BY artifact_id LIMIT ?",
            (after or "", limit),
        )
        return [_manifest(row) for row in rows]

    def recent_manifests_page(
        self, before: tuple[int, str] | None, since_ms: int | None, limit: int
    ) -> list[Manifest]:
        """Manifests newest version first (``version_ms`` DESC, then ``artifact_id`` DESC).

        ``before`` is the exclusive keyset cursor ``(version_ms, artifact_id)``
        of the previous page's last row; ``since_ms`` keeps only versions
        strictly above it. Served from ``manifests_by_version``.
        """
        floor = -1 if since_ms is None else since_ms
        if before is None:
            rows = self._reader().execute(
                f"SELECT {_MANIFEST_COLUMNS} FROM manifests WHERE version_ms > ? "
                "ORDER BY version_ms DESC, artifact_id DESC LIMIT ?",
                (floor, limit),
            )
        else:
            version, artifact_id = before
            rows = self._reader().execute(
                f"SELECT {_MANIFEST_COLUMNS} FROM manifests WHERE version_ms > ? "
                "AND (version_ms, artifact_id) < (?, ?) "
                "ORDER BY version_ms DESC, artifact_id DESC LIMIT ?",
                (floor, version, artifact_id, limit),
            )
        return [_manifest(row) for row in rows]

    def manifest_totals(self, since_ms: int | None) -> tuple[int, int]:
        """``(count, bytes)`` of the manifests with a version strictly above ``since_ms``."""
        row = (
            self._reader()
            .execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM manifests WHERE version_ms > ?",
                (-1 if since_ms is None else since_ms,),
            )
            .fetchone()
        )
        return int(row[0]), int(row[1])

    def watermark(self, peer: str) -> str | None:
        """The stored catch-up state of ``peer`` (JSON text), if any."""
        row = (
            self._reader()
            .execute("SELECT state FROM peer_watermarks WHERE peer = ?", (peer,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def blobs_page(self, after: str | None, limit: int) -> list[Manifest]:
        """Blob manifests (bodies in files or in the database) in artifact-id
        order, strictly after ``after`` (the scrub)."""
        rows = self._reader().execute(
            f"SELECT {_MANIFEST_COLUMNS} FROM manifests "
            "WHERE inline = 0 AND artifact_id > ? ORDER BY artifact_id LIMIT ?",
            (after or "", limit),
        )
        return [_manifest(row) for row in rows]

    def tombstones_page(self, after: str | None, limit: int) -> list[tuple[str, int]]:
        """Tombstones in namespace order, strictly after the cursor ``after``."""
        reader = self._reader()
        if after is None:
            rows = reader.execute(
                "SELECT namespace_id, version_ms FROM namespace_tombstones "
                "ORDER BY namespace_id LIMIT ?",
                (limit,),
            )
        else:
            rows = reader.execute(
                "SELECT namespace_id, version_ms FROM namespace_tombstones "
                "WHERE namespace_id > ? ORDER BY namespace_id LIMIT ?",
                (after, limit),
            )
        return [(row[0], int(row[1])) for row in rows]

    def outbox_depth(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def outbox_batch(self, after_seq: int, limit: int) -> list[OutboxMessage]:
        rows = self._reader().execute(
            "SELECT seq, target, operation FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [OutboxMessage(row[0], row[1], json.loads(row[2])) for row in rows]

    def object_upload_count(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM object_uploads").fetchone()[0])

    def object_uploads_due(self, now_ms: int, limit: int) -> list[ObjectUpload]:
        """Up to ``limit`` queued uploads whose time has come, oldest first."""
        rows = self._reader().execute(
            "SELECT seq, kind, artifact_id, namespace_id, version_ms, attempts "
            "FROM object_uploads WHERE due_ms <= ? ORDER BY seq LIMIT ?",
            (now_ms, limit),
        )
        return [ObjectUpload(*row) for row in rows]

    def next_object_upload_due(self) -> int | None:
        row = self._reader().execute("SELECT MIN(due_ms) FROM object_uploads").fetchone()
        return None if row[0] is None else int(row[0])

    def get_upload(self, upload_id: str) -> Upload | None:
        reader = self._reader()
        row = reader.execute(
            "SELECT upload_id, tenant_id, namespace_id, category, hash, name, created_at_ms, "
            "total_bytes FROM multipart_uploads WHERE upload_id = ?",
            (upload_id,),
        ).fetchone()
        if row is None:
            return None
        parts = dict(
            reader.execute(
                "SELECT part_number, size FROM multipart_parts WHERE upload_id = ?", (upload_id,)
            ).fetchall()
        )
        return Upload(
            upload_id=row[0],
            tenant_id=row[1],
            namespace_id=row[2],
            category=row[3],
            hash=row[4],
            name=row[5],
            created_at_ms=row[6],
            total_bytes=row[7],
            parts=parts,
        )

    def expired_uploads(self, older_than_ms: int) -> list[str]:
        rows = self._reader().execute(
            "SELECT upload_id FROM multipart_uploads WHERE created_at_ms < ?", (older_than_ms,)
        )
        return [row[0] for row in rows]

    def live_parts(self) -> dict[str, set[int]]:
        live: dict[str, set[int]] = {}
        for upload_id, part_number in self._reader().execute(
            "SELECT upload_id, part_number FROM multipart_uploads "
            "LEFT JOIN multipart_parts USING (upload_id)"
        ):
            numbers = live.setdefault(upload_id, set())
            if part_number is not None:
                numbers.add(part_number)
        return live

    def upload_count(self) -> int:
        """Multipart uploads started and neither completed nor expired."""
        return int(self._reader().execute("SELECT COUNT(*) FROM multipart_uploads").fetchone()[0])

    def staged_part_bytes(self) -> int:
        return int(
            self._reader()
            .execute("SELECT COALESCE(SUM(size), 0) FROM multipart_parts")
            .fetchone()[0]
        )

    # -- writes --------------------------------------------------------------------

    def commit(
        self, operations: Sequence[Callable[[sqlite3.Connection], T]]
    ) -> list[T | Exception]:
        """Run ``operations`` in one durable transaction, each in a savepoint.

        Returns:
            One entry per operation: its return value, or the exception it
            raised (that operation's changes were rolled back; the others
            were committed).

        Raises:
            sqlite3.Error: the transaction itself failed; nothing committed.
        """
        conn = self._writer
        assert conn is not None, "MetadataStore.open() was not called"
        used_before = self.used_bytes
        results: list[T | Exception] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for operation in operations:
                conn.execute("SAVEPOINT op")
                used_at_savepoint = self.used_bytes
                try:
                    results.append(operation(conn))
                except Exception as error:  # one bad operation must not sink the batch
                    conn.execute("ROLLBACK TO op")
                    self.used_bytes = used_at_savepoint
                    results.append(error)
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            self.used_bytes = used_before
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    # Operations: each takes the writer connection and runs inside commit().

    def apply_artifact(
        self,
        conn: sqlite3.Connection,
        manifest: Manifest,
        inline_value: bytes | None,
        policy: WritePolicy,
        targets: Iterable[str],
        now_ms: int,
    ) -> ApplyResult:
        """Store ``manifest`` (and ``inline_value``, its body when it is kept in
        the database: exactly when ``manifest.in_database``) unless something
        newer wins.

        The new blob file, when there is one, is already durable in place;
        when the write does not apply, it is returned for unlinking.
        """
        assert (inline_value is not None) == manifest.in_database
        own_file = () if manifest.blob_path is None else (manifest.blob_path,)
        tombstone = conn.execute(
            "SELECT version_ms FROM namespace_tombstones WHERE namespace_id = ?",
            (manifest.namespace_id,),
        ).fetchone()
        if tombstone is not None and tombstone[0] >= manifest.version_ms:
            return ApplyResult(Outcome.IGNORED_TOMBSTONE, own_file)
        if _artifact_tombstoned(conn, manifest.artifact_id, manifest.version_ms):
            return ApplyResult(Outcome.IGNORED_TOMBSTONE, own_file)
        row = conn.execute(
            "SELECT version_ms, inline, blob_path, size FROM manifests WHERE artifact_id = ?",
            (manifest.artifact_id,),
        ).fetchone()
        replaced: tuple[str, ...] = ()
        if row is not None:
            version, inline, blob_path, size = row
            intact = blob_path is None or os.path.exists(os.path.join(self._data_dir, blob_path))
            if intact:
                if policy is WritePolicy.WRITE_ONCE:
                    return ApplyResult(Outcome.EXISTING, own_file)
                if version > manifest.version_ms:
                    return ApplyResult(Outcome.IGNORED_STALE, own_file)
                if version == manifest.version_ms:
                    return ApplyResult(Outcome.IGNORED_EQUAL, own_file)
            if blob_path is not None:
                replaced = (blob_path,)
            if not inline:
                self.used_bytes -= size
        conn.execute(
            "INSERT OR REPLACE INTO manifests (artifact_id, producer, namespace_id, key, "
            "content_type, inline, blob_path, size, version_ms, created_at_ms, last_access_ms, "
            "digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                manifest.artifact_id,
                manifest.producer,
                manifest.namespace_id,
                manifest.key,
                manifest.content_type,
                int(manifest.inline),
                manifest.blob_path,
                manifest.size,
                manifest.version_ms,
                manifest.created_at_ms,
                now_ms,
                manifest.digest,
            ),
        )
        if inline_value is not None:
            conn.execute(
                "INSERT OR REPLACE INTO key_values (artifact_id, value) VALUES (?, ?)",
                (manifest.artifact_id, inline_value),
            )
        else:
            conn.execute("DELETE FROM key_values WHERE artifact_id = ?", (manifest.artifact_id,))
        if not manifest.inline:  # key-value entries are not counted against the capacity
            self.used_bytes += manifest.size
        # A newer write than the delete: the artifact lives again, here and,
        # through the outbox, on every peer (theirs clear the same way).
        conn.execute(
            "DELETE FROM artifact_tombstones WHERE artifact_id = ?", (manifest.artifact_id,)
        )
        operation = {
            "type": "upsert_artifact",
            "artifact_id": manifest.artifact_id,
            "producer": manifest.producer,
            "namespace_id": manifest.namespace_id,
            "key": manifest.key,
            "content_type": manifest.content_type,
            "inline": manifest.inline,
            "version_ms": manifest.version_ms,
        }
        _enqueue(conn, targets, operation, now_ms)
        return ApplyResult(Outcome.APPLIED, replaced)

    def delete_namespace(
        self,
        conn: sqlite3.Connection,
        namespace_id: str,
        version_ms: int,
        targets: Iterable[str],
        now_ms: int,
    ) -> ApplyResult:
        """Tombstone ``namespace_id`` at ``version_ms`` and drop what it covers.

        Artifacts written after the tombstone's version survive; a tombstone
        never moves backwards.
        """
        current = conn.execute(
            "SELECT version_ms FROM namespace_tombstones WHERE namespace_id = ?", (namespace_id,)
        ).fetchone()
        if current is not None and current[0] >= version_ms:
            return ApplyResult(Outcome.IGNORED_OLDER)
        conn.execute(
            "INSERT OR REPLACE INTO namespace_tombstones (namespace_id, version_ms) VALUES (?, ?)",
            (namespace_id, version_ms),
        )
        doomed = conn.execute(
            "SELECT artifact_id, inline, blob_path, size FROM manifests "
            "WHERE namespace_id = ? AND version_ms <= ?",
            (namespace_id, version_ms),
        ).fetchall()
        unlink = []
        for artifact_id, inline, blob_path, size in doomed:
            conn.execute("DELETE FROM manifests WHERE artifact_id = ?", (artifact_id,))
            conn.execute("DELETE FROM key_values WHERE artifact_id = ?", (artifact_id,))
            if blob_path is not None:
                unlink.append(blob_path)
            if not inline:
                self.used_bytes -= size
        operation = {
            "type": "delete_namespace",
            "namespace_id": namespace_id,
            "version_ms": version_ms,
        }
        _enqueue(conn, targets, operation, now_ms)
        return ApplyResult(Outcome.APPLIED, tuple(unlink))

    def above_artifact_tombstone(self, conn: sqlite3.Connection, manifest: Manifest) -> Manifest:
        """``manifest``, versioned above its artifact's tombstone when one would refuse it.

        For a client's write (versioned by this node): the client writes after
        the delete it may have asked for itself, so the write must win even
        when the tombstone's version came from a peer whose clock runs ahead.
        """
        row = conn.execute(
            "SELECT version_ms FROM artifact_tombstones WHERE artifact_id = ?",
            (manifest.artifact_id,),
        ).fetchone()
        if row is None or row[0] < manifest.version_ms:
            return manifest
        return attrs.evolve(manifest, version_ms=int(row[0]) + 1)

    def delete_artifact(
        self,
        conn: sqlite3.Connection,
        tombstone: ArtifactTombstone,
        targets: Iterable[str],
        now_ms: int,
    ) -> ApplyResult:
        """Tombstone one artifact at ``tombstone.version_ms`` and drop what it covers.

        Last-writer-wins, as for writes: a stored version newer than the
        delete survives it (``ignored_stale``, nothing recorded); an equal or
        newer tombstone makes it moot (``ignored_older``). Otherwise the
        tombstone is recorded (or moved forward), the stored version (if any)
        is dropped in the same transaction, and one ``delete_artifact`` outbox
        row is queued per target. An artifact that is not stored here is
        tombstoned all the same, so a copy still on its way cannot land later.
        """
        current = conn.execute(
            "SELECT version_ms FROM artifact_tombstones WHERE artifact_id = ?",
            (tombstone.artifact_id,),
        ).fetchone()
        if current is not None and current[0] >= tombstone.version_ms:
            return ApplyResult(Outcome.IGNORED_OLDER)
        row = conn.execute(
            "SELECT version_ms, inline, blob_path, size FROM manifests WHERE artifact_id = ?",
            (tombstone.artifact_id,),
        ).fetchone()
        if row is not None and row[0] > tombstone.version_ms:
            return ApplyResult(Outcome.IGNORED_STALE)
        conn.execute(
            "INSERT OR REPLACE INTO artifact_tombstones "
            "(artifact_id, namespace_id, version_ms, deleted_at_ms) VALUES (?, ?, ?, ?)",
            (
                tombstone.artifact_id,
                tombstone.namespace_id,
                tombstone.version_ms,
                tombstone.deleted_at_ms,
            ),
        )
        unlink: tuple[str, ...] = ()
        if row is not None:
            _, inline, blob_path, size = row
            conn.execute("DELETE FROM manifests WHERE artifact_id = ?", (tombstone.artifact_id,))
            conn.execute("DELETE FROM key_values WHERE artifact_id = ?", (tombstone.artifact_id,))
            if blob_path is not None:
                unlink = (blob_path,)
            if not inline:
                self.used_bytes -= size
        operation = {
            "type": "delete_artifact",
            "artifact_id": tombstone.artifact_id,
            "namespace_id": tombstone.namespace_id,
            "version_ms": tombstone.version_ms,
        }
        _enqueue(conn, targets, operation, now_ms)
        return ApplyResult(Outcome.APPLIED, unlink)

    def purge_artifact_tombstones(
        self, conn: sqlite3.Connection, deleted_before_ms: int, limit: int
    ) -> int:
        """Forget up to ``limit`` artifact tombstones of deletes before ``deleted_before_ms``.

        Oldest first (the ``deleted_at_ms`` index); returns how many went.
        """
        return conn.execute(
            "DELETE FROM artifact_tombstones WHERE artifact_id IN ("
            "SELECT artifact_id FROM artifact_tombstones WHERE deleted_at_ms < ? "
            "ORDER BY deleted_at_ms LIMIT ?)",
            (deleted_before_ms, limit),
        ).rowcount

    def evict(
        self, conn: sqlite3.Connection, capacity: int, incoming: int, keep: str
    ) -> list[tuple[str, str, str | None, int]]:
        """Drop least-recently-used blobs until ``incoming`` more bytes fit.

        ``keep`` (the artifact being written) is never chosen, nor is an
        artifact still queued for the object store (``object_uploads``):
        with the tier on, the local disk is a cache of the store, and only
        what the store already holds may leave it. Eviction is local: it
        writes no tombstone and no outbox message.

        Returns:
            ``(artifact_id, producer, blob_path, size)`` of every evicted
            artifact (``blob_path`` ``None``: its body was in the database,
            and is gone with the transaction).
        """
        evicted: list[tuple[str, str, str | None, int]] = []
        while self.used_bytes + incoming > capacity:
            victims = conn.execute(
                "SELECT artifact_id, producer, blob_path, size FROM manifests AS m "
                "WHERE inline = 0 AND artifact_id != ? AND NOT EXISTS "
                "(SELECT 1 FROM object_uploads AS u WHERE u.artifact_id = m.artifact_id) "
                "ORDER BY last_access_ms LIMIT 64",
                (keep,),
            ).fetchall()
            if not victims:
                break
            for artifact_id, producer, blob_path, size in victims:
                conn.execute("DELETE FROM manifests WHERE artifact_id = ?", (artifact_id,))
                if blob_path is None:
                    conn.execute("DELETE FROM key_values WHERE artifact_id = ?", (artifact_id,))
                self.used_bytes -= size
                evicted.append((artifact_id, producer, blob_path, size))
                if self.used_bytes + incoming <= capacity:
                    break
        return evicted

    def return_free_pages(self, conn: sqlite3.Connection, pages: int) -> int:
        """Give up to ``pages`` free pages back to the filesystem; return how many went.

        An operation (inside :meth:`commit`): pages in use at the end of the
        file move into free ones and the file is cut, so it costs about as
        much as writing that many pages (~24 µs each here) while holding the
        write transaction: callers ask for a bounded number at a time. Does
        nothing in a database that does not return free pages.
        """
        if not self.space.returns_free_pages:
            return 0
        before = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        # One page per statement: Python's sqlite3 steps a statement that
        # returns no columns once, and each step of incremental_vacuum
        # frees one page, whatever count the pragma is given.
        for _ in range(min(pages, before)):
            conn.execute("PRAGMA incremental_vacuum(1)")
        return before - int(conn.execute("PRAGMA freelist_count").fetchone()[0])

    def drop_manifest(
        self, conn: sqlite3.Connection, artifact_id: str, version_ms: int
    ) -> Manifest | None:
        """Forget one artifact version (its body turned out damaged or missing).

        A newer version written meanwhile is left alone.
        """
        row = conn.execute(
            f"SELECT {_MANIFEST_COLUMNS} FROM manifests WHERE artifact_id = ? AND version_ms = ?",
            (artifact_id, version_ms),
        ).fetchone()
        if row is None:
            return None
        manifest = _manifest(row)
        conn.execute("DELETE FROM manifests WHERE artifact_id = ?", (artifact_id,))
        conn.execute("DELETE FROM key_values WHERE artifact_id = ?", (artifact_id,))
        if not manifest.inline:
            self.used_bytes -= manifest.size
        return manifest

    def fill_digest(
        self, conn: sqlite3.Connection, artifact_id: str, version_ms: int, digest: str
    ) -> bool:
        """Record the digest of a version stored without one (written before schema 2).

        Returns whether that version was still stored without a digest (a
        newer version, or one that got its digest meanwhile, is left alone).
        """
        updated = conn.execute(
            "UPDATE manifests SET digest = ? "
            "WHERE artifact_id = ? AND version_ms = ? AND digest IS NULL",
            (digest, artifact_id, version_ms),
        ).rowcount
        return bool(updated)

    def record_access(self, conn: sqlite3.Connection, accessed: dict[str, int]) -> None:
        conn.executemany(
            "UPDATE manifests SET last_access_ms = MAX(last_access_ms, ?) WHERE artifact_id = ?",
            [(when, artifact_id) for artifact_id, when in accessed.items()],
        )

    def create_upload(self, conn: sqlite3.Connection, upload: Upload) -> None:
        conn.execute(
            "INSERT INTO multipart_uploads (upload_id, tenant_id, namespace_id, category, hash, "
            "name, created_at_ms, total_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            (
                upload.upload_id,
                upload.tenant_id,
                upload.namespace_id,
                upload.category,
                upload.hash,
                upload.name,
                upload.created_at_ms,
            ),
        )

    def record_part(
        self, conn: sqlite3.Connection, upload_id: str, part_number: int, size: int, limit: int
    ) -> int | None:
        """Record an acknowledged part; return the replaced part's size, if any.

        Raises:
            KeyError: the upload is unknown (expired or completed).
            OverflowError: the upload's running total would exceed ``limit``.
        """
        row = conn.execute(
            "SELECT total_bytes FROM multipart_uploads WHERE upload_id = ?", (upload_id,)
        ).fetchone()
        if row is None:
            raise KeyError(upload_id)
        previous = conn.execute(
            "SELECT size FROM multipart_parts WHERE upload_id = ? AND part_number = ?",
            (upload_id, part_number),
        ).fetchone()
        replaced = None if previous is None else int(previous[0])
        total = row[0] - (replaced or 0) + size
        if total > limit:
            raise OverflowError(total)
        conn.execute(
            "INSERT OR REPLACE INTO multipart_parts (upload_id, part_number, size) "
            "VALUES (?, ?, ?)",
            (upload_id, part_number, size),
        )
        conn.execute(
            "UPDATE multipart_uploads SET total_bytes = ? WHERE upload_id = ?", (total, upload_id)
        )
        return replaced

    def forget_upload(self, conn: sqlite3.Connection, upload_id: str) -> int | None:
        """Delete an upload and its parts; return the bytes of the parts it had.

        ``None`` when the upload was already gone (completed or expired by
        someone else), so its parts are given back exactly once.
        """
        (part_bytes,) = conn.execute(
            "SELECT COALESCE(SUM(size), 0) FROM multipart_parts WHERE upload_id = ?", (upload_id,)
        ).fetchone()
        conn.execute("DELETE FROM multipart_parts WHERE upload_id = ?", (upload_id,))
        deleted = conn.execute(
            "DELETE FROM multipart_uploads WHERE upload_id = ?", (upload_id,)
        ).rowcount
        return int(part_bytes) if deleted else None

    def save_watermark(self, conn: sqlite3.Connection, peer: str, state: str, now_ms: int) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO peer_watermarks (peer, state, updated_at_ms) VALUES (?, ?, ?)",
            (peer, state, now_ms),
        )

    def delete_object_uploads(self, conn: sqlite3.Connection, seqs: Sequence[int]) -> int:
        """Delete uploaded rows; returns the rows left (counted in the same transaction)."""
        conn.executemany("DELETE FROM object_uploads WHERE seq = ?", [(s,) for s in seqs])
        return int(conn.execute("SELECT COUNT(*) FROM object_uploads").fetchone()[0])

    def postpone_object_uploads(
        self, conn: sqlite3.Connection, due: Sequence[tuple[int, int]]
    ) -> None:
        """Count a failed attempt of each ``(seq, due_ms)`` row and move its turn to ``due_ms``."""
        conn.executemany(
            "UPDATE object_uploads SET attempts = attempts + 1, due_ms = ? WHERE seq = ?",
            [(due_ms, seq) for seq, due_ms in due],
        )

    def delete_outbox(self, conn: sqlite3.Connection, seqs: Sequence[int]) -> int:
        return conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs]).rowcount


def _bring_to_current_schema(conn: sqlite3.Connection) -> None:
    """Create, migrate or refuse, by the store's ``user_version``, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"metadata schema version {found} is newer than this release supports "
                f"({SCHEMA_VERSION}): the data directory was written by a newer kura; "
                "run that release (or a newer one) on it"
            )
        if found == 0:
            # A new store: statements in the script are all IF NOT EXISTS.
            _run_script(conn, _SCHEMA)
        else:
            for version in range(found, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _space_mode(conn: sqlite3.Connection, page_size: int) -> SpaceMode:
    """Find out whether the database returns free pages; convert it if it is small.

    Runs at open, outside any transaction (``VACUUM`` cannot run in one).
    A crash during the conversion leaves the database as it was (``VACUUM``
    is one transaction); the next start converts it again.
    """
    size = int(conn.execute("PRAGMA page_count").fetchone()[0]) * page_size
    if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == INCREMENTAL_VACUUM:
        return SpaceMode(returns_free_pages=True, converted_seconds=None, database_bytes=size)
    if size > CONVERT_AT_OPEN_MAX_BYTES:
        return SpaceMode(returns_free_pages=False, converted_seconds=None, database_bytes=size)
    started = time.monotonic()
    conn.execute(f"PRAGMA auto_vacuum = {INCREMENTAL_VACUUM}")  # applied by the VACUUM
    try:
        conn.execute("VACUUM")
    except sqlite3.Error as error:  # e.g. no room for the copy: not a reason to stay down
        return SpaceMode(
            returns_free_pages=False,
            converted_seconds=None,
            database_bytes=size,
            conversion_error=str(error),
        )
    converted = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == INCREMENTAL_VACUUM
    return SpaceMode(
        returns_free_pages=converted,
        converted_seconds=time.monotonic() - started if converted else None,
        database_bytes=size,
    )


def _artifact_tombstoned(conn: sqlite3.Connection, artifact_id: str, version_ms: int) -> bool:
    """Whether a delete at or above ``version_ms`` tombstones the artifact."""
    row = conn.execute(
        "SELECT version_ms FROM artifact_tombstones WHERE artifact_id = ?", (artifact_id,)
    ).fetchone()
    return row is not None and row[0] >= version_ms


def _enqueue(
    conn: sqlite3.Connection, targets: Iterable[str], operation: dict[str, Any], now_ms: int
) -> None:
    payload = json.dumps(operation, separators=(",", ":"), sort_keys=True)
    conn.executemany(
        "INSERT INTO outbox (target, operation, created_at_ms) VALUES (?, ?, ?)",
        [(target, payload, now_ms) for target in targets],
    )


def enqueue_object_upload(
    conn: sqlite3.Connection,
    kind: str,
    artifact_id: str,
    namespace_id: str,
    version_ms: int,
    now_ms: int,
) -> None:
    """Queue one write or delete for the object store, due at once (an operation).

    A module function: the queue's hooks (:class:`kura.objectstore.queue.UploadQueue`)
    run inside another operation's transaction, on its connection.
    """
    conn.execute(
        "INSERT INTO object_uploads (kind, artifact_id, namespace_id, version_ms, due_ms, "
        "created_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
        (kind, artifact_id, namespace_id, version_ms, now_ms, now_ms),
    )

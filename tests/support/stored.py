"""Where a node's artifact bodies are: files under ``blobs/``, or rows of the
metadata database (metadata schema 4 keeps small bodies there).

Read from the data directory through a read-only connection of our own, so
the helpers work beside a running node, in-memory or real.
"""

from __future__ import annotations

import os
import sqlite3


def database_bodies(data_dir: str) -> list[tuple[str, int]]:
    """``(key, size)`` of every blob whose body is kept in the database, by key
    (the key's last segment: ``c1`` for the CAS object ``blob/c1``);
    key-value entries are not blobs."""
    database = sqlite3.connect(f"file:{data_dir}/kura.sqlite3?mode=ro", uri=True)
    try:
        found = database.execute(
            "SELECT m.key, length(k.value) FROM manifests AS m "
            "JOIN key_values AS k USING (artifact_id) WHERE m.inline = 0 AND m.blob_path IS NULL"
        ).fetchall()
    finally:
        database.close()
    return sorted((key.rsplit("/", 1)[-1], size) for key, size in found)


def blob_files(data_dir: str) -> list[str]:
    """The files under ``blobs/``, sorted."""
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(data_dir, "blobs"))
        for name in names
    )


def stored_bodies(data_dir: str) -> tuple[int, int]:
    """How many blob bodies are stored: ``(in files, in the database)``."""
    return len(blob_files(data_dir)), len(database_bodies(data_dir))

"""Where things live under ``KURA_DATA_DIR`` and ``KURA_TMP_DIR``.

::

    <data>/kura.sqlite3           metadata (WAL mode)
    <data>/.kura.writer.lock      single-writer lock
    <data>/blobs/ab/<id>-<rand>   artifact bodies, named from the artifact id
                                  (``ab``: its first two characters, or for a
                                  batch of small bodies the first body's)
    <tmp>/uploads/<uuid>          bodies being received (set aside at start-up
                                  as uploads.stale-<uuid>, then removed)
    <tmp>/parts/<upload>/<n>      acknowledged multipart parts (kept)

A blob's name is its artifact id plus a random suffix, so two versions of one
key never share a file: a new version is placed beside the old one and the
old file is unlinked only after the metadata commit, which keeps every
in-flight download of the old version intact.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid

import attrs

#: ``uploads`` + this + a uuid: a staging area set aside at start-up.
STALE_SUFFIX = ".stale-"


def fsync_directory(path: str) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directory_durably(directory: str) -> None:
    """Create ``directory`` (and missing parents) so its entry survives power loss.

    A file renamed or created in a directory that was made moments before is
    only durable once the new directory's own entry is: fsync each parent
    that gained one (the file's directory itself is fsynced by the caller).
    """
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    make_directory_durably(parent)
    with contextlib.suppress(FileExistsError):  # a concurrent publish made it
        os.mkdir(directory)
    fsync_directory(parent)


@attrs.frozen
class Layout:
    """Paths of one node's data and staging directories."""

    data_dir: str
    tmp_dir: str

    @property
    def database(self) -> str:
        return os.path.join(self.data_dir, "kura.sqlite3")

    @property
    def blobs(self) -> str:
        return os.path.join(self.data_dir, "blobs")

    @property
    def uploads(self) -> str:
        return os.path.join(self.tmp_dir, "uploads")

    @property
    def parts(self) -> str:
        return os.path.join(self.tmp_dir, "parts")

    def prepare(self) -> None:
        """Create the directories and set the old upload staging area aside.

        Anything in ``uploads/`` belongs to a request that never completed, so
        it is never published and can go (upstream learned this the hard way:
        leftover staging once filled a disk). Removing it file by file could
        take long, so it is renamed to ``uploads.stale-<uuid>`` (one rename,
        whatever it holds) and a fresh ``uploads/`` is made; the start-up
        sweep (:mod:`.sweep`) deletes the stale directories in the background.
        """
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(self.blobs, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        if os.path.isdir(self.uploads):
            os.rename(self.uploads, f"{self.uploads}{STALE_SUFFIX}{uuid.uuid4().hex}")
        os.makedirs(self.uploads, exist_ok=True)
        os.makedirs(self.parts, exist_ok=True)

    def stale_staging(self) -> list[str]:
        """The staging directories set aside by :meth:`prepare` (now or at an earlier start)."""
        prefix = os.path.basename(self.uploads) + STALE_SUFFIX
        return sorted(
            os.path.join(self.tmp_dir, name)
            for name in os.listdir(self.tmp_dir)
            if name.startswith(prefix)
        )

    def new_upload_path(self) -> str:
        return os.path.join(self.uploads, uuid.uuid4().hex)

    def new_blob_path(self, artifact_id: str, shard: str | None = None) -> str:
        """A fresh relative blob path for ``artifact_id`` (see module docstring).

        The shard directory is the id's first two characters unless ``shard``
        names another: a batch of small bodies shares one directory, so one
        directory fsync covers it. Readers never derive the path from the
        id; they read it from the manifest.
        """
        directory = artifact_id[:2] if shard is None else shard
        return os.path.join("blobs", directory, f"{artifact_id}-{secrets.token_hex(6)}")

    def absolute(self, relative: str) -> str:
        return os.path.join(self.data_dir, relative)

    def part_path(self, upload_id: str, part_number: int) -> str:
        return os.path.join(self.parts, upload_id, f"{part_number}.part")

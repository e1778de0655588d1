"""Descriptors of real files for tests of the code that reads artifact bodies."""

from __future__ import annotations

import os
from pathlib import Path


def open_blob(directory: Path, data: bytes) -> int:
    """A read-only descriptor of a new file in ``directory`` holding ``data``."""
    path = directory / "blob"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def is_open(fd: int) -> bool:
    """Whether ``fd`` still names an open file."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True

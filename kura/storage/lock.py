"""The single-writer lock: one kura process per data directory."""

from __future__ import annotations

import fcntl
import os

LOCK_FILE_NAME = ".kura.writer.lock"


class WriterLockHeld(RuntimeError):
    """Another process holds the data directory's writer lock."""


class WriterLock:
    """An exclusive ``flock`` on ``<data_dir>/.kura.writer.lock`` recording our pid.

    The lock lives as long as the file descriptor, so a killed process
    releases it with no clean-up; a stale pid in the file is harmless.
    """

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, LOCK_FILE_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`WriterLockHeld` naming the lock file."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise WriterLockHeld(
                f"failed to acquire writer lock {self.path}: held by pid {holder}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

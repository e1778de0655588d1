"""Splice pipes, kept between transfers.

In splice mode every transfer moves its body file -> pipe -> socket, so it
needs a pipe of its own. A drained pipe is kept for the next transfer rather
than on its connection: an idle keep-alive connection then holds one
descriptor, not three (10,000 of them would exhaust the descriptor limit).
At most one spare is kept per transfer permit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

#: Linux ``F_SETPIPE_SZ``: make one pipe hold a whole chunk.
F_SETPIPE_SZ = 1031

Pipe = tuple[int, int]


def make_pipe(chunk_bytes: int) -> Pipe:
    """A non-blocking pipe sized for one chunk (as far as the system allows)."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Without the resize the default capacity stands; splice moves smaller pieces.
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, F_SETPIPE_SZ, chunk_bytes)
    return read_end, write_end


class PipePool:
    """Drained ``(read, write)`` pipes between transfers (see the module docstring).

    Args:
        chunk_bytes: the capacity new pipes ask for.
        keep: most spare pipes kept (one per permit).
    """

    def __init__(self, chunk_bytes: int, keep: int) -> None:
        self._chunk_bytes = chunk_bytes
        self._keep = keep
        self._spare: list[Pipe] = []

    def __len__(self) -> int:
        return len(self._spare)

    def take(self) -> Pipe:
        """A drained pipe: a spare one, or a new one.

        Raises:
            OSError: out of descriptors.
        """
        if self._spare:
            return self._spare.pop()
        return make_pipe(self._chunk_bytes)

    def give_back(self, pipe: Pipe) -> None:
        """Keep a drained pipe for the next transfer, or close it when enough are kept."""
        if len(self._spare) < self._keep:
            self._spare.append(pipe)
        else:
            discard(pipe)

    def close(self) -> None:
        """Close every spare pipe."""
        while self._spare:
            discard(self._spare.pop())


def discard(pipe: Pipe) -> None:
    """Close a pipe that may still hold bytes (never to be reused)."""
    for end in pipe:
        os.close(end)

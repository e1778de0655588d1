"""Request ids: the client's own ``X-Request-Id`` when it is safe, else a fresh one.

Both serving paths answer every request with an ``X-Request-Id`` and log it,
so a client's id can be followed through a proxy chain. A supplied id is only
echoed when it is a short token (it goes into a response head and a log
line); otherwise the node makes one: a per-process random prefix and a
counter, because a UUID per 4 KiB response costs more than its syscalls and
ids only need to be unique and opaque.
"""

from __future__ import annotations

import itertools
import os
import re

_SAFE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """Hands out request ids for one node (both serving paths share one)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode("ascii")
        self._counter = itertools.count(1)

    def next(self) -> bytes:
        """A fresh id."""
        return b"%s%010x" % (self._prefix, next(self._counter))

    def for_request(self, supplied: bytes | None) -> bytes:
        """``supplied`` when it is a safe token, else a fresh id."""
        if supplied is not None and _SAFE.fullmatch(supplied):
            return supplied
        return self.next()

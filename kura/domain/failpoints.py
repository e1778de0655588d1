"""Named crash points, armed from ``KURA_FAILPOINTS`` for crash-consistency tests.

A failpoint sits between two steps of a durable sequence (publish, outbox
delivery). Armed with ``exit`` it kills the process on the spot, as a power
cut would from the application's point of view; armed with ``error`` it raises
a :class:`~kura.domain.errors.StorageFault` so the caller's cleanup path runs.
Unarmed, :meth:`Failpoints.hit` costs one dict lookup.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from kura.domain.errors import StorageFault

#: Every point kura defines, in the order a publish or delivery passes them.
BEFORE_FSYNC = "before_fsync"
AFTER_BYTES_DURABLE_BEFORE_METADATA = "after_bytes_durable_before_metadata"
AFTER_METADATA_COMMIT_BEFORE_ACK = "after_metadata_commit_before_ack"
BEFORE_OUTBOX_DELETE_AFTER_PEER_ACK = "before_outbox_delete_after_peer_ack"
#: The object store holds a pass's uploads; their queue rows are not deleted yet.
AFTER_OBJECT_UPLOAD_BEFORE_DEQUEUE = "after_object_upload_before_dequeue"
KNOWN = frozenset(
    {
        BEFORE_FSYNC,
        AFTER_BYTES_DURABLE_BEFORE_METADATA,
        AFTER_METADATA_COMMIT_BEFORE_ACK,
        BEFORE_OUTBOX_DELETE_AFTER_PEER_ACK,
        AFTER_OBJECT_UPLOAD_BEFORE_DEQUEUE,
    }
)

#: The exit status of a process stopped by an ``exit`` failpoint (as SIGKILL).
EXIT_STATUS = 137


class Failpoints:
    """The armed failpoints of this process."""

    def __init__(self, armed: Iterable[tuple[str, str]] = ()) -> None:
        self._armed = dict(armed)
        unknown = set(self._armed) - KNOWN
        if unknown:
            raise ValueError(f"unknown failpoints: {', '.join(sorted(unknown))}")

    def hit(self, name: str) -> None:
        """Pass the point ``name``: exit or raise if it is armed."""
        action = self._armed.get(name)
        if action == "exit":
            os._exit(EXIT_STATUS)
        if action == "error":
            raise StorageFault(f"failpoint {name} fired")

"""The storage layer's seams, as zope interfaces.

``verifyObject`` tests keep the implementations honest: see
``tests/storage/test_interfaces.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from zope.interface import Interface


class IReplicationTargets(Interface):
    """Where a write must be replicated, asked at write time.

    The store queues one outbox row per target in the transaction of the
    write itself. Implemented by the mesh's membership
    (:class:`kura.replication.membership.Membership`) and, for a store
    without peers, by :class:`kura.storage.store.StaticTargets`.
    """

    def targets() -> Sequence[str]:
        """The internal base URLs of the peers a write made now must reach."""

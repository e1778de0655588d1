"""Per-client caps on request bodies being staged at once (``KURA_MAX_UPLOADS_PER_CLIENT``).

Without a cap one client can open as many uploads as it has sockets and hold
a staging step, a descriptor and a slot of every shared budget with each. A
request takes an :class:`UploadSlot` from its head, before its body is read,
and gives it back when the request ends, however it ends; one over the cap is
refused with 429 and never reads a body byte.

Clients are keyed by who they are when the extension says so (a
:class:`~kura.auth.results.Principal`'s kind and id: one user behind many
addresses is one client, and many users behind one NAT are many), else by
their address (:mod:`.client_address`).

Reactor thread only.
"""

from __future__ import annotations

from kura.auth.results import Principal
from kura.domain.errors import TooManyRequests

from .admission import Caller

#: The 429 message of a request over its client's cap.
TOO_MANY_UPLOADS = "Too many concurrent uploads from this client"

#: ``("principal", kind, id)`` or ``("address", address)``.
ClientKey = tuple[str, ...]


def client_key(caller: Caller | None, address: str) -> ClientKey:
    """The key a request's uploads are counted under.

    Args:
        caller: who the extension hooks said the request runs as, if anyone.
        address: the request's client address.
    """
    if isinstance(caller, Principal):
        return ("principal", caller.kind, caller.id)
    return ("address", address)


class UploadSlot:
    """One upload's place under its client's cap; :meth:`release` gives it back."""

    def __init__(self, slots: UploadSlots, key: ClientKey) -> None:
        self.key = key
        self._slots: UploadSlots | None = slots

    def release(self) -> None:
        """Give the slot back (idempotent: every way a request ends may call it)."""
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._release(self.key)


class UploadSlots:
    """Counts uploads in flight per client and refuses those over ``limit``.

    Args:
        limit: uploads one client may have in flight at once (at least 1).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_use: dict[ClientKey, int] = {}

    def acquire(self, key: ClientKey) -> UploadSlot:
        """Take a slot for ``key``.

        Raises:
            TooManyRequests: ``key`` already holds ``limit`` slots (429,
                ``Retry-After: 1``, the connection closes: the body is unread).
        """
        held = self._in_use.get(key, 0)
        if held >= self.limit:
            raise TooManyRequests(TOO_MANY_UPLOADS, close=True)
        self._in_use[key] = held + 1
        return UploadSlot(self, key)

    def in_use(self, key: ClientKey) -> int:
        """Slots ``key`` holds now."""
        return self._in_use.get(key, 0)

    @property
    def clients(self) -> int:
        """Clients holding at least one slot (idle clients leave no entry behind)."""
        return len(self._in_use)

    def _release(self, key: ClientKey) -> None:
        held = self._in_use.get(key, 0) - 1
        if held > 0:
            self._in_use[key] = held
        else:
            self._in_use.pop(key, None)

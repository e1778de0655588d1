"""The accelerator's seam: what moves a response's bytes, as zope interfaces.

:class:`ITransferEngine` is implemented by
:class:`~kura.accel.engine.KernelTransferEngine` (splice/sendfile inline on
the reactor, then a worker thread) and by
:class:`~kura.accel.testing.FakeTransferEngine`, which records what would be
sent and lets a test complete, fail or hold each transfer. Both are checked
with ``verifyObject`` (``tests/accel/test_engine.py``), and the connection
(:mod:`.protocol`) is tested deterministically against the fake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from zope.interface import Attribute, Interface

# A transfer's outcome once over; also the egress metrics' ``result`` labels.
OK: Final = "ok"
CLIENT_ABORTED: Final = "client_aborted"
WRITE_TIMEOUT: Final = "write_timeout"
#: The file was shorter than its manifest: the response ended early.
INCOMPLETE: Final = "incomplete"
ERROR: Final = "error"


class ITransfer(Interface):
    """One response on its way to a client: its head, then a range of an open file."""

    result = Attribute(
        "The outcome once the transfer is over (``ok``, ``client_aborted``, "
        "``write_timeout``, ``incomplete`` or ``error``), ``None`` while it runs."
    )
    sent = Attribute("Body bytes delivered to the socket so far.")
    head_sent = Attribute("Whether the whole response head has left (the first byte).")

    def stop() -> None:
        """The client is gone: end soon, with ``client_aborted``.

        Idempotent, and without effect once the transfer is over.
        """


class ITransferEngine(Interface):
    """Moves accelerated responses from artifact files to client sockets.

    Everything is called on the reactor thread.
    """

    mode = Attribute("The serving-path label of its transfers: ``splice`` or ``sendfile``.")

    def reserve(length: int) -> object:
        """Take what the next transfer, of at most ``length`` body bytes, needs
        besides the file (a splice pipe, unless the body is small enough for
        ``sendfile``).

        Called while falling back to twisted.web is still possible, so a
        failure here is a fall-back, not a broken response. The reservation
        goes to exactly one :meth:`start` or :meth:`release`.

        Raises:
            OSError: out of descriptors.
        """

    def release(reservation: object) -> None:
        """Give back a reservation no transfer will use."""

    def start(
        reservation: object,
        transport: Any,
        head: bytes,
        file_fd: int,
        offset: int,
        length: int,
        done: Callable[[Any], None],
    ) -> ITransfer:
        """Send ``head``, then ``length`` bytes of ``file_fd`` from ``offset``.

        Nothing may be buffered in ``transport`` (the bytes go to its socket
        directly). ``file_fd`` stays the caller's and must stay open until
        the transfer is over.

        Returns:
            The transfer. When its ``result`` is set on return, it is over
            (a small body leaves at once) and ``done`` is never called.
            Otherwise it goes on in the background, the caller keeps the
            connection from reading meanwhile, and ``done(transfer)`` is
            called once, on the reactor thread, when it is over.
        """

    def send(
        transport: Any, head: bytes, file_fd: int, length: int, done: Callable[[Any], None]
    ) -> ITransfer | None:
        """Send ``head``, then the whole of a small file (``length`` bytes,
        at most what ``sendfile`` sends in one go; no reservation), right now
        if the socket takes it.

        The same contract as :meth:`start`, except for the common case: when
        the head and the whole body left at once, it returns ``None`` and
        no transfer exists (nothing was made for it). Otherwise it returns
        the transfer, over (a failure) or going on in the background.
        ``file_fd`` may stop being valid when control returns to the
        reactor unless the caller holds it for a returned transfer whose
        ``result`` is ``None``.
        """

    def close() -> None:
        """Release what is kept between transfers (spare pipes)."""

"""Writing a response to a plain TCP connection without a reactor turn: :func:`send_now`.

``transport.write`` only queues: Twisted asks epoll for write readiness
(``epoll_ctl``), sends on the next reactor iteration and withdraws the
interest again (a second ``epoll_ctl``). For a response that fits in the
socket's send buffer, which is every small one, that round trip is pure
overhead: the kernel would have taken the bytes at once. :func:`send_now`
hands them to the socket directly when nothing is queued ahead of them, and
leaves whatever the socket did not take to ``transport.write``, so ordering,
back-pressure (a streaming producer paused on a full buffer) and error
handling stay Twisted's.

It writes to the socket only when that cannot change what the peer
receives or when Twisted learns about it:

* a plain ``tcp.Connection`` (TLS transports encrypt in their own buffer);
* connected, not closing or half-closed;
* nothing queued in the transport (bytes sent now would overtake them);
* no pull producer registered (Twisted asks it for more only after a
  queued write drained, which a direct send never goes through).

Errors are not handled here: bytes the socket refused (``EAGAIN``, a reset,
a closed peer) go to ``transport.write``, whose next write attempt finds the
same error and closes the connection the usual way.

The transport fields read here are Twisted's private ones, pinned by
``tests/web/test_twisted_internals.py``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp


def direct_socket(transport: Any) -> socket.socket | None:
    """The socket ``transport`` may be written to directly right now, or ``None``."""
    if (
        not isinstance(transport, tcp.Connection)
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        or (transport.producer is not None and not transport.streamingProducer)
    ):
        return None
    return transport.socket


def send_now(transport: Any, data: bytes) -> int:
    """Write ``data`` to ``transport``, into the socket at once when possible.

    Returns how many bytes went straight into the socket (the rest, if any,
    was queued with ``transport.write``).
    """
    sock = direct_socket(transport)
    sent = 0
    if sock is not None and data:
        try:
            sent = sock.send(data)
        except OSError:
            # EAGAIN, EINTR, or a dead connection: Twisted's write path
            # retries, or finds the error and closes the connection.
            sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)
    return sent

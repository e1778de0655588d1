"""The floor of the accelerator's design: a minimal same-shape file server.

Run as ``python benchmarks/accel_prototype.py ROOT PORT``. Per request it does
only what the accelerator's design cannot avoid, on the same Twisted epoll
reactor: find the end of the head, take the path from the request line, look
the file's descriptor up in a dict (opened once), ``fstat`` it, send the
response head with ``MSG_MORE`` and the body with ``sendfile``. No validation,
no metrics, no logging, no authorization; a blocked socket is simply waited for
in a blocking loop (the benchmark's bodies are small).

``benchmarks/serving.py`` runs it as server ``proto`` so every run carries the
cost of this design in Python/Twisted beside kura's and nginx's: the gap
between ``proto`` and ``accel`` is what kura's own code costs per request.
It is a measuring stick, never a server to deploy.
"""

from __future__ import annotations

import os
import select
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


class _Files:
    """Open descriptors by request path, relative to one root directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[bytes, int] = {}

    def fd(self, path: bytes) -> int | None:
        fd = self.fds.get(path)
        if fd is None:
            name = os.path.join(self.root, os.path.basename(path.decode("ascii")))
            try:
                fd = self.fds[path] = os.open(name, os.O_RDONLY)
            except OSError:
                return None
        return fd


class PrototypeProtocol(Protocol):
    """Answers every GET head in the buffer with the named file (or a 404)."""

    def __init__(self, files: _Files) -> None:
        self.files = files
        self.buffer = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.setTcpNoDelay(True)
        self.sock = transport.socket

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            line = buffer[: buffer.find(b"\r\n")]
            buffer = buffer[end + 4 :]
            self.answer(line.split(b" ")[1].partition(b"?")[0])
        self.buffer = buffer

    def answer(self, path: bytes) -> None:
        fd = self.files.fd(path)
        if fd is None:
            self.sock.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        size = os.fstat(fd).st_size
        self.sock.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream"
            b"\r\n\r\n" % size,
            socket.MSG_MORE,
        )
        offset = 0
        while offset < size:
            try:
                offset += os.sendfile(self.sock.fileno(), fd, offset, size - offset)
            except BlockingIOError:
                # Only a stick to measure with: wait for room in the socket.
                select.select([], [self.sock], [])


def main(argv: list[str]) -> None:
    root, port = argv[0], int(argv[1])
    files = _Files(root)
    factory = Factory.forProtocol(lambda: PrototypeProtocol(files))
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])

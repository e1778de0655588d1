"""CPU per accelerated request of kura's own code, without the reactor or a client.

One in-memory node (``kura.testing.memory_node``, the real kernel transfer
engine) stores one artifact; one ``SamePortProtocol`` is attached to one end
of a Unix socket pair. Each request is one ``dataReceived`` of a GET head
(the same head ``wrk`` sends), after which the other end reads the whole
response. The figure is the process CPU time (user + system) per request:
parsing, classification, decision, head, metrics, the send and sendfile
syscalls and the reader's recv; not Twisted's event dispatch, not TCP.

Run for the one-step path (``one-step``) and for the general path
(``general``: the one-step path switched off on that connection), as median
[min-max] of ``--repeat`` runs of ``--number`` requests. A steady state is
measured: the file was verified long ago (the racy-verification window is
set to zero, as the artifact was written a moment before).

CPU time on a shared machine is noisy; for small changes count instructions
instead: ``instructions.py`` runs this script under callgrind for two
``--number`` values and divides the difference by the difference in requests.

Usage (from the repository root)::

    .venv/bin/python benchmarks/accel_inprocess.py [--size 4096] [--number 20000] [--repeat 5]
        [--paths one-step,general]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

# Run the working tree, not a copy installed into the venv.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kura.accel.protocol import SamePortFactory, SamePortProtocol
from kura.storage import verify
from kura.telemetry.logs import observer_for
from kura.testing import memory_node, request

TARGET = "/api/cache/cas/bench?tenant_id=default"
HEAD = f"GET {TARGET} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n".encode()


class SocketTransport:
    """What the protocol uses of a TCP transport, over one end of a socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        raise RuntimeError("a response went on in the background: the reader fell behind")

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.socket.sendall(data)

    def loseConnection(self) -> None:
        raise RuntimeError("the connection was closed")

    abortConnection = loseConnection


def run(protocol: SamePortProtocol, reader: socket.socket, number: int, length: int) -> float:
    """CPU µs per request over ``number`` requests."""
    into = memoryview(bytearray(1 << 20))  # no allocation per read
    started = time.process_time()
    for _ in range(number):
        protocol.dataReceived(HEAD)
        got = 0
        while got < length:
            got += reader.recv_into(into)
    return (time.process_time() - started) / number * 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="artifact bytes (4096)")
    parser.add_argument("--number", type=int, default=20000, help="requests per run (20000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per path (5)")
    parser.add_argument(
        "--paths", default="one-step,general", help="comma list of one-step, general (both)"
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="the JSON access log on, its lines written to /dev/null (the node's default)",
    )
    args = parser.parse_args(argv)
    verify.RACY_SECONDS = 0.0  # steady state: the file was verified long ago
    with tempfile.TemporaryDirectory() as data:
        if args.access_log:
            observer_for("json", open(os.devnull, "w"))  # noqa: SIM115 - for the process's life
        node = memory_node(data, KURA_ACCESS_LOG="true" if args.access_log else "false")
        body = os.urandom(args.size)
        stored = request(node, "POST", TARGET, body)
        assert stored.status == 204, stored
        results: dict[str, list[float]] = {}
        for path in args.paths.split(","):
            server_end, reader = socket.socketpair()
            protocol = SamePortFactory(node.accelerator).buildProtocol(None)
            if path == "general":
                protocol._serve_now = lambda candidate, manifest: False  # type: ignore[method-assign]
            protocol.makeConnection(SocketTransport(server_end))  # type: ignore[arg-type]
            protocol.dataReceived(HEAD)  # opens the file, sizes the response
            first = b""
            while b"\r\n\r\n" not in first or len(first) < first.index(b"\r\n\r\n") + 4 + len(body):
                first += reader.recv(1 << 20)
            assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(body), first[:200]
            length = len(first)
            results[path] = [run(protocol, reader, args.number, length) for _ in range(args.repeat)]
            server_end.close()
            reader.close()
    for path, values in results.items():
        print(
            f"{path:<9} {statistics.median(values):6.2f} µs/request "
            f"[{min(values):.2f}-{max(values):.2f}] CPU, {args.size} B body, "
            f"{args.repeat} x {args.number} requests"
            + (", JSON access log on" if args.access_log else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

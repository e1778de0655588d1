"""Hostile HTTP/2 clients against real ``twistd kura`` processes.

h2c prior-knowledge connections on the plain port, written with the ``h2``
library over raw sockets: a client that opens a huge flow-control window
and never reads (memory), one that opens and resets streams as fast as it
can (CVE-2023-44487, CPU), and one that reads but never returns its window
(the send loop). The node is observed from outside: RSS, CPU time and
read/write counters through psutil, ``/metrics``, and control requests.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from tests.faults.support import (
    CAS,
    MiB,
    assert_alive,
    cpu_seconds,
    metric,
    process,
    verified,
    wait_for,
    warm_up,
)
from tests.support.h2client import H2Requests
from tests.support.real import RealNode

pytestmark = pytest.mark.faults

#: The artifact of the reported attack.
ARTIFACT_MIB = 120
HUGE_WINDOW = 2**31 - 1


class H2Client(H2Requests):
    """One h2c prior-knowledge connection on a raw socket, driven with the h2 library.

    Args:
        port: the node's plain public port.
        window: the flow-control window advertised, per stream and for the
            connection.
    """

    def __init__(self, port: int, window: int = 65_535) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        super().__init__(window)
        #: Every event read so far.
        self.events: list[h2.events.Event] = []
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def receive(self) -> list[h2.events.Event] | None:
        """One read, parsed (also kept in :attr:`events`); ``None`` once the server closed."""
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            return None
        if not data:
            return None
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []  # frames after the server's GOAWAY: only the close matters now
        self.events += events
        return events

    def read_until_closed(self, timeout: float) -> None:
        """Read until the server closes the connection (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                if self.receive() is None:
                    return
            except TimeoutError:
                continue
        raise AssertionError("the server never closed the connection")

    def await_response_head(self, stream_id: int) -> bool:
        """Read until ``stream_id``'s response head arrives; ``False`` if the server closed."""
        self.sock.settimeout(10)
        while True:
            events = self.receive()
            if events is None:
                return False
            for event in events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    return False
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    return True

    def close(self) -> None:
        self.sock.close()


def _upload(node: RealNode, key: str, mib: int) -> str:
    """POST a ``mib`` MiB artifact (a random MiB repeated); return its SHA-256."""
    block = os.urandom(MiB)
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for _ in range(mib):
            digest.update(block)
            yield block

    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        conn.request(
            "POST", CAS.format(key), body=body(), headers={"Content-Length": str(mib * MiB)}
        )
        response = conn.getresponse()
        response.read()
        assert response.status == 204
    finally:
        conn.close()
    return digest.hexdigest()


def _download_digest(node: RealNode, key: str) -> str:
    """GET the artifact over HTTP/1.1 on a fresh connection; return its SHA-256."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        conn.request("GET", CAS.format(key))
        response = conn.getresponse()
        assert response.status == 200
        digest = hashlib.sha256()
        while chunk := response.read(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        conn.close()


def _io(node: RealNode) -> int:
    """Bytes the node moved through read/write system calls (files and sockets)."""
    counters = process(node).io_counters()
    return int(counters.read_chars + counters.write_chars)


def _wait_for_quiet(node: RealNode, timeout: float = 20.0) -> None:
    """Poll until the node's I/O counters stop moving for half a second (bounded)."""
    deadline = time.monotonic() + timeout
    last, still = _io(node), 0
    while still < 5:
        assert time.monotonic() < deadline, "the node never stopped moving bytes"
        time.sleep(0.1)
        now = _io(node)
        still = still + 1 if now == last else 0
        last = now


def _settled_cpu(node: RealNode, timeout: float = 20.0) -> float:
    """The node's CPU seconds once they stop growing (two 0.3 s polls alike)."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(node)
    while True:
        time.sleep(0.3)
        now = cpu_seconds(node)
        if now - last < 0.02:
            return now
        assert time.monotonic() < deadline, "the node never went idle"
        last = now


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RealNode]:
    """A real node (default settings, accelerator on)."""
    node = RealNode(str(tmp_path / "data")).start()
    try:
        yield node
    finally:
        node.kill()


def test_a_huge_window_that_is_never_read_keeps_memory_flat(node: RealNode) -> None:
    """10 streams of a 120 MB artifact on a 2**31-1 window, never read: RSS stays flat."""
    digest = _upload(node, "big", ARTIFACT_MIB)
    warm_up(node)
    verified(node, CAS.format("big"))  # hashed once, before the measurement
    _wait_for_quiet(node)
    rss_before = process(node).memory_info().rss
    io_before = _io(node)
    client = H2Client(node.port, window=HUGE_WINDOW)
    try:
        for _ in range(10):
            client.get(CAS.format("big"))
        client.flush()
        # Every stream fills its buffer, the socket blocks, and then nothing
        # moves: stock Twisted kept reading the file into memory instead.
        wait_for(lambda: _io(node) - io_before > 1 * MiB, what="the responses started")
        _wait_for_quiet(node)
        moved = _io(node) - io_before
        rss_growth = process(node).memory_info().rss - rss_before
        # Served meanwhile, over HTTP/1.1, with the attack still connected.
        assert_alive(node)
        assert _download_digest(node, "big") == digest
    finally:
        client.close()
    print(
        f"h2 huge window x10, never read: node RSS +{rss_growth / MiB:.1f} MiB, "
        f"I/O {moved / MiB:.1f} MiB"
    )
    assert rss_growth < 64 * MiB
    # Ten buffers (384 KiB each) and the socket's: not 10 x 120 MB.
    assert moved < 40 * MiB


@pytest.mark.parametrize("pace", ["same_write", "after_response_head"])
def test_rapid_reset_is_cut_off_at_small_cost(node: RealNode, pace: str) -> None:
    """300 open-and-reset streams of a 120 MB artifact: GOAWAY, close, little CPU, node fine.

    ``same_write`` sends each HEADERS and RST_STREAM together (the reset
    arrives in the read that opens the stream); ``after_response_head``
    waits for the response to start before resetting, so each request is
    processed and its body producer started.
    """
    _upload(node, "big", ARTIFACT_MIB)
    warm_up(node)
    cpu_before = _settled_cpu(node)
    client = H2Client(node.port, window=HUGE_WINDOW)
    sent = 0
    try:
        for _ in range(300):
            stream_id = client.get(CAS.format("big"))
            if pace == "after_response_head":
                client.flush()
                if not client.await_response_head(stream_id):
                    break  # the server closed the connection
            client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            try:
                client.flush()
            except OSError:
                break  # the server closed the connection
            sent += 1
        client.read_until_closed(timeout=10)
    finally:
        client.close()
    cpu_used = _settled_cpu(node) - cpu_before
    closing = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
    print(f"rapid reset ({pace}): {sent} resets sent, node CPU {cpu_used:.2f} s")
    assert closing, "no GOAWAY before the close"
    assert closing[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(node, "kura_http2_connections_closed_total", reason="rapid_reset") == 1
    if pace == "same_write":
        # Stock Twisted spent 2.6 s on this, and went on reading the files.
        assert cpu_used < 1.0
    else:
        # Every request is processed until the budget runs out (100 at
        # once, 50/s): 0.5-0.8 s measured; stock Twisted served all 300.
        assert sent < 250
        assert cpu_used < 1.5
    assert_alive(node)


def test_a_client_withholding_its_window_costs_no_cpu(node: RealNode) -> None:
    """A client that reads its first 64 KiB and never sends WINDOW_UPDATE leaves the node idle."""
    _upload(node, "big", 16)
    warm_up(node)
    client = H2Client(node.port)
    received = 0
    try:
        client.get(CAS.format("big"))
        client.flush()
        client.sock.settimeout(5)
        while received < 65_535:
            events = client.receive()
            assert events is not None, "the server closed the connection"
            received += sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived))
        cpu_before = cpu_seconds(node)
        started = time.monotonic()
        # Observed, not synchronised: the CPU the node burns while nothing can move.
        while time.monotonic() - started < 2.0:
            time.sleep(0.1)
        cpu_used = cpu_seconds(node) - cpu_before
        assert_alive(node)
    finally:
        client.close()
    print(f"window withheld for 2 s: node CPU {cpu_used:.2f} s")
    # Stock Twisted's send loop spun a core at 100 % (2 s of CPU here).
    assert cpu_used < 0.3

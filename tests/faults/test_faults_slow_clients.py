"""Slow and stalled clients: trickled heads, stalled bodies, downloaders that never read.

Slowloris (a whole-head deadline, not an idle timer every byte resets), a
body that stops arriving, and a reader with a tiny window that never reads
(on the accelerated and the twisted.web path), with
short ``KURA_*`` timeouts against real ``twistd kura`` processes.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.faults.support import (
    CAS,
    GRADLE,
    MiB,
    call,
    control_round_trip,
    cpu_seconds,
    held_fds,
    metric,
    staged_files,
    wait_for,
    warm_up,
)
from tests.support.real import RawClient, RealNode

pytestmark = pytest.mark.faults

HEADER_TIMEOUT = 1.5
SEND_TIMEOUT = 1.5
BODY_STALL = 1.5
#: An unfinished head: each trickled byte extends one header value forever.
TRICKLED_HEAD = b"GET /api/cache/gradle/slow?tenant_id=default HTTP/1.1\r\nHost: k\r\nX-Pad: "


@pytest.fixture(params=["accelerated", "twisted.web"])
def serving(request: pytest.FixtureRequest) -> str:
    """Accelerator on (the same-port fast path reads the head) or off (twisted.web does)."""
    return str(request.param)


def _node(tmp_path: Path, serving: str, **environ: str) -> RealNode:
    enabled = "true" if serving == "accelerated" else "false"
    return RealNode(
        str(tmp_path / "data"), KURA_ACCELERATED_FILE_SERVING_ENABLED=enabled, **environ
    ).start()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    return sock


def _trickle(socks: list[socket.socket], interval: float, limit: float) -> dict[int, float]:
    """Send the head a byte at a time on every socket; return when each one was closed.

    Every ``interval`` seconds each open socket gets its next byte; a socket
    is closed when the server answers (408) or hangs up. Gives up at ``limit``.
    """
    started = time.monotonic()
    closed: dict[int, float] = {}
    sent = dict.fromkeys(range(len(socks)), 0)
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, index)
    payload = TRICKLED_HEAD + b"a" * 100_000
    next_round = started
    while len(closed) < len(socks) and time.monotonic() - started < limit:
        for key, _ in selector.select(timeout=max(0.0, next_round - time.monotonic())):
            index = key.data
            selector.unregister(key.fileobj)
            closed[index] = time.monotonic() - started
        if time.monotonic() >= next_round:
            for index, sock in enumerate(socks):
                if index in closed:
                    continue
                try:
                    sock.send(payload[sent[index] : sent[index] + 1])
                    sent[index] += 1
                except OSError:
                    selector.unregister(sock)
                    closed[index] = time.monotonic() - started
            next_round += interval
    selector.close()
    return closed


def test_trickled_head_is_cut_at_the_whole_head_deadline(tmp_path: Path, serving: str) -> None:
    """A head trickled a byte every 100 ms is answered 408 and closed at the 1.5 s deadline."""
    node = _node(tmp_path, serving, KURA_HEADER_TIMEOUT_MS=str(int(HEADER_TIMEOUT * 1000)))
    try:
        sock = _connect(node.port)
        closed = _trickle([sock], interval=0.1, limit=10)
        sock.setblocking(True)
        sock.settimeout(2)
        answer = sock.recv(65536)
        sock.close()
        assert 0 in closed, "the trickling connection was never closed"
        # Every byte resets an idle timer; only a deadline on the whole head ends it.
        assert HEADER_TIMEOUT - 0.2 <= closed[0] <= HEADER_TIMEOUT + 1.5, closed[0]
        assert answer.startswith(b"HTTP/1.1 408 ")
        control_round_trip(node)
    finally:
        node.kill()


def test_two_hundred_slowloris_connections_cost_little_and_block_nobody(
    tmp_path: Path, serving: str
) -> None:
    """200 trickling heads at once: all cut at the deadline, little CPU, controls stay fast."""
    node = _node(tmp_path, serving, KURA_HEADER_TIMEOUT_MS=str(int(HEADER_TIMEOUT * 1000)))
    try:
        control_round_trip(node)
        warm_up(node)
        fds_before = held_fds(node)
        cpu_before = cpu_seconds(node)
        latencies: list[float] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def controls() -> None:
            try:
                while not done.is_set():
                    latencies.append(control_round_trip(node))
                    done.wait(0.1)
            except BaseException as error:
                errors.append(error)

        prober = threading.Thread(target=controls)
        socks = [_connect(node.port) for _ in range(200)]
        prober.start()
        try:
            closed = _trickle(socks, interval=0.1, limit=15)
        finally:
            done.set()
            prober.join(30)
            for sock in socks:
                sock.close()
        cpu_used = cpu_seconds(node) - cpu_before
        assert len(closed) == 200
        assert max(closed.values()) <= HEADER_TIMEOUT + 2.0, max(closed.values())
        print(
            f"slowloris x200 ({serving}): server CPU {cpu_used:.2f}s, "
            f"control max {max(latencies) * 1000:.0f} ms over {len(latencies)}"
        )
        assert not errors, errors
        assert cpu_used < 1.0
        assert latencies and max(latencies) < 0.5
        wait_for(lambda: held_fds(node) <= fds_before, what="descriptors back to baseline")
    finally:
        node.kill()


def _stalled_upload(node: RealNode, sent: int) -> RawClient:
    client = RawClient(node.port)
    client.send(
        f"PUT {GRADLE.format('stalled')} HTTP/1.1\r\nHost: k\r\n".encode()
        + f"Content-Length: {4 * MiB}\r\n\r\n".encode()
        + os.urandom(sent),
        heads=[False],
    )
    return client


def _assert_stalled_upload_cut(node: RealNode, limit: float) -> None:
    client = _stalled_upload(node, 256 * 1024)
    started = time.monotonic()
    wait_for(lambda: staged_files(node.data_dir), what="the body is being staged")
    assert client.server_closed(timeout=limit + 5)
    elapsed = time.monotonic() - started
    client.close()
    assert limit - 0.3 <= elapsed <= limit + 2.0, elapsed
    wait_for(lambda: not staged_files(node.data_dir), what="staging file removed")
    assert metric(node, "kura_tmp_dir_bytes") == 0
    assert call(node, "GET", GRADLE.format("stalled"))[0] == 404
    control_round_trip(node)


def test_stalled_body_is_closed_by_the_body_timeout(tmp_path: Path) -> None:
    """KURA_BODY_TIMEOUT_MS, not the (long) idle timeout, bounds the gap between body reads."""
    node = _node(
        tmp_path,
        "accelerated",
        KURA_BODY_TIMEOUT_MS=str(int(BODY_STALL * 1000)),
        KURA_KEEPALIVE_IDLE_TIMEOUT_MS="60000",
    )
    try:
        _assert_stalled_upload_cut(node, BODY_STALL)
    finally:
        node.kill()


def test_stalled_small_bodies_held_in_memory_are_cut_and_release_their_budget(
    tmp_path: Path,
) -> None:
    """Uploads small enough to be received in memory (KURA_MEMORY_BODY_MAX_BYTES) that stall:
    each reserves its declared length from the staging budget, the body timeout closes
    every one, others are served meanwhile, and nothing is left staged or published."""
    node = _node(tmp_path, "accelerated", KURA_BODY_TIMEOUT_MS=str(int(BODY_STALL * 1000)))
    declared, count = 60_000, 20
    try:
        clients = []
        for index in range(count):
            client = RawClient(node.port)
            client.send(
                f"PUT {GRADLE.format(f'small-{index}')} HTTP/1.1\r\nHost: k\r\n".encode()
                + f"Content-Length: {declared}\r\n\r\n".encode()
                + os.urandom(1000),
                heads=[False],
            )
            clients.append(client)
        started = time.monotonic()
        wait_for(
            lambda: metric(node, "kura_tmp_dir_bytes") == count * declared,
            what="every stalled body holds its declared length",
        )
        assert not staged_files(node.data_dir)
        control_round_trip(node)
        for client in clients:
            assert client.server_closed(timeout=BODY_STALL + 5)
            client.close()
        assert time.monotonic() - started <= BODY_STALL + 3.0
        wait_for(lambda: metric(node, "kura_tmp_dir_bytes") == 0, what="the budget released")
        assert not staged_files(node.data_dir)
        assert all(
            call(node, "GET", GRADLE.format(f"small-{index}"))[0] == 404 for index in range(count)
        )
    finally:
        node.kill()


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_reader_that_never_reads_is_cut_off_and_releases_everything(
    tmp_path: Path, version: str
) -> None:
    """A GET whose client never reads is aborted after the send timeout; fd and permit return."""
    node = _node(tmp_path, "accelerated", KURA_SEND_TIMEOUT_MS=str(int(SEND_TIMEOUT * 1000)))
    try:
        body = os.urandom(32 * MiB)
        assert call(node, "POST", CAS.format("big"), body)[0] == 204
        control_round_trip(node)
        warm_up(node)
        fds_before = held_fds(node)
        # HTTP/1.1 is spliced by the accelerator; HTTP/1.0 is always twisted.web's.
        path = "splice" if version == "HTTP/1.1" else "fallback"
        served_before = metric(node, "kura_artifact_serving_paths_total", path=path)
        client = RawClient(node.port, receive_buffer=4096)
        client.send(f"GET {CAS.format('big')} {version}\r\nHost: k\r\n\r\n".encode())
        started = time.monotonic()
        if version == "HTTP/1.1":
            wait_for(
                lambda: metric(node, "kura_accelerator_permits_in_use") == 1,
                what="the accelerated transfer holds a permit",
            )
        wait_for(
            lambda: (
                metric(
                    node,
                    "kura_artifact_egress_completions_total",
                    producer="xcode",
                    result="write_timeout",
                )
                == 1
            ),
            timeout=SEND_TIMEOUT + 10,
            what="the stalled transfer is cut off",
        )
        elapsed = time.monotonic() - started
        assert SEND_TIMEOUT - 0.2 <= elapsed <= SEND_TIMEOUT + 4.0, elapsed
        assert metric(node, "kura_artifact_serving_paths_total", path=path) == served_before + 1
        assert metric(node, "kura_accelerator_permits_in_use") == 0
        wait_for(lambda: held_fds(node) <= fds_before, what="descriptors back to baseline")
        # The client finds its response cut short: never a complete-looking body.
        received = 0
        client.sock.settimeout(5)
        try:
            while chunk := client.sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        client.close()
        assert received < len(body)
        assert call(node, "GET", CAS.format("big"))[2] == body
    finally:
        node.kill()

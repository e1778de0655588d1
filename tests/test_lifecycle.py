"""Drain and graceful stop with real ``twistd kura`` processes and real signals."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support.real import RawClient, RealNode

pytestmark = pytest.mark.realnode

MiB = 1024 * 1024
CAS = "/api/cache/cas/{}?tenant_id=default"


def _put(node: RealNode, key: str, body: bytes) -> None:
    request = urllib.request.Request(node.url + CAS.format(key), data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 204


def _status(node: RealNode, target: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(node.url + target, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _start_download(node: RealNode, key: str, *, http10: bool = False) -> RawClient:
    client = RawClient(node.port, receive_buffer=16384)
    version = "HTTP/1.0" if http10 else "HTTP/1.1"
    client.send(f"GET {CAS.format(key)} {version}\r\nHost: k\r\n\r\n".encode(), heads=[False])
    client.wait_for(4096)  # the response is under way
    return client


def _finish(client: RawClient) -> bytes:
    client.sock.settimeout(30)
    [response] = client.read_responses(1)
    return response.body


def test_sigusr1_drains_while_transfers_in_flight_complete(tmp_path: Any) -> None:
    """SIGUSR1: ready turns 503, new work is refused, in-flight transfers finish byte-exact."""
    node = RealNode(f"{tmp_path}/data").start()
    try:
        big = os.urandom(8 * MiB)
        _put(node, "big", big)
        accelerated = _start_download(node, "big")
        fallback = _start_download(node, "big", http10=True)
        upload_body = os.urandom(8 * MiB)
        upload = RawClient(node.port)
        upload.send(
            f"POST {CAS.format('late')} HTTP/1.1\r\nHost: k\r\n"
            f"Content-Length: {len(upload_body)}\r\n\r\n".encode()
            + upload_body[: 4 * MiB],
            heads=[False],
        )
        idle = RawClient(node.port)
        idle.send(b"GET /up HTTP/1.1\r\nHost: k\r\n\r\n", heads=[False])
        assert idle.read_responses(1)[0].status == 200

        node.signal(signal.SIGUSR1)
        assert idle.server_closed(timeout=10), "an idle keep-alive connection stayed open"

        status, _, body = _status(node, "/ready")
        assert status == 503 and json.loads(body)["draining"] is True
        assert _status(node, "/up")[0] == 200
        assert _status(node, "/status/rollout")[0] == 200
        status, headers, body = _status(node, CAS.format("big"))
        assert status == 503
        assert json.loads(body) == {"message": "server is draining"}
        assert headers["Connection"] == "close"

        upload.sock.sendall(upload_body[4 * MiB :])
        [stored] = upload.read_responses(1)
        assert stored.status == 204
        assert _finish(accelerated) == big
        assert _finish(fallback) == big
        assert node.stop() == 0
    finally:
        node.kill()
    restarted = RealNode(node.data_dir).start()
    try:
        assert _status(restarted, CAS.format("late"))[2] == upload_body
        assert _status(restarted, CAS.format("big"))[2] == big
    finally:
        assert restarted.stop() == 0


def test_sigterm_cuts_off_a_stuck_reader_at_the_deadline(tmp_path: Any) -> None:
    """SIGTERM waits for the drain deadline, cuts off a reader that never reads, exits 0."""
    node = RealNode(f"{tmp_path}/data", KURA_DRAIN_COMPLETION_TIMEOUT_MS="1500").start()
    try:
        big = os.urandom(32 * MiB)
        _put(node, "big", big)
        stuck = _start_download(node, "big")  # and never reads again
        started = time.monotonic()
        status = node.stop(timeout=20)
        elapsed = time.monotonic() - started
        assert status == 0
        assert 1.4 < elapsed < 10, elapsed
        stuck.close()
    finally:
        node.kill()
    restarted = RealNode(node.data_dir).start()
    try:
        assert _status(restarted, CAS.format("big"))[2] == big
    finally:
        assert restarted.stop() == 0


def test_sigterm_stops_as_soon_as_transfers_finish(tmp_path: Any) -> None:
    """With a long deadline, SIGTERM exits once the last transfer is done, not at the deadline."""
    node = RealNode(f"{tmp_path}/data", KURA_DRAIN_COMPLETION_TIMEOUT_MS="60000").start()
    try:
        body = os.urandom(8 * MiB)
        _put(node, "blob", body)
        download = _start_download(node, "blob")
        node.signal(signal.SIGTERM)
        assert _finish(download) == body
        started = time.monotonic()
        assert node.process.wait(timeout=20) == 0
        assert time.monotonic() - started < 10
    finally:
        node.kill()


def test_a_node_that_cannot_start_exits_nonzero(tmp_path: Any) -> None:
    """A start-up failure (the public port is taken) ends the process with status 1."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = RealNode(f"{tmp_path}/data", KURA_PORT=str(taken.getsockname()[1]))
        node.port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 1"):
            node.start(timeout=20)

"""The twisted.web path on real sockets: a ``twistd kura`` node with the accelerator off.

Responses there go straight into the socket when nothing is queued (and the
head with the first body bytes); these tests check what a real client sees
when that is not the easy case: pipelining, a reader that lets the socket
buffers fill, a client that resets mid-body, HEAD, and a large body that is
still streamed by the storage-thread producer while the reactor serves others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.support import CAS, MiB, assert_alive, call, metric_sum, wait_for
from tests.support.real import RawClient, RealNode

SMALL = os.urandom(4096)
MEDIUM = os.urandom(200 * 1024)  # above SMALL_BODY_BYTES: the chunked producer
LARGE = os.urandom(16 * MiB)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    data = Path(tmp_path_factory.mktemp("fallback")) / "data"
    started = RealNode(
        str(data), KURA_ACCELERATED_FILE_SERVING_ENABLED="false", KURA_ACCESS_LOG="false"
    ).start()
    try:
        for key, body in (("small", SMALL), ("medium", MEDIUM), ("large", LARGE)):
            assert call(started, "POST", CAS.format(key), body)[0] == 204
        yield started
    finally:
        started.stop()


def _request(method: str, key: str) -> bytes:
    return f"{method} {CAS.format(key)} HTTP/1.1\r\nHost: kura\r\n\r\n".encode()


def test_pipelined_requests_are_answered_in_order_and_whole(node: RealNode) -> None:
    """Sixty requests in one write (hits, HEADs, misses, a large body among them):
    sixty responses, in order, every body byte-identical."""
    plan = [("GET", "small"), ("HEAD", "small"), ("GET", "missing"), ("GET", "medium")] * 15
    plan[30] = ("GET", "large")
    client = RawClient(node.port, timeout=30)
    try:
        client.send(
            b"".join(_request(method, key) for method, key in plan),
            heads=[method == "HEAD" for method, _ in plan],
        )
        responses = client.read_responses(len(plan))
    finally:
        client.close()
    assert len(responses) == len(plan)
    expected = {"small": SMALL, "medium": MEDIUM, "large": LARGE}
    for (method, key), response in zip(plan, responses, strict=True):
        if key == "missing":
            assert response.status == 404 and response.json()["message"]
            continue
        assert response.status == 200
        assert int(response.headers["content-length"]) == len(expected[key])
        assert response.body == (b"" if method == "HEAD" else expected[key])


def test_a_reader_that_lets_the_buffers_fill_still_gets_every_byte(node: RealNode) -> None:
    """A client with a tiny window pipelines many small GETs and reads nothing for a
    while: the server's writes back up (short sends, queued rest) and then drain
    in order once the client reads."""
    count = 400  # ~1.6 MiB of answers: far more than a 4 KiB window and the buffers
    client = RawClient(node.port, timeout=30, receive_buffer=4096)
    try:
        client.send(_request("GET", "small") * count, heads=[False] * count)
        time.sleep(0.5)  # not synchronisation: lets the server run into a full socket
        responses = client.read_responses(count)
    finally:
        client.close()
    assert [r.status for r in responses] == [200] * count
    assert all(r.body == SMALL for r in responses)
    assert_alive(node)


def test_a_client_that_resets_mid_body_costs_nothing_else(node: RealNode) -> None:
    """A reset while a large body is on its way ends that transfer (counted as
    aborted); the node keeps serving, and the next client's answers are whole."""
    aborted = metric_sum(node, "kura_artifact_egress_completions_total", result="client_aborted")
    client = RawClient(node.port, timeout=30, receive_buffer=65536)
    client.send(_request("GET", "large"))
    client.wait_for(100_000)
    client.reset()
    wait_for(
        lambda: (
            metric_sum(node, "kura_artifact_egress_completions_total", result="client_aborted")
            > aborted
        ),
        what="the cut transfer to be counted",
    )
    status, _, body = call(node, "GET", CAS.format("large"))
    assert status == 200 and body == LARGE
    assert call(node, "GET", CAS.format("small"))[2] == SMALL


def test_a_head_carries_the_gets_headers_and_no_body(node: RealNode) -> None:
    """HEAD answers the GET's status and headers, no body, and the connection
    goes on with the next request."""
    client = RawClient(node.port)
    try:
        client.send(_request("HEAD", "medium") + _request("GET", "small"), heads=[True, False])
        head, get = client.read_responses(2)
    finally:
        client.close()
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-length"] == str(len(MEDIUM))
    assert head.headers["etag"] and head.headers["accept-ranges"] == "bytes"
    assert (get.status, get.body) == (200, SMALL)


def test_a_large_body_in_flight_leaves_the_reactor_free(node: RealNode) -> None:
    """While a large body waits on a client that does not read, other clients'
    small GETs are answered at once: the large one is a producer paused on a
    full buffer, not a loop on the reactor thread."""
    stalled = RawClient(node.port, timeout=30, receive_buffer=4096)
    try:
        stalled.send(_request("GET", "large"))
        stalled.wait_for(1)
        started = time.monotonic()
        for _ in range(20):
            assert call(node, "GET", CAS.format("small"), timeout=5)[2] == SMALL
        assert time.monotonic() - started < 5
        received = stalled.read_responses(1)
    finally:
        stalled.close()
    assert received[0].status == 200 and received[0].body == LARGE

"""The accelerator's one-step path over real sockets (``SamePortProtocol._serve_now``).

A plain GET of a small artifact whose file is open in the handle cache and
verified, or whose body is kept in the database and held in memory, is
answered within ``dataReceived``, without the bookkeeping of a
request that may wait. These tests run a real node on loopback with the
kernel engine and a blocking raw-socket client on a worker thread; a spy on
the engine's ``send`` tells which requests took the one-step path.

Files verified less than ``RACY_SECONDS`` after their last change are not
remembered as verified (:mod:`kura.storage.verify`), so a file uploaded by
the test would never be served in one step; the tests set it to zero, since
timestamp granularity is not what they are about.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted

from kura.service import KuraNode
from kura.storage import verify
from kura.testing import Response, sample
from tests.support.real import RawClient, call, in_thread, until

T = TypeVar("T")
CAS = "/api/cache/cas/{}?tenant_id=default"
CCACHE = "/ccache/" + "89178b0daf" + "0" * 30
ROUTE = "/api/cache/cas/{id}"
#: Small bodies in files, as a store written before metadata schema 4 keeps
#: them (from schema 4 on, bodies received in memory are kept in the database).
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


def metric(node: KuraNode, name: str, **labels: str) -> float:
    return sample(node, name, **labels)


def egress(node: KuraNode, result: str) -> float:
    return metric(node, "kura_artifact_egress_completions_total", producer="xcode", result=result)


@pytest.fixture(autouse=True)
def never_racy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "RACY_SECONDS", 0.0)


def spy_on_send(node: KuraNode) -> list[bool]:
    """Record, for each call of the engine's ``send``, whether it ended at once."""
    engine: Any = node.accelerator.engine
    real = engine.send
    calls: list[bool] = []

    def send(*args: Any) -> Any:
        transfer = real(*args)
        calls.append(transfer is None)
        return transfer

    engine.send = send
    return calls


def assert_nothing_held(node: KuraNode) -> None:
    accelerator = node.accelerator
    assert accelerator.permits.in_use == 0
    assert accelerator.handles.lent == 0
    assert node.traffic.inflight == 0


@pytest_twisted.ensureDeferred
async def test_keep_alive_alternates_the_one_step_and_threaded_paths(start_node: Any) -> None:
    """One connection serves a small artifact in one step, a large one from a
    worker thread and the small one again in one step, every body byte-exact,
    and counts each request exactly as the general path would."""
    node = await start_node(**FILES)
    calls = spy_on_send(node)
    small, large = os.urandom(4096), os.urandom(3 * 1024 * 1024)

    def scenario() -> tuple[list[Response], bool]:
        assert call(node.public_port, "POST", CAS.format("small"), small).status == 204
        assert call(node.public_port, "POST", CAS.format("large"), large).status == 204
        client = RawClient(node.public_port)
        responses = []
        for key in ("small", "small", "large", "small"):
            client.get(CAS.format(key))
            responses += client.read_responses(1)
        still_open = not client.server_closed(timeout=0.2)
        client.close()
        return responses, still_open

    responses, still_open = await in_thread(scenario)
    assert [r.body for r in responses] == [small, small, large, small]
    assert all(r.status == 200 for r in responses)
    assert all(r.headers["connection"] == "keep-alive" for r in responses)
    assert still_open
    # The first GET opened the file (general path); the large one is too big.
    assert calls == [True, True]
    ids = {r.headers["x-request-id"] for r in responses}
    assert len(ids) == 4
    # The same metrics, with the same values, whichever path served.
    assert metric(node, "kura_http_requests_total", route=ROUTE, status="200") == 4
    assert metric(node, "kura_artifact_serving_paths_total", path="splice") == 4
    assert egress(node, "ok") == 4
    sent = 3 * len(small) + len(large)
    assert metric(node, "kura_artifact_egress_bytes_total", producer="xcode", result="ok") == sent
    assert metric(node, "kura_artifact_reads_total", producer="xcode", result="ok") == 4
    # (The two uploads count as public requests too.)
    assert metric(node, "kura_http_request_duration_seconds_count") == 6
    latency = metric(
        node, "kura_public_request_latency_seconds_count", transport="http", route=ROUTE
    )
    assert latency == 6
    assert node.traffic.latency_ewma_ms is not None
    assert_nothing_held(node)


@pytest_twisted.ensureDeferred
async def test_a_body_replaced_between_two_requests_is_never_served_stale(
    start_node: Any,
) -> None:
    """A ccache entry rewritten (same size, other bytes) between two one-step
    GETs on one connection is served as the new version, whole."""
    node = await start_node(**FILES)
    calls = spy_on_send(node)
    first, second = os.urandom(4096), os.urandom(4096)

    def scenario() -> list[Response]:
        assert call(node.public_port, "PUT", CCACHE, first).status in (200, 201, 204)
        client = RawClient(node.public_port)
        responses = []
        for _ in range(2):
            client.get(CCACHE)
            responses += client.read_responses(1)
        assert call(node.public_port, "PUT", CCACHE, second).status in (200, 201, 204)
        for _ in range(2):
            client.get(CCACHE)
            responses += client.read_responses(1)
        client.close()
        return responses

    responses = await in_thread(scenario)
    assert [r.status for r in responses] == [200] * 4
    assert [r.body for r in responses] == [first, first, second, second]
    # Each version: opened by the general path, then served in one step.
    assert calls == [True, True]
    assert_nothing_held(node)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_gets_every_response_once_it_reads(
    start_node: Any,
) -> None:
    """Hundreds of pipelined one-step GETs to a client that reads nothing fill
    the socket; the responses that did not fit go on in the background
    holding their file, and all arrive whole and in order once it reads."""
    node = await start_node(**FILES)
    calls = spy_on_send(node)
    body = os.urandom(60 * 1024)
    count = 200

    def scenario() -> list[Response]:
        assert call(node.public_port, "POST", CAS.format("pushed"), body).status == 204
        warm = RawClient(node.public_port)
        warm.get(CAS.format("pushed"))  # opens the file: the GETs below are one-step
        assert warm.read_responses(1)[0].body == body
        warm.close()
        # A worker holds the file for the responses that did not fit.
        client = _burst_unread(node, "pushed", count, lambda: node.accelerator.handles.lent == 1)
        responses = client.read_responses(count)
        client.close()
        return responses

    responses = await in_thread(scenario)
    assert len(responses) == count
    assert all(r.status == 200 and r.body == body for r in responses)
    assert False in calls  # the socket pushed back at least once
    await until(lambda: node.accelerator.permits.in_use == 0)
    assert egress(node, "ok") == count + 1
    assert_nothing_held(node)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_and_resets_frees_everything(
    start_node: Any,
) -> None:
    """A client that stops reading mid-burst and resets leaves no permit, lease
    or in-flight slot behind, and no response counted as a server error."""
    node = await start_node(**FILES)
    body = os.urandom(60 * 1024)

    def scenario() -> None:
        assert call(node.public_port, "POST", CAS.format("dropped"), body).status == 204
        warm = RawClient(node.public_port)
        warm.get(CAS.format("dropped"))
        warm.read_responses(1)
        warm.close()
        client = _burst_unread(node, "dropped", 200, lambda: node.accelerator.handles.lent == 1)
        client.reset()

    await in_thread(scenario)
    await until(lambda: not node.accelerator.connections)
    assert_nothing_held(node)
    # The reset may find a response under way (client_aborted, 499) or none
    # (between two): either way every response is counted once, none as an error.
    aborted = egress(node, "client_aborted")
    assert aborted <= 1
    assert metric(node, "kura_http_requests_total", route=ROUTE, status="499") == aborted
    assert egress(node, "error") == 0
    assert egress(node, "ok") == metric(node, "kura_http_requests_total", route=ROUTE, status="200")


def _burst_unread(
    node: KuraNode, key: str, count: int, pushed_back: Callable[[], bool]
) -> RawClient:
    """Pipeline ``count`` plain GETs of ``key`` from a client with a small
    receive buffer that reads nothing, until ``pushed_back`` holds (on a
    worker thread): the server's socket is full and a response goes on in
    the background."""
    client = RawClient(node.public_port, receive_buffer=8192, timeout=30)
    burst = f"GET {CAS.format(key)} HTTP/1.1\r\nHost: k\r\n\r\n".encode() * count
    client.send(burst, heads=[False] * count)
    _until_blocking(pushed_back)
    return client


def _until_blocking(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, on a worker thread, until ``condition`` (read across threads) holds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# -- bodies kept in the metadata database --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_body_kept_in_the_database_is_sent_with_its_head_from_memory(
    start_node: Any,
) -> None:
    """A small body stored in the database goes out in the head's send, no
    file opened; after a restart (nothing held in memory) twisted.web reads
    it back once and the next GET is one step again."""
    node = await start_node()
    calls = spy_on_send(node)
    body = os.urandom(4096)

    def scenario() -> list[Response]:
        assert call(node.public_port, "POST", CAS.format("kept"), body).status == 204
        client = RawClient(node.public_port)
        responses = []
        for _ in range(3):
            client.get(CAS.format("kept"))
            responses += client.read_responses(1)
        client.close()
        return responses

    responses = await in_thread(scenario)
    assert [(r.status, r.body) for r in responses] == [(200, body)] * 3
    assert calls == [True, True, True]
    assert metric(node, "kura_artifact_serving_paths_total", path="memory") == 3
    assert len(node.accelerator.handles) == 0  # no file was opened
    assert egress(node, "ok") == 3
    assert_nothing_held(node)

    node.store.bodies.clear()  # as after a restart
    # (A connection handed to twisted.web stays there: one connection each.)
    again = await in_thread(lambda: [_get(node, CAS.format("kept")) for _ in range(2)])
    assert [(r.status, r.body) for r in again] == [(200, body)] * 2
    assert metric(node, "kura_accelerator_fallbacks_total", reason="inline") == 1
    assert metric(node, "kura_artifact_serving_paths_total", path="fallback") == 1
    assert metric(node, "kura_artifact_serving_paths_total", path="memory") == 4


@pytest_twisted.ensureDeferred
async def test_memory_bodies_to_a_client_that_stops_reading_all_arrive_once_it_reads(
    start_node: Any,
) -> None:
    """Pipelined GETs of a body kept in the database, to a client that reads
    nothing: the response that did not fit goes on in the background (no file
    to hold) and every response arrives whole and in order."""
    node = await start_node()
    body = os.urandom(60 * 1024)
    count = 200

    def scenario() -> list[Response]:
        assert call(node.public_port, "POST", CAS.format("kept"), body).status == 204
        client = _burst_unread(node, "kept", count, lambda: node.accelerator.permits.in_use == 1)
        responses = client.read_responses(count)
        client.close()
        return responses

    responses = await in_thread(scenario)
    assert len(responses) == count
    assert all(r.status == 200 and r.body == body for r in responses)
    await until(lambda: node.accelerator.permits.in_use == 0)
    assert metric(node, "kura_artifact_serving_paths_total", path="memory") == count
    assert egress(node, "ok") == count
    assert_nothing_held(node)


def _get(node: KuraNode, target: str) -> Response:
    """A plain GET on a fresh connection (blocking)."""
    client = RawClient(node.public_port)
    client.get(target)
    [response] = client.read_responses(1)
    client.close()
    return response

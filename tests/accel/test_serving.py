"""The accelerator over real sockets: keep-alive, pipelining, fallback, failures.

Each test runs an in-process node on the real reactor and talks to it with a
blocking raw-socket client on a worker thread (``deferToThread``), so the
bytes on the wire are exactly what the test wrote.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import pytest
import pytest_twisted

from kura.api.routes import xcode_cas
from kura.service import KuraNode
from kura.testing import Response, sample
from kura.web.routing import Query
from tests.support.real import RawClient, call, in_thread, until

T = TypeVar("T")
MiB = 1024 * 1024
CAS = "/api/cache/cas/{}?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


def upload(node: KuraNode, key: str, body: bytes) -> Response:
    return call(node.public_port, "POST", CAS.format(key), body)


def metric(node: KuraNode, name: str, **labels: str) -> float:
    return sample(node, name, **labels)


def egress(node: KuraNode, result: str) -> float:
    return metric(node, "kura_artifact_egress_completions_total", producer="xcode", result=result)


def blob_path(node: KuraNode, key: str) -> str:

    address = xcode_cas({"id": key}, Query({"tenant_id": ["default"]}), "default")
    manifest = node.store.cached_manifest(node.store.artifact_id(address))
    assert manifest is not None and manifest.blob_path is not None
    return node.store.layout.absolute(manifest.blob_path)


@pytest.fixture(params=["splice", "sendfile"])
def mode(request: Any) -> str:
    return str(request.param)


@pytest.mark.parametrize("inline_bytes", ["1048576", "0"])
@pytest_twisted.ensureDeferred
async def test_keep_alive_serves_three_gets_on_one_connection(
    start_node: Any, mode: str, inline_bytes: str
) -> None:
    """Three sequential GETs reuse one connection and every body is byte-exact,
    whether bodies leave inline or (inline budget 0) all from worker threads."""
    node = await start_node(
        KURA_ACCELERATED_FILE_SERVING_MODE=mode,
        KURA_ACCELERATED_FILE_SERVING_INLINE_BYTES=inline_bytes,
        **FILES,
    )
    small, large = os.urandom(4096), os.urandom(3 * MiB)

    def scenario() -> list[Response]:
        upload(node, "small", small)
        upload(node, "large", large)
        client = RawClient(node.public_port)
        responses = []
        for key in ("small", "large", "small"):
            client.get(CAS.format(key))
            responses += client.read_responses(1)
        assert not client.server_closed(timeout=0.2)
        client.close()
        return responses

    responses = await in_thread(scenario)
    assert [r.body for r in responses] == [small, large, small]
    assert all(r.headers["connection"] == "keep-alive" for r in responses)
    assert metric(node, "kura_artifact_serving_paths_total", path=mode) == 3


@pytest_twisted.ensureDeferred
async def test_pipelined_accelerated_fallback_accelerated_in_order(start_node: Any) -> None:
    """A pipelined accelerated/fallback/accelerated burst is answered in request order."""
    node = await start_node()
    body = os.urandom(10_000)

    def scenario() -> list[Response]:
        upload(node, "a", body)
        client = RawClient(node.public_port)
        burst = (
            f"GET {CAS.format('a')} HTTP/1.1\r\nHost: k\r\n\r\n"
            f"GET {CAS.format('missing')} HTTP/1.1\r\nHost: k\r\n\r\n"
            f"GET {CAS.format('a')} HTTP/1.1\r\nHost: k\r\n\r\n"
        )
        client.send(burst.encode(), heads=[False, False, False])
        responses = client.read_responses(3)
        client.close()
        return responses

    responses = await in_thread(scenario)
    assert [r.status for r in responses] == [200, 404, 200]
    assert responses[0].body == body and responses[2].body == body
    assert responses[1].json() == {"message": "Artifact not found"}


@pytest_twisted.ensureDeferred
async def test_saturated_accelerator_falls_back_instead_of_503(start_node: Any) -> None:
    """With every permit held, a download is served by twisted.web, never refused."""
    node = await start_node(KURA_ACCELERATED_FILE_SERVING_MAX_CONCURRENT="1")
    body = os.urandom(32 * MiB)

    def scenario() -> tuple[Response, int]:
        upload(node, "big", body)
        hog = RawClient(node.public_port, receive_buffer=4096)
        hog.get(CAS.format("big"))
        hog.read_raw(1024)  # the transfer has started and now holds the permit
        other = RawClient(node.public_port)
        other.get(CAS.format("big"))
        [response] = other.read_responses(1)
        other.close()
        tokens = node.accelerator.permits.available
        hog.reset()
        return response, tokens

    response, tokens_during = await in_thread(scenario)
    assert response.status == 200 and response.body == body
    assert tokens_during == 0
    assert metric(node, "kura_accelerator_fallbacks_total", reason="saturated") == 1
    assert metric(node, "kura_artifact_serving_paths_total", path="fallback") == 1


@pytest_twisted.ensureDeferred
async def test_client_abort_mid_transfer_is_499_and_frees_the_permit(start_node: Any) -> None:
    """A client that resets mid-64-MiB frees its permit and counts as client_aborted."""
    node = await start_node()
    body = os.urandom(64 * MiB)

    def scenario() -> None:
        upload(node, "big", body)
        client = RawClient(node.public_port, receive_buffer=8192)
        client.get(CAS.format("big"))
        received = 0
        while received < MiB:
            received += len(client.read_raw(65536))
        client.reset()

    await in_thread(scenario)
    await until(lambda: node.accelerator.permits.in_use == 0)
    assert egress(node, "client_aborted") == 1
    assert metric(node, "kura_http_requests_total", route="/api/cache/cas/{id}", status="499") == 1
    assert metric(node, "kura_http_requests_total", route="/api/cache/cas/{id}", status="500") == 0
    assert node.traffic.inflight == 0


@pytest_twisted.ensureDeferred
async def test_unlinked_file_still_delivers_the_opened_version(start_node: Any) -> None:
    """Unlinking the blob mid-send still delivers every byte; the next GET is a 404."""
    node = await start_node()
    body = os.urandom(16 * MiB)

    def scenario() -> tuple[bytes, Response]:
        upload(node, "gone", body)
        client = RawClient(node.public_port, receive_buffer=8192)
        client.get(CAS.format("gone"))
        first = client.read_raw(4096)
        os.unlink(blob_path(node, "gone"))
        client._pending = first
        [response] = client.read_responses(1)
        client.get(CAS.format("gone"))
        [after] = client.read_responses(1)
        client.close()
        return response.body, after

    delivered, after = await in_thread(scenario)
    assert delivered == body
    assert after.status == 404


@pytest_twisted.ensureDeferred
async def test_truncated_file_closes_the_connection_as_incomplete(start_node: Any) -> None:
    """A file truncated mid-send ends the response short and closes the connection."""
    node = await start_node()
    body = os.urandom(16 * MiB)

    def scenario() -> tuple[int, bool]:
        upload(node, "short", body)
        client = RawClient(node.public_port, receive_buffer=8192)
        client.get(CAS.format("short"))
        client.read_raw(4096)
        os.truncate(blob_path(node, "short"), 4 * MiB)
        received = 0
        while True:
            chunk = client.read_raw(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        client.close()
        return received, True

    received, closed = await in_thread(scenario)
    assert closed and received < len(body)
    assert egress(node, "incomplete") == 1


@pytest_twisted.ensureDeferred
async def test_thousands_of_pipelined_gets_in_one_write_are_all_answered(start_node: Any) -> None:
    """2,000 small GETs arriving in one burst are answered in order (no recursion limit)."""
    node = await start_node()
    body = os.urandom(100)

    def scenario() -> list[Response]:
        upload(node, "tiny", body)
        client = RawClient(node.public_port, timeout=30)
        burst = f"GET {CAS.format('tiny')} HTTP/1.1\r\nHost: k\r\n\r\n".encode() * 2000
        client.send(burst, heads=[False] * 2000)
        responses = client.read_responses(2000)
        client.close()
        return responses

    responses = await in_thread(scenario)
    assert len(responses) == 2000
    assert all(r.status == 200 and r.body == body for r in responses)

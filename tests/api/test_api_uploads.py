"""Uploads that end early or are badly framed are counted and never published."""

from __future__ import annotations

import json
import re

import pytest

from kura.service import KuraNode
from kura.testing import Exchange, files_under, request, sample

METRO = "/api/metro/cache/{key}"
CAS = "/api/cache/cas/{id}?tenant_id=default"


def assert_no_leftovers(node: KuraNode) -> None:
    assert files_under(node.store.layout.uploads) == []
    assert files_under(node.store.layout.blobs) == []
    assert node.store.tmp_budget.used == 0


def server_errors(node: KuraNode) -> float:
    """How many requests were answered with a 5xx."""
    total = 0.0
    for family in node.metrics.registry.collect():
        for s in family.samples:
            if s.name == "kura_http_requests_total" and s.labels["status"].startswith("5"):
                total += s.value
    return total


@pytest.mark.parametrize(
    ("method", "target", "producer", "route"),
    [
        ("POST", CAS.format(id="c1"), "xcode", "/api/cache/cas/{id}"),
        ("PUT", METRO.format(key="m1"), "metro", "/api/metro/cache/{cache_key}"),
        ("PUT", "/v1/cache/n1", "nx", "/v1/cache/{hash}"),
        (
            "PUT",
            "/api/cache/gradle/g1?tenant_id=default",
            "gradle",
            "/api/cache/gradle/{cache_key}",
        ),
    ],
)
def test_truncated_upload_is_499_and_never_published(
    node: KuraNode, method: str, target: str, producer: str, route: str
) -> None:
    """Content-Length 100 with 7 bytes, then a disconnect: 499, a write error, nothing kept."""
    client = Exchange(node)
    client.send(
        f"{method} {target} HTTP/1.1\r\nHost: kura\r\nContent-Length: 100\r\n\r\n".encode()
        + b"1234567"
    )
    assert client.responses() == []
    client.disconnect()
    assert sample(node, "kura_http_requests_total", route=route, status="499") == 1
    assert sample(node, "kura_artifact_writes_total", producer=producer, result="error") == 1
    assert sample(node, "kura_artifact_writes_total", producer=producer, result="ok") == 0
    assert request(node, "GET", target).status == 404
    assert_no_leftovers(node)
    assert server_errors(node) == 0
    retry = request(node, method, target, b"x" * 100)
    assert retry.status in (200, 201, 204)
    assert request(node, "GET", target).body == b"x" * 100


def test_truncated_chunked_upload_is_never_published(node: KuraNode) -> None:
    """A chunked body cut mid-chunk by a disconnect is a 499 and a write error, and dropped."""
    client = Exchange(node)
    client.send(
        b"PUT /api/metro/cache/m1 HTTP/1.1\r\nHost: kura\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n20\r\nonly-part"
    )
    client.disconnect()
    assert sample(node, "kura_artifact_writes_total", producer="metro", result="error") == 1
    route = "/api/metro/cache/{cache_key}"
    assert sample(node, "kura_http_requests_total", route=route, status="499") == 1
    assert request(node, "GET", METRO.format(key="m1")).status == 404
    assert_no_leftovers(node)


def test_truncated_module_part_is_not_recorded(node: KuraNode) -> None:
    """A module part cut short leaves no part behind; complete then finds it missing."""
    start = request(node, "POST", "/api/cache/module/start?tenant_id=default&hash=h&name=n")
    upload_id = start.json()["upload_id"]
    client = Exchange(node)
    client.send(
        f"POST /api/cache/module/part?upload_id={upload_id}&part_number=1 HTTP/1.1\r\n"
        "Host: kura\r\nContent-Length: 50\r\n\r\npartial".encode()
    )
    client.disconnect()
    assert files_under(node.store.layout.parts) == []
    done = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts":[1]}',
        {"Content-Type": "application/json"},
    )
    assert done.status == 400
    assert node.store.tmp_budget.used == 0


def test_disconnect_while_head_is_incomplete_counts_nothing_as_a_write(node: KuraNode) -> None:
    """A client that leaves mid-head is not an artifact write."""
    client = Exchange(node)
    client.send(b"PUT /api/metro/cache/m1 HTTP/1.1\r\nHost: ku")
    client.disconnect()
    assert (
        sample(node, "kura_artifact_writes_total", producer="metro", result="client_aborted") == 0
    )
    assert_no_leftovers(node)


@pytest.mark.parametrize(
    "chunk_head",
    [b"Z", b"0x5", b"-5", b" 5", b"5;ext\nbad", b"+5"],
)
def test_malformed_chunking_is_400_and_never_published(node: KuraNode, chunk_head: bytes) -> None:
    """A bad chunk size is 400 and a closed connection; a write error, not a 499, no 5xx."""
    client = Exchange(node)
    client.send(
        b"PUT /api/metro/cache/m1 HTTP/1.1\r\nHost: kura\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n" + chunk_head + b"\r\nhello\r\n0\r\n\r\n"
    )
    written = client.transport.value()
    assert written.startswith(b"HTTP/1.1 400 ")
    head, _, body = written.partition(b"\r\n\r\n")
    assert json.loads(body) == {"message": "Malformed request"}
    assert b"\r\nContent-Type: application/json" in head
    assert re.search(rb"\r\nX-Request-Id: [0-9a-f]{22}\r\n", head + b"\r\n")
    assert client.closed
    client.disconnect()
    route = "/api/metro/cache/{cache_key}"
    assert sample(node, "kura_http_requests_total", route=route, status="400") == 1
    assert sample(node, "kura_http_requests_total", route=route, status="499") == 0
    assert sample(node, "kura_artifact_writes_total", producer="metro", result="error") == 1
    assert (
        sample(node, "kura_artifact_writes_total", producer="metro", result="client_aborted") == 0
    )
    assert server_errors(node) == 0
    assert request(node, "GET", METRO.format(key="m1")).status == 404
    assert_no_leftovers(node)
    assert request(node, "PUT", METRO.format(key="m1"), b"hellohello").status == 200


def test_surplus_bytes_after_the_declared_length_are_not_published(node: KuraNode) -> None:
    """Bytes beyond Content-Length are not part of the artifact; as a request they are a 400."""
    client = Exchange(node)
    client.send(
        b"PUT /api/metro/cache/m1 HTTP/1.1\r\nHost: kura\r\nContent-Length: 2\r\n\r\n"
        b"he" + b"llo\r\n\r\n"
    )
    first, second = client.responses()
    assert first.status == 200
    assert second.status == 400
    assert client.closed
    assert request(node, "GET", METRO.format(key="m1")).body == b"he"


def test_bad_content_length_is_400(node: KuraNode) -> None:
    """Unparsable or conflicting Content-Length headers are refused before any body."""
    for lengths in (["-1"], ["1e3"], ["5", "6"], ["5, 6"]):
        client = Exchange(node)
        lines = "".join(f"Content-Length: {value}\r\n" for value in lengths)
        client.send(f"PUT /api/metro/cache/m1 HTTP/1.1\r\nHost: kura\r\n{lines}\r\n".encode())
        assert client.transport.value().startswith(b"HTTP/1.1 400 "), lengths
        assert client.closed
    assert_no_leftovers(node)


def test_chunked_with_content_length_is_refused(node: KuraNode) -> None:
    """Both Transfer-Encoding and Content-Length is a smuggling shape: never stored."""
    client = Exchange(node)
    client.send(
        b"PUT /api/metro/cache/m1 HTTP/1.1\r\nHost: kura\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert client.transport.value().startswith(b"HTTP/1.1 400 ")
    assert request(node, "GET", METRO.format(key="m1")).status == 404

"""Range and If-Range on the twisted.web (fallback) download path, upstream's E2 rules."""

from __future__ import annotations

import pytest

from kura.service import KuraNode
from kura.testing import Response, request
from tests.conftest import anonymous_deletes

CAS = "/api/cache/cas/r1?tenant_id=default"
BODY = b"0123456789"


@pytest.fixture
def stored(node: KuraNode) -> KuraNode:
    """``node`` with the 10-byte artifact ``0123456789`` stored at t = 1700000000.5 s."""
    node.reactor.advance(1_700_000_000.5)
    assert request(node, "POST", CAS, BODY).status == 204
    return node


def get(node: KuraNode, **headers: str) -> Response:
    return request(node, "GET", CAS, headers={k.replace("_", "-"): v for k, v in headers.items()})


def etag_of(node: KuraNode) -> str:
    return get(node).headers["etag"]


def test_full_response_advertises_ranges_and_etag(stored: KuraNode) -> None:
    """A plain GET is 200 with ``Accept-Ranges: bytes`` and ETag ``"VERSIONMS-SIZE"``."""
    response = get(stored)
    assert response.status == 200
    assert response.headers["accept-ranges"] == "bytes"
    assert "content-range" not in response.headers
    assert response.headers["etag"] == '"1700000000500-10"'  # version_ms, then size


@pytest.mark.parametrize(
    ("header", "content_range", "body"),
    [
        ("bytes=0-0", "bytes 0-0/10", b"0"),
        ("bytes=-1", "bytes 9-9/10", b"9"),
        ("bytes=5-", "bytes 5-9/10", b"56789"),
        ("bytes=2-4", "bytes 2-4/10", b"234"),
        ("bytes=8-100", "bytes 8-9/10", b"89"),
        ("bytes=-100", "bytes 0-9/10", BODY),
        ("bytes=0-9", "bytes 0-9/10", BODY),
        ("BYTES = 1-1", "bytes 1-1/10", b"1"),
    ],
)
def test_single_range_is_206(
    stored: KuraNode, header: str, content_range: str, body: bytes
) -> None:
    """One satisfiable range is 206 with Content-Range, even when it covers everything."""
    response = get(stored, Range=header)
    assert response.status == 206
    assert response.headers["content-range"] == content_range
    assert response.headers["content-length"] == str(len(body))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.body == body


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=10-20", "bytes=99-", "bytes=-0"])
def test_range_past_the_end_is_416(stored: KuraNode, header: str) -> None:
    """A range starting past the end is 416 with ``Content-Range: bytes */10``."""
    response = get(stored, Range=header)
    assert response.status == 416
    assert response.headers["content-range"] == "bytes */10"
    assert (
        stored.metrics.registry.get_sample_value(
            "kura_artifact_reads_total", {"producer": "xcode", "result": "range_not_satisfiable"}
        )
        == 1
    )


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,3-4",  # multi-range
        "bytes=garbage",
        "bytes=5-2",  # last before first
        "items=0-1",  # another unit
        "bytes=1",
        "0-1",
        "bytes=-",
        "bytes=²-³",  # digits that are not ASCII digits
    ],
)
def test_multi_range_and_garbage_are_served_whole(stored: KuraNode, header: str) -> None:
    """Multi-range and malformed Range headers get the whole artifact with 200."""
    response = get(stored, Range=header)
    assert response.status == 200
    assert response.body == BODY
    assert "content-range" not in response.headers


def test_if_range_matching_the_etag_honours_the_range(stored: KuraNode) -> None:
    """If-Range equal to the current ETag (after trimming) lets the range through."""
    etag = etag_of(stored)
    response = get(stored, Range="bytes=5-", If_Range=f"  {etag} ")
    assert response.status == 206
    assert response.body == b"56789"


@pytest.mark.parametrize(
    "if_range", ['"1700000000499-10"', "W/whatever", "Wed, 21 Oct 2015 07:28:00 GMT"]
)
def test_if_range_mismatch_sends_the_whole_artifact(stored: KuraNode, if_range: str) -> None:
    """If-Range that is not the ETag gets the whole artifact with 200."""
    response = get(stored, Range="bytes=5-", If_Range=if_range)
    assert response.status == 200
    assert response.body == BODY


def test_if_range_mismatch_beats_an_unsatisfiable_range(stored: KuraNode) -> None:
    """With a stale If-Range even a range past the end is answered whole with 200."""
    response = get(stored, Range="bytes=50-", If_Range='"0-0"')
    assert response.status == 200
    assert response.body == BODY


def test_range_of_an_empty_artifact_is_416(node: KuraNode) -> None:
    """Every range of a zero-byte artifact is unsatisfiable."""
    request(node, "POST", CAS, b"")
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        response = get(node, Range=header)
        assert response.status == 416
        assert response.headers["content-range"] == "bytes */0"


@anonymous_deletes
def test_etag_changes_with_a_new_version(node: KuraNode) -> None:
    """A key rewritten after a clean gets a new ETag, so a resume against the old one restarts."""
    request(node, "POST", CAS, b"v1")
    old = etag_of(node)
    request(node, "DELETE", "/api/cache/clean?tenant_id=default")
    node.reactor.advance(5)
    request(node, "POST", CAS, b"v2")
    new = etag_of(node)
    assert old != new
    stale = get(node, Range="bytes=1-", If_Range=old)
    assert stale.status == 200
    assert stale.body == b"v2"


def test_ranges_work_on_every_blob_route(node: KuraNode) -> None:
    """Gradle, Nx, Metro and module downloads honour Range the same way."""
    request(node, "PUT", "/api/cache/gradle/g?tenant_id=default", BODY)
    request(node, "PUT", "/v1/cache/n", BODY)
    request(node, "PUT", "/api/metro/cache/m", BODY)
    for path in ("/api/cache/gradle/g?tenant_id=default", "/v1/cache/n", "/api/metro/cache/m"):
        response = request(node, "GET", path, headers={"Range": "bytes=-3"})
        assert response.status == 206, path
        assert response.body == b"789"

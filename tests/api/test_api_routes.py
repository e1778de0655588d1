"""Every public cache route and status of upstream section 1.2, on the twisted.web path."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from kura.service import KuraNode
from kura.testing import Exchange, Response, files_under, request
from tests.conftest import anonymous_deletes

TENANT = "tenant_id=default"
CAS = f"/api/cache/cas/{{id}}?{TENANT}"
KV_PUT = f"/api/cache/keyvalue?{TENANT}"
KV_GET = f"/api/cache/keyvalue/{{id}}?{TENANT}"
GRADLE = f"/api/cache/gradle/{{key}}?{TENANT}"
MODULE_QUERY = f"{TENANT}&hash=h1&name=App.framework"
MODULE = f"/api/cache/module/module-1?{MODULE_QUERY}"
START = f"/api/cache/module/start?{MODULE_QUERY}"
NX = "/v1/cache/{hash}"
METRO = "/api/metro/cache/{key}"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


def message(response: Response) -> str:
    """The ``message`` of a JSON error response (checking the error shape)."""
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert list(payload) == ["message"]
    return str(payload["message"])


def chunked(node: KuraNode, method: str, target: str, chunks: list[bytes]) -> list[Response]:
    """Send a chunked request (no Content-Length) on a new connection; return the answers."""
    client = Exchange(node)
    head = f"{method} {target} HTTP/1.1\r\nHost: kura\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks if chunk)
    client.send(head.encode() + body + b"0\r\n\r\n")
    return client.responses()


def start_upload(node: KuraNode, query: str = MODULE_QUERY) -> str:
    response = request(node, "POST", f"/api/cache/module/start?{query}")
    assert response.status == 200
    upload_id = response.json()["upload_id"]
    assert isinstance(upload_id, str)
    return upload_id


def complete(node: KuraNode, upload_id: str, parts: list[int]) -> Response:
    return request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        json.dumps({"parts": parts}).encode(),
        {"Content-Type": "application/json"},
    )


# -- Xcode CAS ------------------------------------------------------------------------


def test_cas_post_is_204_new_and_existing(node: KuraNode) -> None:
    """A CAS POST answers 204 whether the key is new or already stored (which is kept)."""
    assert request(node, "POST", CAS.format(id="a1"), b"first").status == 204
    assert request(node, "POST", CAS.format(id="a1"), b"second").status == 204
    assert request(node, "GET", CAS.format(id="a1")).body == b"first"


def test_cas_get_hit_serves_the_bytes(node: KuraNode) -> None:
    """A CAS hit is 200 with the stored bytes, octet-stream and the exact length."""
    request(node, "POST", CAS.format(id="a1"), b"\x00\x01binary\xff")
    response = request(node, "GET", CAS.format(id="a1"))
    assert response.status == 200
    assert response.body == b"\x00\x01binary\xff"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == "9"


def test_cas_get_miss_is_json_404(node: KuraNode) -> None:
    """A CAS miss is 404 with the JSON message ``Artifact not found``."""
    response = request(node, "GET", CAS.format(id="missing"))
    assert response.status == 404
    assert message(response) == "Artifact not found"


def test_cas_empty_body_is_stored(node: KuraNode) -> None:
    """A zero-byte artifact is a valid artifact (200 with an empty body, not a miss)."""
    assert request(node, "POST", CAS.format(id="empty"), b"").status == 204
    response = request(node, "GET", CAS.format(id="empty"))
    assert response.status == 200
    assert response.body == b""
    assert response.headers["content-length"] == "0"


@pytest.mark.node_environ(**FILES)
def test_cas_bodies_are_stored_as_files(node: KuraNode) -> None:
    """A blob route stores a body it does not keep in the database as a file under
    blobs/, never inline."""
    request(node, "POST", CAS.format(id="a1"), b"file-backed")
    (path,) = files_under(node.store.layout.blobs)
    with open(f"{node.store.layout.blobs}/{path}", "rb") as handle:
        assert handle.read() == b"file-backed"


@pytest.mark.parametrize("bad_id", ["..", "%2e%2e", "a%00b", "a%0Ab", "a%20b", "x" * 1025])
def test_cas_rejects_ids_that_are_not_plain_tokens(node: KuraNode, bad_id: str) -> None:
    """An id with dots only, control bytes, spaces or excessive length is 400 ``Invalid id``."""
    for method in ("POST", "GET"):
        response = request(node, method, CAS.format(id=bad_id), b"x" if method == "POST" else b"")
        assert response.status == 400
        assert message(response) == "Invalid id"
    assert files_under(node.store.layout.blobs) == []


def test_cas_id_with_an_encoded_slash_matches_no_route(node: KuraNode) -> None:
    """``%2F`` in an id never reaches storage as a path: no route matches (404)."""
    response = request(node, "POST", CAS.format(id="a%2Fb"), b"x")
    assert response.status == 404
    assert message(response) == "Not found"


# -- key-value ------------------------------------------------------------------------


def test_keyvalue_put_stores_only_the_entries_compactly(node: KuraNode) -> None:
    """A key-value PUT is 204; GET returns ``{"entries":[{"value":"x"}]}`` without cas_id."""
    body = json.dumps({"cas_id": "k1", "entries": [{"value": "x", "extra": 1}]}).encode()
    assert request(node, "PUT", KV_PUT, body).status == 204
    response = request(node, "GET", KV_GET.format(id="k1"))
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.body == b'{"entries":[{"value":"x"}]}'


def test_keyvalue_put_overwrites(node: KuraNode) -> None:
    """Each key-value PUT replaces the entry (last writer wins)."""
    for value in ("old", "new"):
        body = json.dumps({"cas_id": "k1", "entries": [{"value": value}]}).encode()
        assert request(node, "PUT", KV_PUT, body).status == 204
    assert request(node, "GET", KV_GET.format(id="k1")).json() == {"entries": [{"value": "new"}]}


def test_keyvalue_is_stored_inline(node: KuraNode) -> None:
    """Key-value entries live in SQLite: no file appears under blobs/."""
    body = json.dumps({"cas_id": "k1", "entries": [{"value": "x"}]}).encode()
    request(node, "PUT", KV_PUT, body)
    assert files_under(node.store.layout.blobs) == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"cas_id": "k1"}',
        b'{"cas_id": "k1", "entries": [{"value": 3}]}',
        b'{"cas_id": 7, "entries": []}',
        b'{"entries": []}',
        b"\xff\xfe",
    ],
)
def test_keyvalue_invalid_payload_is_400(node: KuraNode, body: bytes) -> None:
    """A body that is not the key-value JSON shape is 400 ``Invalid key-value payload: …``."""
    response = request(node, "PUT", KV_PUT, body)
    assert response.status == 400
    assert message(response).startswith("Invalid key-value payload: ")


def test_keyvalue_over_limit_is_413(nodes: Any) -> None:
    """A key-value body above KURA_MAX_KEYVALUE_BYTES is 413 with upstream's message."""
    node = nodes.start(KURA_MAX_KEYVALUE_BYTES="64")
    body = json.dumps({"cas_id": "k1", "entries": [{"value": "x" * 64}]}).encode()
    response = request(node, "PUT", KV_PUT, body)
    assert response.status == 413
    assert message(response).startswith("Failed to read key-value request body: ")
    fits = json.dumps({"cas_id": "k1", "entries": [{"value": "x"}]}).encode()
    assert request(node, "PUT", KV_PUT, fits).status == 204


def test_keyvalue_get_miss_is_json_404(node: KuraNode) -> None:
    """A key-value miss is 404 ``Key-value entry not found``."""
    response = request(node, "GET", KV_GET.format(id="nothing"))
    assert response.status == 404
    assert message(response) == "Key-value entry not found"


# -- Gradle ----------------------------------------------------------------------------


def test_gradle_put_is_201_new_then_200_existing(node: KuraNode) -> None:
    """A Gradle PUT is 201 when stored and 200 when the key already existed (unchanged)."""
    assert request(node, "PUT", GRADLE.format(key="g1"), b"first").status == 201
    assert request(node, "PUT", GRADLE.format(key="g1"), b"other").status == 200
    response = request(node, "GET", GRADLE.format(key="g1"))
    assert response.status == 200
    assert response.body == b"first"


def test_gradle_get_miss_is_json_404(node: KuraNode) -> None:
    """A Gradle miss is the JSON 404 ``Artifact not found``."""
    response = request(node, "GET", GRADLE.format(key="g404"))
    assert response.status == 404
    assert message(response) == "Artifact not found"


# -- module multipart -------------------------------------------------------------------


def test_module_multipart_assembles_parts_in_listed_order(node: KuraNode) -> None:
    """Parts uploaded out of order are assembled in the order ``complete`` lists them."""
    upload_id = start_upload(node)
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number={{n}}"
    assert request(node, "POST", part.format(n=2), b"-part-two").status == 204
    assert request(node, "POST", part.format(n=1), b"part-one").status == 204
    assert complete(node, upload_id, [1, 2]).status == 204
    response = request(node, "GET", MODULE)
    assert response.status == 200
    assert response.headers["content-length"] == "17"
    assert response.body == b"part-one-part-two"


def test_module_part_sent_again_replaces_the_earlier_one(node: KuraNode) -> None:
    """A part number uploaded twice keeps the last body."""
    upload_id = start_upload(node)
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    request(node, "POST", part, b"draft")
    request(node, "POST", part, b"final")
    assert complete(node, upload_id, [1]).status == 204
    assert request(node, "GET", MODULE).body == b"final"


def test_module_start_existing_is_204_for_new_clis(node: KuraNode) -> None:
    """Once the module exists, CLIs >= 4.202.0 get 204 and older ones 200 with a null id."""
    upload_id = start_upload(node)
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"m")
    complete(node, upload_id, [1])
    for version, status in [
        ("4.202.0", 204),
        ("4.202.0-beta.1", 204),
        ("4.300.1", 204),
        ("5.0.0", 204),
        ("4.201.99", 200),
        ("3.999.0", 200),
        ("garbage", 200),
    ]:
        response = request(node, "POST", START, headers={"x-tuist-cli-version": version})
        assert response.status == status, version
        if status == 200:
            assert response.json() == {"upload_id": None}
        else:
            assert response.body == b""
    old = request(node, "POST", START)
    assert old.status == 200
    assert old.json() == {"upload_id": None}


def test_module_start_without_hash_is_400(node: KuraNode) -> None:
    """Module start needs ``hash`` (and ``name``): 400 ``Missing hash``."""
    response = request(node, "POST", f"/api/cache/module/start?{TENANT}&name=App")
    assert response.status == 400
    assert message(response) == "Missing hash"
    response = request(node, "POST", f"/api/cache/module/start?{TENANT}&hash=h1")
    assert response.status == 400
    assert message(response) == "Missing name"


@pytest.mark.parametrize("number", ["abc", "-1", "4294967296", "", "1.5", None])
def test_module_part_number_must_be_u32(node: KuraNode, number: str | None) -> None:
    """A part_number that is not a u32 is 400 ``Invalid part_number``."""
    upload_id = start_upload(node)
    query = f"upload_id={upload_id}" + ("" if number is None else f"&part_number={number}")
    response = request(node, "POST", f"/api/cache/module/part?{query}", b"data")
    assert response.status == 400
    assert message(response) == "Invalid part_number"


def test_module_part_for_unknown_upload_is_404_before_the_body(
    node: KuraNode, client: Exchange
) -> None:
    """An unknown upload is refused from the head: no 100 Continue, no body byte staged."""
    client.send(
        b"POST /api/cache/module/part?upload_id=nope&part_number=1 HTTP/1.1\r\n"
        b"Host: kura\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    written = client.transport.value()
    assert b"100 Continue" not in written
    (response,) = client.responses()
    assert response.status == 404
    assert message(response) == "Upload not found"
    assert files_under(node.store.layout.uploads) == []
    assert client.closed


def test_module_part_over_10_mib_is_413(node: KuraNode) -> None:
    """A declared part above 10 MiB is 413 ``Part exceeds 10MB limit``."""
    upload_id = start_upload(node)
    client = Exchange(node)
    client.send(
        f"POST /api/cache/module/part?upload_id={upload_id}&part_number=1 HTTP/1.1\r\n"
        f"Host: kura\r\nContent-Length: {10 * 1024 * 1024 + 1}\r\n\r\n".encode()
    )
    (response,) = client.responses()
    assert response.status == 413
    assert message(response) == "Part exceeds 10MB limit"


def test_module_part_of_exactly_10_mib_is_accepted(node: KuraNode) -> None:
    """The part limit is inclusive: 10 MiB exactly is stored."""
    upload_id = start_upload(node)
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    assert request(node, "POST", part, b"p" * (10 * 1024 * 1024)).status == 204


def test_module_complete_for_unknown_upload_is_404(node: KuraNode) -> None:
    """Completing an upload that does not exist is 404 ``Upload not found``."""
    response = complete(node, "nope", [1])
    assert response.status == 404
    assert message(response) == "Upload not found"


@pytest.mark.parametrize("parts", [[1, 3], [], [1, 1], [2]])
def test_module_complete_with_mismatched_parts_is_400(node: KuraNode, parts: list[int]) -> None:
    """Listing a part that was never uploaded (or none, or one twice) is 400; nothing is stored."""
    upload_id = start_upload(node)
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"a")
    response = complete(node, upload_id, parts)
    assert response.status == 400
    assert request(node, "HEAD", MODULE).status == 404
    assert complete(node, upload_id, [1]).status == 204


@pytest.mark.parametrize("body", [b"{not json", b'{"parts": "1"}', b'{"parts": [true]}', b"{}"])
def test_module_complete_with_a_bad_payload_is_400(node: KuraNode, body: bytes) -> None:
    """A complete body that is not ``{"parts": [integers]}`` is 400."""
    upload_id = start_upload(node)
    response = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        body,
        {"Content-Type": "application/json"},
    )
    assert response.status == 400


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_module_complete_needs_a_json_content_type(
    node: KuraNode, content_type: str | None
) -> None:
    """A complete body that is not declared ``application/json`` is 415."""
    upload_id = start_upload(node)
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"a")
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts": [1]}',
        headers,
    )
    assert response.status == 415
    charset = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts": [1]}',
        {"Content-Type": "application/json; charset=utf-8"},
    )
    assert charset.status == 204


def test_module_complete_forgets_the_upload(node: KuraNode) -> None:
    """After complete, the upload id is gone: a late part is 404."""
    upload_id = start_upload(node)
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"a")
    complete(node, upload_id, [1])
    late = request(
        node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=2", b"b"
    )
    assert late.status == 404


def test_module_head_is_204_or_404_with_an_empty_body(node: KuraNode) -> None:
    """HEAD on a module answers 204 when it exists and 404 without a body when not."""
    missing = request(node, "HEAD", MODULE)
    assert missing.status == 404
    assert missing.body == b""
    upload_id = start_upload(node)
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"m")
    complete(node, upload_id, [1])
    present = request(node, "HEAD", MODULE)
    assert present.status == 204
    assert present.body == b""
    # The {id} path segment is ignored; the key comes from the query.
    other_id = request(node, "HEAD", f"/api/cache/module/whatever?{MODULE_QUERY}")
    assert other_id.status == 204


def test_module_get_miss_is_json_404(node: KuraNode) -> None:
    """A module miss is the JSON 404 ``Artifact not found``."""
    response = request(node, "GET", MODULE)
    assert response.status == 404
    assert message(response) == "Artifact not found"


def test_module_cache_category_partitions_keys(node: KuraNode) -> None:
    """The same hash and name under another cache_category is another artifact."""
    upload_id = start_upload(node, MODULE_QUERY + "&cache_category=selective_tests")
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"m")
    complete(node, upload_id, [1])
    assert request(node, "HEAD", MODULE).status == 404
    assert request(node, "HEAD", MODULE + "&cache_category=selective_tests").status == 204


# -- clean -------------------------------------------------------------------------------


@anonymous_deletes
def test_clean_removes_only_that_namespace(node: KuraNode) -> None:
    """DELETE clean is 204 and every artifact of that namespace, and only it, reads 404."""
    kv = json.dumps({"cas_id": "k1", "entries": [{"value": "x"}]}).encode()
    for namespace in ("a", "b"):
        suffix = f"&namespace_id={namespace}"
        request(node, "POST", CAS.format(id="c1") + suffix, namespace.encode())
        request(node, "PUT", KV_PUT + suffix, kv)
        request(node, "PUT", GRADLE.format(key="g1") + suffix, namespace.encode())
    request(node, "POST", CAS.format(id="c1"), b"tenant-scoped")
    response = request(node, "DELETE", f"/api/cache/clean?{TENANT}&namespace_id=a")
    assert response.status == 204
    assert response.body == b""
    for target in (CAS.format(id="c1"), KV_GET.format(id="k1"), GRADLE.format(key="g1")):
        assert request(node, "GET", target + "&namespace_id=a").status == 404
        assert request(node, "GET", target + "&namespace_id=b").status == 200
    assert request(node, "GET", CAS.format(id="c1")).body == b"tenant-scoped"


@anonymous_deletes
def test_clean_without_namespace_cleans_the_tenant_scoped_one(node: KuraNode) -> None:
    """A tenant-scoped clean removes the ``""`` namespace and leaves project namespaces."""
    request(node, "POST", CAS.format(id="c1"), b"scoped")
    request(node, "POST", CAS.format(id="c1") + "&namespace_id=p", b"project")
    assert request(node, "DELETE", f"/api/cache/clean?{TENANT}").status == 204
    assert request(node, "GET", CAS.format(id="c1")).status == 404
    assert request(node, "GET", CAS.format(id="c1") + "&namespace_id=p").body == b"project"


@anonymous_deletes
def test_writes_after_clean_are_stored(node: KuraNode) -> None:
    """A write that starts after the clean beats the tombstone."""
    request(node, "POST", CAS.format(id="c1"), b"before")
    request(node, "DELETE", f"/api/cache/clean?{TENANT}")
    node.reactor.advance(1)
    assert request(node, "POST", CAS.format(id="c1"), b"after").status == 204
    assert request(node, "GET", CAS.format(id="c1")).body == b"after"


@anonymous_deletes
def test_clean_unlinks_the_blob_files(node: KuraNode) -> None:
    """Cleaned artifacts give their disk space back."""
    request(node, "POST", CAS.format(id="c1"), b"x" * 100)
    request(node, "DELETE", f"/api/cache/clean?{TENANT}")
    assert files_under(node.store.layout.blobs) == []
    assert node.store.metadata.used_bytes == 0


# -- Nx and Metro --------------------------------------------------------------------------


def test_nx_put_is_exactly_200_new_and_existing(node: KuraNode) -> None:
    """Nx only stores on exactly 200, so both a new and an existing PUT answer 200."""
    first = request(node, "PUT", NX.format(hash="n1"), b"nx-output")
    assert first.status == 200
    second = request(node, "PUT", NX.format(hash="n1"), b"nx-output")
    assert second.status == 200
    response = request(node, "GET", NX.format(hash="n1"))
    assert response.status == 200
    assert response.body == b"nx-output"


def test_nx_get_miss_is_404(node: KuraNode) -> None:
    """An Nx miss is a 404."""
    assert request(node, "GET", NX.format(hash="n404")).status == 404


def test_metro_put_accepts_chunked_bodies(node: KuraNode) -> None:
    """A Metro PUT arrives chunked with no Content-Length and is stored whole."""
    (response,) = chunked(node, "PUT", METRO.format(key="m1"), [b"metro-", b"bundle", b"!"])
    assert response.status == 200
    got = request(node, "GET", METRO.format(key="m1"))
    assert got.status == 200
    assert got.body == b"metro-bundle!"
    assert got.headers["content-length"] == "13"


def test_metro_put_existing_is_200(node: KuraNode) -> None:
    """A second Metro PUT of a stored key answers 200 and keeps the first body."""
    chunked(node, "PUT", METRO.format(key="m1"), [b"one"])
    (response,) = chunked(node, "PUT", METRO.format(key="m1"), [b"two"])
    assert response.status == 200
    assert request(node, "GET", METRO.format(key="m1")).body == b"one"


def test_metro_get_miss_is_404(node: KuraNode) -> None:
    """A Metro miss is a 404."""
    assert request(node, "GET", METRO.format(key="m404")).status == 404


def test_nx_and_metro_keys_are_separate_namespaces(node: KuraNode) -> None:
    """The same key under Nx and Metro names two artifacts."""
    request(node, "PUT", NX.format(hash="same"), b"nx")
    assert request(node, "GET", METRO.format(key="same")).status == 404


def test_gradle_and_cas_keys_do_not_collide(node: KuraNode) -> None:
    """Producers partition storage: the same key under CAS and Gradle are two artifacts."""
    request(node, "POST", CAS.format(id="same"), b"cas")
    assert request(node, "GET", GRADLE.format(key="same")).status == 404


# -- unknown routes and the peer plane ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/nope"),
        ("GET", "/api/cache"),
        ("GET", "/_internal/status"),
        ("GET", "/_internal/replicate/artifact"),
        ("POST", "/_internal/replicate/artifact"),
        ("DELETE", "/_internal/namespace"),
    ],
)
def test_unknown_and_internal_routes_are_json_404(node: KuraNode, method: str, target: str) -> None:
    """Unknown paths and every ``/_internal/*`` path are a JSON 404 on the public port."""
    response = request(node, method, target)
    assert response.status == 404
    assert message(response) == "Not found"


def test_keep_alive_serves_several_requests(client: Exchange) -> None:
    """One connection carries several new writes and reads and stays open."""
    for index in range(3):
        assert client.request("POST", CAS.format(id=f"k{index}"), b"v").status == 204
        assert client.request("GET", CAS.format(id=f"k{index}")).status == 200
    assert not client.closed


def test_pipelined_requests_are_answered_in_order(node: KuraNode) -> None:
    """Two pipelined requests in one segment get two responses, in order."""
    request(node, "POST", CAS.format(id="p1"), b"one")
    target = CAS.format(id="p1")
    client = Exchange(node)
    client.send(
        f"GET {target} HTTP/1.1\r\nHost: kura\r\n\r\n"
        f"GET {CAS.format(id='p2')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode()
    )
    first, second = client.responses()
    assert (first.status, first.body) == (200, b"one")
    assert second.status == 404


def test_every_response_carries_a_request_id(node: KuraNode) -> None:
    """Responses carry x-request-id, echoing a well-formed one from the client."""
    echoed = request(node, "GET", "/up", headers={"X-Request-Id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = request(node, "GET", CAS.format(id="none"))
    assert generated.headers["x-request-id"]


def test_refused_requests_leave_no_unhandled_failure(node: KuraNode) -> None:
    """A request refused from its head (here: unknown route with a body) logs no error."""
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        for target in ("/nope", "/_internal/replicate/artifact", CAS.format(id="..")):
            assert request(node, "POST", target, b"body").status in (400, 404)
        gc.collect()  # an unhandled failure is reported when its Deferred is collected
    finally:
        globalLogPublisher.removeObserver(observe)
    assert errors == []

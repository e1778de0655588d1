"""The extension's response headers: added once to every answer of an admitted request.

On the twisted.web path the ``response_headers`` hook runs exactly once per
response, with the status the client gets, whether the handler answered,
failed, or streams a file-backed body (the head is final before the first
body byte).
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Iterator

import pytest

from kura.service import KuraNode
from kura.testing import request
from tests.api.header_policy import POLICY, HeaderPolicy
from tests.conftest import Nodes

EXTENSION = {"KURA_EXTENSION_MODULE": "tests.api.header_policy:POLICY"}
CAS = "/api/cache/cas/{}?tenant_id=default&namespace_id=proj"


@pytest.fixture
def policy() -> Iterator[HeaderPolicy]:
    POLICY.statuses.clear()
    POLICY.failing = False
    yield POLICY
    POLICY.statuses.clear()
    POLICY.failing = False


@pytest.fixture
def guarded(nodes: Nodes, policy: HeaderPolicy) -> KuraNode:
    return nodes.start(**EXTENSION)


def test_a_handled_request_gets_the_headers_once(guarded: KuraNode, policy: HeaderPolicy) -> None:
    """An upload's 204 carries the header for 204; the hook ran once."""
    stored = request(guarded, "POST", CAS.format("a"), b"blob")
    assert stored.status == 204
    assert stored.headers["x-policy"] == "204"
    assert policy.statuses == [204]


def test_a_streamed_body_gets_them_before_its_first_byte(
    guarded: KuraNode, policy: HeaderPolicy
) -> None:
    """A file-backed GET (streamed by the fallback producer) carries them, hook run once."""
    body = bytes(range(256)) * 64
    request(guarded, "POST", CAS.format("a"), body)
    policy.statuses.clear()
    served = request(guarded, "GET", CAS.format("a"))
    assert served.status == 200 and served.body == body
    assert served.headers["x-policy"] == "200"
    assert policy.statuses == [200]


def test_an_error_gets_the_headers_of_its_status(guarded: KuraNode, policy: HeaderPolicy) -> None:
    """Errors raised by handlers (a miss, a digest mismatch) carry them, for their status."""
    miss = request(guarded, "GET", CAS.format("nope"))
    assert miss.status == 404 and miss.headers["x-policy"] == "404"
    wrong = hashlib.sha256(b"other").hexdigest()
    mismatch = request(guarded, "PUT", f"/bazel/cas/{wrong}", b"body")
    assert mismatch.status == 400 and mismatch.headers["x-policy"] == "400"
    assert policy.statuses == [404, 400]


def test_unrouted_requests_and_probes_run_no_hook(guarded: KuraNode, policy: HeaderPolicy) -> None:
    """Nothing was authorized for an unknown path or a probe, so nothing is added."""
    assert "x-policy" not in request(guarded, "GET", "/no/such/route").headers
    assert "x-policy" not in request(guarded, "GET", "/up").headers
    assert policy.statuses == []


def _open_descriptors() -> int:
    # Earlier tests' unreachable nodes still hold files until collected;
    # collect them first, or their closing would hide (or fake) a leak.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_a_failing_hook_fails_closed_with_a_503(nodes: Nodes, policy: HeaderPolicy) -> None:
    """With KURA_EXTENSION_RESPONSE_HEADERS_FAIL_OPEN=false a failing hook is one JSON 503.

    The hook is not asked again for the 503, and a download's file is closed unsent.
    """
    node = nodes.start(**EXTENSION, KURA_EXTENSION_RESPONSE_HEADERS_FAIL_OPEN="false")
    request(node, "POST", CAS.format("a"), b"blob")
    policy.failing = True
    policy.statuses.clear()
    before = _open_descriptors()
    for method, target, body, status in [
        ("GET", CAS.format("a"), b"", 200),
        ("GET", CAS.format("nope"), b"", 404),
        ("POST", CAS.format("b"), b"other", 204),
    ]:
        answer = request(node, method, target, body)
        assert answer.status == 503, (method, target)
        assert answer.json() == {"message": "Extension response headers failed"}
        assert "x-policy" not in answer.headers
        assert policy.statuses == [status]
        policy.statuses.clear()
    assert _open_descriptors() == before

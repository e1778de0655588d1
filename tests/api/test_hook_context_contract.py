"""The hook context is exactly what the request acts on, on every route and both serving paths.

Every public route of the route table is exercised (a test fails when a route
is added without a case here). For each request the extension records the
context ``authorize`` saw and a spy records what the handler then asked the
store for; the two must name the same tenant-scoped artifact (producer,
namespace, key) or namespace. Requests carry decoys where a former bug let
the hooks see something else than the handler acted on: a second
``?project_handle`` in a clean, a stray ``namespace_id`` on Gradle's
account-level path form, a key-value ``cas_id`` given only in the body.

Accelerable GETs run twice: on the twisted.web path (in memory) and through
the accelerator on a real socket (the serving-path metric shows which path
answered).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from kura.auth import HookContext
from kura.domain.artifacts import ArtifactAddress, Producer
from kura.service import KuraNode
from kura.testing import Response, request, sample
from tests.api.hook_recorder import RECORDER, StoreSpy, Touch
from tests.api.route_table import public_api
from tests.conftest import StartNode
from tests.support.real import RawClient

EXTENSION = {"KURA_EXTENSION_MODULE": "tests.api.hook_recorder:RECORDER"}
#: Small bodies in files, as a store written before metadata schema 4 keeps them
#: (otherwise they are kept in the database, and sent from memory).
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}
T = "tenant_id=default"
SHA = hashlib.sha256(b"bazel blob").hexdigest()
CCACHE = "a" * 40
SCCACHE = "b" * 64
TURBO = "c" * 16
KV = json.dumps({"cas_id": "kv1", "entries": [{"value": "x"}]}).encode()
#: The route table's specs by endpoint, as every node builds them.
SPECS = public_api().specs


@attrs.frozen
class Case:
    """One request of a route, and what must exist before it is sent."""

    endpoint: str
    method: str
    target: str
    body: bytes = b""
    headers: dict[str, str] = attrs.field(factory=dict)
    #: ``(method, target, body)`` requests sent first (not recorded).
    setup: tuple[tuple[str, str, bytes], ...] = ()


def _put(target: str, body: bytes = b"body", method: str = "PUT") -> tuple[str, str, bytes]:
    return (method, target, body)


CAS = f"/api/cache/cas/c1?{T}&namespace_id=proj"
GRADLE = f"/api/cache/gradle/g1?{T}&namespace_id=proj"
GRADLE_PATH = "/api/cache/gradle/default/proj/g2"
# A stray namespace_id on the account-level path form: the route ignores it.
GRADLE_TENANT = "/api/cache/gradle/default/g3?namespace_id=decoy"
MODULE = f"/api/cache/module/any?{T}&namespace_id=proj&hash=h1&name=App"
NX, METRO = "/v1/cache/abc123", "/api/metro/cache/m1"
BAZEL_AC, BAZEL_CAS = f"/bazel/ac/{SHA}", f"/bazel/cas/{SHA}"
BAZEL_I_AC, BAZEL_I_CAS = f"/bazel/inst/ac/{SHA}", f"/bazel/inst/cas/{SHA}"
CCACHE_PATH = f"/ccache/{CCACHE}"
SCCACHE_PATH = f"/sccache/b/b/{SCCACHE}"
TURBO_PATH = f"/v8/artifacts/{TURBO}?slug=team"

CASES = [
    Case("xcode_cas_post", "POST", CAS, b"cas body"),
    Case("xcode_cas_get", "GET", CAS, setup=(_put(CAS, method="POST"),)),
    Case("keyvalue_put", "PUT", f"/api/cache/keyvalue?{T}&namespace_id=proj&cas_id=kv1", KV),
    # The key only in the body: the hooks run once it is read.
    Case("keyvalue_put", "PUT", f"/api/cache/keyvalue?{T}&namespace_id=proj", KV),
    Case(
        "keyvalue_get",
        "GET",
        f"/api/cache/keyvalue/kv1?{T}&namespace_id=proj",
        setup=(_put(f"/api/cache/keyvalue?{T}&namespace_id=proj", KV),),
    ),
    Case("gradle_put", "PUT", GRADLE),
    Case("gradle_get", "GET", GRADLE, setup=(_put(GRADLE),)),
    Case("gradle_path_put", "PUT", GRADLE_PATH),
    Case("gradle_path_get", "GET", GRADLE_PATH, setup=(_put(GRADLE_PATH),)),
    Case("gradle_tenant_put", "PUT", GRADLE_TENANT),
    Case("gradle_tenant_get", "GET", GRADLE_TENANT, setup=(_put(GRADLE_TENANT),)),
    Case("module_start", "POST", MODULE.replace("/any?", "/start?")),
    Case("module_part", "POST", "/api/cache/module/part?upload_id={upload}&part_number=1"),
    Case(
        "module_complete",
        "POST",
        "/api/cache/module/complete?upload_id={upload}",
        json.dumps({"parts": [1]}).encode(),
        {"Content-Type": "application/json"},
    ),
    Case("module_exists", "HEAD", MODULE, setup=(("MODULE", "", b""),)),
    Case("module_get", "GET", MODULE, setup=(("MODULE", "", b""),)),
    # A second, ignored "?project_handle": the clean acts on namespace_id.
    Case(
        "clean",
        "DELETE",
        f"/api/cache/clean??project_handle=decoy&namespace_id=proj&{T}",
    ),
    Case("nx_put", "PUT", NX),
    Case("nx_get", "GET", NX, setup=(_put(NX),)),
    Case("metro_put", "PUT", METRO),
    Case("metro_get", "GET", METRO, setup=(_put(METRO),)),
    Case("bazel_ac_put", "PUT", BAZEL_AC),
    Case("bazel_cas_put", "PUT", BAZEL_CAS, b"bazel blob"),
    Case("bazel_get", "GET", BAZEL_CAS, setup=(_put(BAZEL_CAS, b"bazel blob"),)),
    Case("bazel_instance_ac_put", "PUT", BAZEL_I_AC),
    Case("bazel_instance_cas_put", "PUT", BAZEL_I_CAS, b"bazel blob"),
    Case("bazel_instance_get", "GET", BAZEL_I_AC, setup=(_put(BAZEL_I_AC),)),
    Case("ccache_put", "PUT", CCACHE_PATH),
    Case("ccache_get", "GET", CCACHE_PATH, setup=(_put(CCACHE_PATH),)),
    Case("ccache_delete", "DELETE", CCACHE_PATH, setup=(_put(CCACHE_PATH),)),
    Case("sccache_put", "PUT", SCCACHE_PATH),
    Case("sccache_get", "GET", SCCACHE_PATH, setup=(_put(SCCACHE_PATH),)),
    Case("sccache_root_propfind", "PROPFIND", "/sccache/"),
    Case("sccache_propfind", "PROPFIND", "/sccache/b/"),
    Case("sccache_root_mkcol", "MKCOL", "/sccache/"),
    Case("sccache_mkcol", "MKCOL", "/sccache/b/"),
    Case("turbo_status", "GET", "/v8/artifacts/status"),
    Case("turbo_events", "POST", "/v8/artifacts/events", b"[]"),
    Case("turbo_put", "PUT", TURBO_PATH),
    Case("turbo_get", "GET", TURBO_PATH, setup=(_put(TURBO_PATH),)),
]


def _id(case: Case) -> str:
    return f"{case.endpoint}:{case.method} {case.target}"


@pytest.fixture
def recorded() -> Iterator[list[HookContext]]:
    RECORDER.contexts.clear()
    yield RECORDER.contexts
    RECORDER.contexts.clear()


def expected_touches(ctx: HookContext, node_tenant: str) -> set[Touch]:
    """What a handler may ask the store about, given the context the hooks saw."""
    if ctx.artifact_key is not None:
        assert ctx.producer is not None
        address = ArtifactAddress(Producer(ctx.producer), ctx.namespace_id or "", ctx.artifact_key)
        touches = {Touch("artifact", address.artifact_id(node_tenant))}
        if ctx.route == "/api/cache/module/start":
            touches.add(Touch("namespace", ctx.namespace_id or ""))
        return touches
    if ctx.operation == "namespace.delete":
        return {Touch("namespace", ctx.namespace_id or "")}
    return set()


def _send(node: KuraNode, case: Case, upload: str | None) -> Response:
    target = case.target.format(upload=upload)
    return request(node, case.method, target, case.body, case.headers)


def _prepare(node: KuraNode, case: Case) -> str | None:
    """Send the case's setup; return a multipart upload id when the route needs one."""
    for method, target, body in case.setup:
        if method == "MODULE":
            _complete_module(node)
        else:
            assert request(node, method, target, body).status < 300, target
    if case.endpoint in ("module_part", "module_complete"):
        upload = _start_module(node)
        if case.endpoint == "module_complete":
            part = f"/api/cache/module/part?upload_id={upload}&part_number=1"
            assert request(node, "POST", part, b"part").status == 204
        return upload
    return None


def _start_module(node: KuraNode) -> str:
    started = request(node, "POST", MODULE.replace("/any?", "/start?"))
    upload: str = started.json()["upload_id"]
    return upload


def _complete_module(node: KuraNode) -> None:
    upload = _start_module(node)
    request(node, "POST", f"/api/cache/module/part?upload_id={upload}&part_number=1", b"m")
    done = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload}",
        json.dumps({"parts": [1]}).encode(),
        {"Content-Type": "application/json"},
    )
    assert done.status == 204


def test_every_public_route_has_a_case() -> None:
    """A route added to the table without a case here fails this test."""
    routes = {row.spec.endpoint for row in public_api().routes if not row.spec.probe}
    assert routes == {case.endpoint for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_the_hooks_see_what_the_handler_acts_on(
    nodes: Any, recorded: list[HookContext], case: Case
) -> None:
    """On the twisted.web path, the context names exactly what the store is asked about."""
    node = nodes.start(**EXTENSION, KURA_ALLOW_ANONYMOUS_DELETE="true")
    upload = _prepare(node, case)
    spy = StoreSpy(node.store)
    recorded.clear()
    response = _send(node, case, upload)
    assert response.status < 300, (response.status, response.body)
    (ctx,) = recorded  # the hooks ran exactly once
    assert ctx.route == SPECS[case.endpoint].template
    assert ctx.operation == SPECS[case.endpoint].operation.value
    if case.endpoint == "module_part":
        # A part is stored under its upload, which names what it builds.
        assert spy.touched == []
        assert (ctx.tenant_id, ctx.namespace_id, ctx.artifact_key) == (
            "default",
            "proj",
            "builds/h1/App",
        )
    else:
        assert set(spy.touched) == expected_touches(ctx, node.config.tenant_id)


def test_decoys_never_reach_the_context(nodes: Any, recorded: list[HookContext]) -> None:
    """The former bypasses: what the query adds beside the route's own fields is no target."""
    node = nodes.start(**EXTENSION, KURA_ALLOW_ANONYMOUS_DELETE="true")
    request(node, "DELETE", f"/api/cache/clean??project_handle=decoy&namespace_id=proj&{T}")
    request(node, "PUT", GRADLE_TENANT, b"account level")
    request(node, "PUT", f"/api/cache/keyvalue?{T}&namespace_id=proj", KV)
    clean, account, keyvalue = recorded
    assert clean.namespace_id == "proj"
    assert (account.namespace_id, account.artifact_key) == (None, "g3")
    assert keyvalue.artifact_key == "action_cache/kv1"


ACCELERABLE = [case for case in CASES if SPECS[case.endpoint].accelerable]


def _serve_raw(port: int, case: Case) -> Response:
    client = RawClient(port)
    try:
        client.get(case.target)
        (response,) = client.read_responses(1)
        return response
    finally:
        client.close()


def _accelerated(node: KuraNode) -> float:
    return sum(
        sample(node, "kura_artifact_serving_paths_total", path=path)
        for path in ("splice", "sendfile", "memory")
    )


@pytest.mark.parametrize("layout", [{}, FILES], ids=["database", "files"])
@pytest.mark.parametrize("case", ACCELERABLE, ids=_id)
@pytest_twisted.ensureDeferred
async def test_the_accelerator_shows_the_hooks_the_same_target(
    start_node: StartNode, recorded: list[HookContext], case: Case, layout: dict[str, str]
) -> None:
    """Through the accelerator, the context is the one the twisted.web path builds."""
    node = await start_node(**EXTENSION, **layout)
    port = node.public_port
    for method, target, body in case.setup:
        run: Callable[[], Any]
        if method == "MODULE":
            run = lambda: _complete_module_raw(port)  # noqa: E731
        else:
            run = lambda m=method, t=target, b=body: _request_raw(port, m, t, b)  # noqa: E731
        await deferToThread(run)
    spy = StoreSpy(node.store)
    recorded.clear()
    before = _accelerated(node)
    response = await deferToThread(_serve_raw, port, case)
    assert response.status == 200
    assert _accelerated(node) == before + 1  # the accelerator answered
    (ctx,) = recorded
    assert ctx.route == SPECS[case.endpoint].template
    assert set(spy.touched) == expected_touches(ctx, node.config.tenant_id)


def _request_raw(port: int, method: str, target: str, body: bytes) -> None:
    client = RawClient(port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: kura\r\nContent-Length: {len(body)}\r\n"
        client.send((head + "Connection: close\r\n\r\n").encode() + body, heads=[False])
        (response,) = client.read_responses(1)
        assert response.status < 300, (target, response.status, response.body)
    finally:
        client.close()


def _complete_module_raw(port: int) -> None:
    client = RawClient(port)
    try:
        start = MODULE.replace("/any?", "/start?")
        client.send(
            f"POST {start} HTTP/1.1\r\nHost: k\r\nContent-Length: 0\r\n\r\n".encode(),
            heads=[False],
        )
        (started,) = client.read_responses(1)
        upload = started.json()["upload_id"]
        part = f"/api/cache/module/part?upload_id={upload}&part_number=1"
        client.send(
            f"POST {part} HTTP/1.1\r\nHost: k\r\nContent-Length: 1\r\n\r\nm".encode(),
            heads=[False],
        )
        client.read_responses(1)
        body = json.dumps({"parts": [1]}).encode()
        complete = f"/api/cache/module/complete?upload_id={upload}"
        client.send(
            (
                f"POST {complete} HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body,
            heads=[False],
        )
        (done,) = client.read_responses(1)
        assert done.status == 204
    finally:
        client.close()

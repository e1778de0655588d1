"""The internal plane: status, the replication receiver and the catch-up routes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import pytest
from twisted.internet.address import IPv4Address

from kura.domain.artifacts import Producer
from kura.replication import wire
from kura.service import KuraNode
from kura.testing import ClientTransport, Exchange, Response, memory_node, request, sample
from tests.support.mesh import MESH_SECRET, signed_headers
from tests.support.stored import stored_bodies

TENANT = {"X-Kura-Tenant-Id": "default"}
GRADLE = "/api/cache/gradle/k1?tenant_id=default"


class InternalExchange(Exchange):
    """One peer connection to a node's internal plane; requests are signed as a peer's."""

    def __init__(self, node: KuraNode, *, sign: bool = True) -> None:
        self.node = node
        self.transport = ClientTransport(peerAddress=IPv4Address("TCP", "127.0.0.9", 50000))
        self.channel = node.replication.site.make_channel()
        self.channel.makeConnection(self.transport)
        self._pending = b""
        self._heads = []
        self._sign = sign

    def signed(
        self, method: str, target: str, body: bytes = b"", headers: Mapping[str, str] = TENANT
    ) -> dict[str, str]:
        """``headers`` plus the signature of a peer (at the node's time)."""
        given = dict(headers)
        if not self._sign:
            return given
        signed = signed_headers(
            method,
            f"http://peer{target}",
            body,
            tenant=given.get("X-Kura-Tenant-Id", ""),
            time_ms=int(self.node.reactor.seconds() * 1000),
        )
        if "X-Kura-Tenant-Id" not in given:
            del signed["X-Kura-Tenant-Id"]
        return {**signed, **given}

    def head_lines(self, method: str, target: str, body: bytes = b"") -> str:
        """A signed request head's header lines (for hand-framed requests)."""
        return "".join(f"{k}: {v}\r\n" for k, v in self.signed(method, target, body).items())

    def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        return super().request(
            method, target, body, self.signed(method, target, body, headers or {})
        )


@pytest.fixture
def node(tmp_path: object) -> Iterator[KuraNode]:
    """A node with a (never reachable) peer, so writes would queue outbox rows."""
    started = memory_node(
        f"{tmp_path}/data",
        KURA_PEERS="http://127.0.0.9:0",
        KURA_PEER_SECRET=MESH_SECRET,
        KURA_MAX_KEYVALUE_BYTES="1024",
        KURA_ALLOW_ANONYMOUS_DELETE="true",
    )
    yield started
    started.stopService()


def upsert(
    key: str = "k1",
    version: int = 5000,
    *,
    producer: Producer = Producer.GRADLE,
    namespace: str = "",
    inline: bool = False,
    content_type: str = "application/octet-stream",
) -> str:
    message = wire.UpsertMessage(producer, namespace, key, content_type, inline, version)
    return wire.url("", wire.REPLICATE_ARTIFACT_PATH, message.params())


def put(node: KuraNode, target: str, body: bytes, headers: dict[str, str] = TENANT) -> Response:
    return InternalExchange(node).request("PUT", target, body, headers)


def internal(
    node: KuraNode, method: str, target: str, headers: dict[str, str] = TENANT
) -> Response:
    return InternalExchange(node).request(method, target, b"", headers)


def applied(node: KuraNode, outcome: str, item: str = "artifact") -> float:
    return sample(
        node,
        "kura_replication_apply_results_total",
        source="replication",
        item_type=item,
        outcome=outcome,
    )


def test_status_reports_identity_without_a_tenant_header(node: KuraNode) -> None:
    """``/_internal/status`` names tenant, node URL and region (peers check them)."""
    response = internal(node, "GET", wire.STATUS_PATH, headers={})
    assert response.status == 200
    report = response.json()
    assert report["tenant_id"] == "default"
    assert report["node_url"] == node.config.node_url
    assert report["region"] == node.config.region


def test_upsert_is_applied_with_the_senders_version_and_no_outbox_rows(node: KuraNode) -> None:
    """A replicated artifact is stored byte-exact under its version, and not re-queued."""
    assert put(node, upsert(version=4242), b"replicated body").status == 204
    response = request(node, "GET", GRADLE)
    assert response.status == 200
    assert response.body == b"replicated body"
    assert response.headers["etag"] == '"4242-15"'
    assert node.store.outbox_depth == 0
    assert node.store.metadata.outbox_batch(0, 10) == []
    assert applied(node, "applied") == 1
    assert sample(node, "kura_replication_body_bytes_total", direction="received") == 15


def test_public_writes_do_queue_outbox_rows(node: KuraNode) -> None:
    """Contrast: a client write queues one row per replication target."""
    assert request(node, "PUT", GRADLE, b"client body").status == 201
    assert node.store.outbox_depth == 1


def test_same_delivery_twice_stores_once_and_skips_the_body(node: KuraNode) -> None:
    """The second identical delivery is answered 204 before its body and stores nothing."""
    assert put(node, upsert(), b"same bytes").status == 204
    files = sum(stored_bodies(node.config.data_dir))
    exchange = InternalExchange(node)
    response = exchange.request("PUT", upsert(), b"same bytes", TENANT)
    assert response.status == 204
    assert exchange.closed  # the unread body cannot be reused as a next request
    assert sum(stored_bodies(node.config.data_dir)) == files == 1
    assert applied(node, "applied") == 1
    assert applied(node, "ignored_equal") == 1


def test_older_version_never_overwrites_a_newer_one(node: KuraNode) -> None:
    """Last writer wins: an older version is ignored, a newer one replaces."""
    assert put(node, upsert(version=2000), b"v2").status == 204
    assert put(node, upsert(version=1000), b"v1").status == 204
    assert request(node, "GET", GRADLE).body == b"v2"
    assert applied(node, "ignored_stale") == 1
    assert put(node, upsert(version=3000), b"v3").status == 204
    assert request(node, "GET", GRADLE).body == b"v3"
    assert sum(stored_bodies(node.config.data_dir)) == 1


def test_tombstone_deletes_and_is_never_undone(node: KuraNode) -> None:
    """A namespace tombstone drops older artifacts and refuses older writes forever."""
    assert put(node, upsert(version=1000), b"old").status == 204
    delete = wire.url("", wire.REPLICATE_NAMESPACE_PATH, wire.DeleteMessage("", 5000).params())
    assert internal(node, "DELETE", delete).status == 204
    assert request(node, "GET", GRADLE).status == 404
    assert put(node, upsert(version=4000), b"late").status == 204
    assert request(node, "GET", GRADLE).status == 404
    assert applied(node, "ignored_tombstone") == 1
    assert internal(node, "DELETE", delete).status == 204
    assert applied(node, "ignored_older", "namespace_delete") == 1
    assert put(node, upsert(version=6000), b"new").status == 204
    assert request(node, "GET", GRADLE).body == b"new"
    assert node.store.outbox_depth == 0


def test_inline_upsert_is_stored_inline(node: KuraNode) -> None:
    """An inline (key-value) message is stored in the metadata store, served as JSON."""
    value = b'{"entries":[{"value":"x"}]}'
    target = upsert(
        "action_cache/c1",
        producer=Producer.XCODE,
        inline=True,
        content_type="application/json",
    )
    assert put(node, target, value).status == 204
    response = request(node, "GET", "/api/cache/keyvalue/c1?tenant_id=default")
    assert response.status == 200
    assert response.body == value
    assert response.headers["content-type"] == "application/json"
    assert sum(stored_bodies(node.config.data_dir)) == 0


def test_inline_body_above_the_keyvalue_limit_is_refused(node: KuraNode) -> None:
    """Inline bodies are limited by KURA_MAX_KEYVALUE_BYTES (413 before the body)."""
    target = upsert("action_cache/c1", producer=Producer.XCODE, inline=True)
    assert put(node, target, b"x" * 1025).status == 413


def test_body_without_declared_length_is_refused(node: KuraNode) -> None:
    """A replicated body must carry Content-Length (411)."""
    exchange = InternalExchange(node)
    signed = exchange.head_lines("PUT", upsert(), b"hello")
    exchange.send(
        (
            f"PUT {upsert()} HTTP/1.1\r\nHost: p\r\n{signed}"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ).encode(),
        heads=[False],
    )
    assert exchange.responses()[0].status == 411
    assert request(node, "GET", GRADLE).status == 404


@pytest.mark.parametrize("headers", [{}, {"X-Kura-Tenant-Id": "other"}])
def test_peer_requests_for_another_tenant_are_forbidden(
    node: KuraNode, headers: dict[str, str]
) -> None:
    """Writes and catch-up reads need this node's tenant in the tenant header."""
    assert put(node, upsert(), b"x", headers).status == 403
    assert internal(node, "GET", wire.MANIFESTS_PATH, headers).status == 403
    assert request(node, "GET", GRADLE).status == 404


@pytest.mark.parametrize(
    "query",
    [
        "producer=bogus&inline=false&namespace_id=&key=k&version_ms=1",
        "producer=gradle&inline=false&namespace_id=&key=k&version_ms=0",
        "producer=gradle&inline=maybe&namespace_id=&key=k&version_ms=1",
        "producer=gradle&inline=false&namespace_id=a/b&key=k&version_ms=1",
        "producer=gradle&inline=false&key=k&version_ms=1",
        "producer=gradle&inline=false&namespace_id=&version_ms=1",
        "producer=gradle&inline=false&namespace_id=&key=k&key=j&version_ms=1",
        "producer=gradle&inline=false&namespace_id=&key=a%20b&version_ms=1",
    ],
)
def test_invalid_messages_are_rejected(node: KuraNode, query: str) -> None:
    """Malformed upsert queries are a 400 and store nothing."""
    response = put(node, f"{wire.REPLICATE_ARTIFACT_PATH}?{query}", b"x")
    assert response.status == 400
    assert node.store.metadata.manifests_page(None, 10) == []


def test_internal_routes_are_not_on_the_public_port(node: KuraNode) -> None:
    """The public port answers 404 for every ``/_internal/*`` path."""
    assert request(node, "GET", wire.STATUS_PATH).status == 404
    assert request(node, "PUT", upsert(), b"x", TENANT).status == 404
    assert request(node, "GET", GRADLE).status == 404


def test_unknown_internal_path_is_404(node: KuraNode) -> None:
    """Anything else on the internal port is a JSON 404."""
    response = internal(node, "GET", "/_internal/nothing")
    assert response.status == 404
    assert response.json() == {"message": "Not found"}


def test_truncated_body_leaves_nothing_behind(node: KuraNode) -> None:
    """A sender that disconnects mid-body publishes nothing and frees its staging."""
    exchange = InternalExchange(node)
    exchange.send(
        (
            f"PUT {upsert()} HTTP/1.1\r\nHost: p\r\nX-Kura-Tenant-Id: default\r\n"
            "Content-Length: 100\r\n\r\n"
        ).encode()
        + b"x" * 40
    )
    exchange.disconnect()
    assert request(node, "GET", GRADLE).status == 404
    assert node.store.tmp_budget.used == 0
    assert os.listdir(node.store.layout.uploads) == []
    assert put(node, upsert(), b"y" * 100).status == 204
    assert request(node, "GET", GRADLE).body == b"y" * 100


def test_ingest_is_paced_by_pausing_the_transport(tmp_path: object) -> None:
    """A fast sender is paused (not buffered) while the limiter says so."""
    node = memory_node(
        f"{tmp_path}/paced", KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND="1000"
    )
    exchange = InternalExchange(node)
    exchange.send(
        (
            f"PUT {upsert()} HTTP/1.1\r\nHost: p\r\nX-Kura-Tenant-Id: default\r\n"
            "Content-Length: 1500\r\n\r\n"
        ).encode()
        + b"a" * 500
    )
    assert exchange.transport.producerState == "producing"
    exchange.send(b"b" * 500)  # reserves 0.5 s after the first chunk's 0.5 s
    assert exchange.transport.producerState == "paused"
    node.reactor.advance(0.49)
    assert exchange.transport.producerState == "paused"
    node.reactor.advance(0.02)
    assert exchange.transport.producerState == "producing"
    exchange.send(b"c" * 500)
    assert exchange.responses()[0].status == 204
    assert request(node, "GET", GRADLE).body == b"a" * 500 + b"b" * 500 + b"c" * 500
    node.stopService()


def test_manifest_pages_follow_the_cursor(node: KuraNode) -> None:
    """Manifests come in artifact-id order; ``next_after`` is null on the last page."""
    for n in range(5):
        assert request(node, "PUT", f"/api/cache/gradle/k{n}?tenant_id=default", b"x").status == 201
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page_request = wire.PageRequest(2, after)
        response = internal(node, "GET", wire.url("", wire.MANIFESTS_PATH, page_request.params()))
        assert response.status == 200
        page = response.json()
        seen += [m["artifact_id"] for m in page["manifests"]]
        pages += 1
        after = page["next_after"]
        if after is None:
            break
        assert after == seen[-1]
    assert pages == 3
    assert seen == sorted(seen) and len(seen) == 5
    manifest = wire.PeerManifest.from_json(page["manifests"][0])
    assert manifest.producer == "gradle" and manifest.size == 1 and not manifest.inline


def test_page_limit_must_be_positive(node: KuraNode) -> None:
    """``limit=0`` is a 400 (upstream: the limit must be above 0)."""
    assert internal(node, "GET", wire.MANIFESTS_PATH + "?limit=0").status == 400


def test_tombstone_pages(node: KuraNode) -> None:
    """Tombstones are listed with their versions, in namespace order."""
    for ns in ("b", "a", "c"):
        assert request(node, "DELETE", f"/api/cache/clean?tenant_id=default&namespace_id={ns}")
    response = internal(node, "GET", wire.TOMBSTONES_PATH + "?limit=2")
    page = response.json()
    assert [t["namespace_id"] for t in page["tombstones"]] == ["a", "b"]
    assert page["next_after"] == "b"
    rest = internal(node, "GET", wire.TOMBSTONES_PATH + "?limit=2&after=b").json()
    assert [t["namespace_id"] for t in rest["tombstones"]] == ["c"]
    assert rest["next_after"] is None
    assert all(isinstance(t["version_ms"], int) for t in page["tombstones"])


def test_catch_up_bodies_are_served_with_their_version(node: KuraNode) -> None:
    """``/_internal/bootstrap/artifacts/{id}`` serves the raw body and its version."""
    body = os.urandom(300_000)
    assert request(node, "PUT", GRADLE, body).status == 201
    (manifest,) = node.store.metadata.manifests_page(None, 10)
    exchange = InternalExchange(node)
    target = f"{wire.ARTIFACTS_PATH}/{manifest.artifact_id}"
    exchange.send(
        f"GET {target} HTTP/1.1\r\nHost: p\r\n{exchange.head_lines('GET', target)}\r\n".encode(),
        heads=[False],
    )
    node.reactor.advance(1)  # the second 256 KiB chunk waits a moment on the limiter
    (response,) = exchange.responses()
    assert response.status == 200
    assert response.body == body
    assert response.headers["x-kura-version-ms"] == str(manifest.version_ms)
    assert sample(node, "kura_replication_body_bytes_total", direction="served") == len(body)
    assert internal(node, "GET", f"{wire.ARTIFACTS_PATH}/{'0' * 64}").status == 404
    assert internal(node, "GET", f"{wire.ARTIFACTS_PATH}/not-an-id").status == 404


def test_catch_up_serves_inline_bodies(node: KuraNode) -> None:
    """Inline artifacts are served by the same route."""
    payload = json.dumps({"cas_id": "c1", "entries": [{"value": "v"}]}).encode()
    assert request(node, "PUT", "/api/cache/keyvalue?tenant_id=default", payload).status == 204
    (manifest,) = node.store.metadata.manifests_page(None, 10)
    response = internal(node, "GET", f"{wire.ARTIFACTS_PATH}/{manifest.artifact_id}")
    assert response.body == b'{"entries":[{"value":"v"}]}'


def test_peer_traffic_is_not_public_traffic(node: KuraNode) -> None:
    """Internal requests never hold a public in-flight slot or feed the TTFB EWMA."""
    put(node, upsert(), b"x")
    internal(node, "GET", wire.STATUS_PATH)
    assert node.traffic.inflight == 0
    assert node.traffic.latency_ewma_ms is None

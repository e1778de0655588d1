"""Probes (``/up``, ``/ready``, ``/status/rollout``), ``/metrics`` and draining."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kura.service import KuraNode
from kura.testing import Exchange, request, sample
from tests.api.route_table import public_api
from tests.support.real import REPO_ROOT

CAS = "/api/cache/cas/{id}?tenant_id=default"

UP_FIELDS = {
    "status",
    "generation",
    "tenant_id",
    "region",
    "node",
    "node_url",
    "connected_nodes",
    "ring_members",
    "members",
    "regions",
    "nodes",
}
READY_FIELDS = {
    "status",
    "generation",
    "state",
    "ready",
    "draining",
    "writer_lock_owned",
    "initial_discovery_completed",
    "known_peers",
    "bootstrapped_peers",
    "bootstrap_inflight_peers",
    "http_inflight_requests",
    "grpc_inflight_requests",
    "reasons",
}
ROLLOUT_FIELDS = {
    "generation",
    "ready",
    "state",
    "ring_members",
    "initial_discovery_completed",
    "writer_lock_owned",
    "bootstrap_known_peers",
    "bootstrap_completed_peers",
    "bootstrap_inflight_peers",
    "http_inflight_requests",
    "grpc_inflight_requests",
    "outbox_messages",
    "object_store_uploads",
    "memory_pressure_state",
    "fd_timeout_count",
}


def test_up_reports_the_single_node_view(node: KuraNode) -> None:
    """``/up`` is 200 JSON with upstream's fields and single-node values."""
    response = request(node, "GET", "/up")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    up = response.json()
    assert set(up) >= UP_FIELDS
    assert up["status"] == "ok"
    assert up["tenant_id"] == "default"
    assert up["region"] == up["node"] == "local"
    assert up["node_url"] == node.config.node_url
    assert up["connected_nodes"] == 0
    assert up["ring_members"] == 1
    assert up["members"] == [node.config.node_url]


def test_ready_is_200_when_serving(node: KuraNode) -> None:
    """A started single node holds its lock and is ready: 200 with upstream's fields."""
    response = request(node, "GET", "/ready")
    assert response.status == 200
    ready = response.json()
    assert set(ready) >= READY_FIELDS
    assert ready["status"] == "ok"
    assert ready["ready"] is True
    assert ready["state"] == "serving"
    assert ready["writer_lock_owned"] is True
    assert ready["draining"] is False
    assert ready["initial_discovery_completed"] is True
    assert ready["reasons"] == []
    assert sample(node, "kura_ready_state") == 1.0


def test_rollout_reports_every_field(node: KuraNode) -> None:
    """``/status/rollout`` is 200 with upstream's fields, outbox depth included."""
    node.store.outbox_depth = 7
    response = request(node, "GET", "/status/rollout")
    assert response.status == 200
    rollout = response.json()
    assert set(rollout) >= ROLLOUT_FIELDS
    assert rollout["ready"] is True
    assert rollout["state"] == "serving"
    assert rollout["ring_members"] == 1
    assert rollout["writer_lock_owned"] is True
    assert rollout["outbox_messages"] == 7
    assert rollout["memory_pressure_state"] == 0


def test_draining_node_refuses_public_work_but_answers_probes(node: KuraNode) -> None:
    """While draining: cache routes 503 + close, /ready 503, /up and /status/rollout 200."""
    node.drain()
    response = request(node, "GET", CAS.format(id="c1"))
    assert response.status == 503
    assert response.json() == {"message": "server is draining"}
    assert response.headers["connection"] == "close"
    ready = request(node, "GET", "/ready")
    assert ready.status == 503
    assert ready.json()["status"] == "not_ready"
    assert ready.json()["state"] == "draining"
    assert "draining" in ready.json()["reasons"]
    assert request(node, "GET", "/up").status == 200
    rollout = request(node, "GET", "/status/rollout")
    assert rollout.status == 200
    assert rollout.json()["state"] == "draining"
    assert sample(node, "kura_drain_state") == 1.0


def test_draining_refuses_uploads_without_reading_them(node: KuraNode) -> None:
    """An upload arriving while draining is 503 from its head; nothing is staged."""
    node.drain()
    client = Exchange(node)
    client.send(
        b"POST /api/cache/cas/c1?tenant_id=default HTTP/1.1\r\nHost: kura\r\n"
        b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert b"100 Continue" not in client.transport.value()
    (response,) = client.responses()
    assert response.status == 503
    assert client.closed


def test_metrics_is_prometheus_text(node: KuraNode) -> None:
    """``/metrics`` is ``text/plain; version=0.0.4`` and parses as the Prometheus format."""
    request(node, "POST", CAS.format(id="c1"), b"hello")
    request(node, "GET", CAS.format(id="c1"))
    request(node, "GET", CAS.format(id="nope"))
    response = request(node, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["kura_http_requests"].samples
        if s.name == "kura_http_requests_total"
    }
    assert requests[("/api/cache/cas/{id}", "204")] == 1
    assert requests[("/api/cache/cas/{id}", "200")] == 1
    assert requests[("/api/cache/cas/{id}", "404")] == 1
    info = families["kura_node_info"].samples[0]
    assert info.labels == {"region": "local", "tenant_id": "default"}
    assert info.value == 1
    assert "kura_artifact_writes" in families
    assert "kura_http_request_duration_seconds" in families
    assert families["kura_cas_used_bytes"].samples[0].value == 5


def test_request_metrics_use_route_templates(node: KuraNode) -> None:
    """Requests are counted by route template; unknown paths fall under ``/_unmatched``."""
    request(node, "GET", CAS.format(id="one"))
    request(node, "GET", CAS.format(id="two"))
    request(node, "GET", "/no/such/route")
    assert sample(node, "kura_http_requests_total", route="/api/cache/cas/{id}", status="404") == 2
    assert sample(node, "kura_http_requests_total", route="/_unmatched", status="404") == 1
    assert sample(node, "kura_http_requests_total", route="/up", status="200") == 0
    request(node, "GET", "/up")
    assert sample(node, "kura_http_requests_total", route="/up", status="200") == 1


def test_artifact_metrics_count_reads_and_writes(node: KuraNode) -> None:
    """Writes and reads are counted by producer and result, with their bytes."""
    request(node, "PUT", "/api/cache/gradle/g1?tenant_id=default", b"12345")
    request(node, "GET", "/api/cache/gradle/g1?tenant_id=default")
    request(node, "GET", "/api/cache/gradle/g2?tenant_id=default")
    assert sample(node, "kura_artifact_writes_total", producer="gradle", result="ok") == 1
    assert sample(node, "kura_artifact_write_bytes_total", producer="gradle", result="ok") == 5
    assert sample(node, "kura_artifact_reads_total", producer="gradle", result="ok") == 1
    assert sample(node, "kura_artifact_read_bytes_total", producer="gradle", result="ok") == 5
    assert sample(node, "kura_artifact_reads_total", producer="gradle", result="not_found") == 1
    assert (
        sample(node, "kura_artifact_egress_completions_total", producer="gradle", result="ok") == 1
    )
    assert sample(node, "kura_http_inflight_requests") == 0
    assert sample(node, "kura_public_http_inflight_requests") == 0


def test_multipart_metrics(node: KuraNode) -> None:
    """Multipart uploads in progress and parts by result are counted."""
    start = request(node, "POST", "/api/cache/module/start?tenant_id=default&hash=h&name=n")
    upload_id = start.json()["upload_id"]
    assert sample(node, "kura_multipart_uploads") == 1
    request(node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"m")
    assert sample(node, "kura_multipart_parts_total", result="ok") == 1
    request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts":[1]}',
        {"Content-Type": "application/json"},
    )
    assert sample(node, "kura_multipart_uploads") == 0


DRAIN_TABLE = re.compile(r"<!-- drain-table.*?-->\n(.*?)<!-- end drain-table -->", re.S)
#: A value for each path placeholder of the public routes.
PLACEHOLDERS = {
    "id": "c1",
    "cas_id": "c1",
    "cache_key": "k1",
    "tenant": "default",
    "namespace": "ns",
    "hash": "a" * 64,
    "kind": "cas",
    "instance_name": "inst",
    "location": "ab/cd",
}


def documented_drain_answers() -> tuple[dict[tuple[str, str], int], int]:
    """``{(method, template): status}`` from docs/operations.md, and the status of the rest."""
    page = (Path(REPO_ROOT) / "docs" / "operations.md").read_text(encoding="utf-8")
    match = DRAIN_TABLE.search(page)
    assert match is not None, "the drain table's markers are gone from docs/operations.md"
    answers: dict[tuple[str, str], int] = {}
    otherwise = 0
    for row in match.group(1).splitlines()[2:]:
        methods, routes, answer = (cell.strip() for cell in row.strip("|").split("|"))
        status = int(answer.split()[0])
        if methods == "any":
            otherwise = status
            continue
        for method in methods.split(", "):
            for template in re.findall(r"`([^`]+)`", routes):
                answers[(method, template)] = status
    return answers, otherwise


def test_every_route_answers_a_draining_node_as_documented(node: KuraNode) -> None:
    """Each public route (and HEAD of each GET) sent to a draining node gets the status
    docs/operations.md's drain table gives it, with Connection: close."""
    answers, otherwise = documented_drain_answers()
    node.drain()
    checked = 0
    for route in public_api().routes:
        spec = route.spec
        if spec.probe:
            continue
        path = spec.template.format(**{name: PLACEHOLDERS[name] for name in route_fields(spec)})
        target = path + "?tenant_id=default"
        for method in [route.method] + (["HEAD"] if route.method == "GET" else []):
            body = b"x" if method in ("PUT", "POST") else b""
            response = request(node, method, target, body)
            expected = answers.get((method, spec.template), otherwise)
            assert (method, spec.template, response.status) == (method, spec.template, expected)
            assert response.headers["connection"] == "close"
            checked += 1
    assert checked > 40
    documented = set(answers)
    served = {(m, r.spec.template) for r in public_api().routes for m in (r.method, "HEAD")}
    assert documented <= served, "the drain table names a route the node does not have"


def route_fields(spec: Any) -> list[str]:
    return re.findall(r"{(\w+)}", spec.template)


def test_the_retention_age_is_how_long_ago_the_next_eviction_was_used(node: KuraNode) -> None:
    """``kura_cas_retention_age_seconds``: 0 while empty; then the age of the least
    recently used file-backed artifact, refreshed every minute."""
    from kura.service import RETENTION_SAMPLE_SECONDS

    clock = node.reactor
    clock.advance(RETENTION_SAMPLE_SECONDS)
    assert sample(node, "kura_cas_retention_age_seconds") == 0
    written_at = clock.seconds()
    assert request(node, "POST", CAS.format(id="old"), b"x" * 10_000).status == 204
    clock.advance(10 * RETENTION_SAMPLE_SECONDS)
    age = sample(node, "kura_cas_retention_age_seconds")
    assert 9 * RETENTION_SAMPLE_SECONDS <= age <= clock.seconds() - written_at

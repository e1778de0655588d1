"""Attacks on the public port, performed against real nodes (``twistd kura`` processes).

Open mode (no tokens, no extension, what ``make run`` starts) lets anyone
read and write but not wipe: a clean or a delete without credentials used to
remove every Nx artifact across the mesh. With tokens, nothing is written
(and, unless anonymous reads are on, nothing is read) without one, on both
serving paths, and every clean and delete is in the audit log.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.mesh import get_json, metrics, request
from tests.support.real import RealNode

pytestmark = pytest.mark.realnode

WRITE_TOKEN = "ci-write-token-0123456789abcdef"
READ_TOKEN = "dev-read-token-0123456789abcdef"
METRICS_TOKEN = "prometheus-scrape-token-0123"
TENANT = "tenant_id=default"
GRADLE = f"/api/cache/gradle/key1?{TENANT}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(token: str, user: str = "gradle") -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{token}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def served(node: RealNode, *paths: str) -> float:
    samples = metrics(node, METRICS_TOKEN)
    return sum(
        samples.get(f'kura_artifact_serving_paths_total{{path="{path}"}}', 0.0) for path in paths
    )


def accelerated(node: RealNode) -> float:
    """Bodies the accelerator sent: files by the kernel, bodies kept in the
    database from memory."""
    return served(node, "splice", "sendfile", "memory")


@pytest.fixture(scope="module")
def open_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A node on the embedded defaults: open mode."""
    node = RealNode(str(tmp_path_factory.mktemp("open") / "data")).start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def token_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A node with a write token (named ``ci``), a read token and a metrics token."""
    root = tmp_path_factory.mktemp("tokens")
    tokens = root / "tokens"
    tokens.write_text(f"# kura tokens\nwrite {WRITE_TOKEN} ci\nread {READ_TOKEN} dev\n")
    node = RealNode(
        str(root / "data"), KURA_AUTH_TOKENS_FILE=str(tokens), KURA_METRICS_TOKEN=METRICS_TOKEN
    )
    node.start()
    yield node
    node.stop()


def scrape(node: RealNode) -> str:
    status, _, body = request("GET", node.url + "/metrics", headers=bearer(METRICS_TOKEN))
    assert status == 200
    return body.decode()


def test_open_mode_says_so_and_refuses_anonymous_wipes(open_node: RealNode) -> None:
    """Anyone may fill an open cache; nobody anonymous may clean or delete it."""
    assert "open mode" in open_node.log()
    assert get_json(open_node.url + "/status/rollout")["auth_mode"] == "open"
    nx = "/v1/cache/0123456789abcdef"
    assert request("PUT", open_node.url + nx, b"nx artifact")[0] == 200
    status, _, body = request(
        "DELETE", open_node.url + f"/api/cache/clean?{TENANT}&namespace_id=nx"
    )
    assert status == 403 and b"KURA_ALLOW_ANONYMOUS_DELETE" in body
    assert request("GET", open_node.url + nx)[2] == b"nx artifact"
    ccache = "/ccache/" + "a" * 40
    assert request("PUT", open_node.url + ccache, b"result")[0] == 200
    assert request("DELETE", open_node.url + ccache)[0] == 403
    assert request("GET", open_node.url + ccache)[2] == b"result"


def test_without_a_token_nothing_is_written_or_read(token_node: RealNode) -> None:
    """Anonymous writes, overwrites, reads and cleans are 401 with a challenge."""
    url = token_node.url
    assert request("PUT", url + GRADLE, b"original", bearer(WRITE_TOKEN))[0] == 201
    for method, target, body in (
        ("PUT", "/api/cache/gradle/fresh?" + TENANT, b"poison"),
        ("PUT", "/ccache/" + "b" * 40, b"poison"),
        ("GET", GRADLE, None),  # an accelerator candidate
        ("DELETE", f"/api/cache/clean?{TENANT}", None),
    ):
        status, headers, _ = request(method, url + target, body)
        assert status == 401, (method, target)
        assert "Basic" in headers["www-authenticate"]
    status, _, _ = request("PUT", url + GRADLE, b"poison", bearer("not-a-configured-token"))
    assert status == 401
    assert request("GET", url + GRADLE, headers=bearer(READ_TOKEN))[2] == b"original"


def test_a_read_token_reads_through_the_accelerator_but_never_writes(
    token_node: RealNode,
) -> None:
    """Read tokens are served by the accelerator (small bodies from memory,
    large ones by the kernel); writes and cleans with one are 403."""
    url = token_node.url
    for key, sent in (("r1", b"x" * 5000), ("r1-large", b"X" * 100 * 1024)):
        path = f"/api/cache/cas/{key}?{TENANT}"
        assert request("POST", url + path, sent, basic(WRITE_TOKEN))[0] == 204
        before = accelerated(token_node)
        status, _, body = request("GET", url + path, headers=bearer(READ_TOKEN))
        assert (status, body) == (200, sent)
        assert accelerated(token_node) == before + 1
    assert request("POST", url + f"/api/cache/cas/r2?{TENANT}", b"y", bearer(READ_TOKEN))[0] == 403
    clean = url + f"/api/cache/clean?{TENANT}&namespace_id=p"
    assert request("DELETE", clean, headers=bearer(READ_TOKEN))[0] == 403


def test_cleans_and_deletes_are_audited_without_credentials(token_node: RealNode) -> None:
    """A write token may clean; the audit line names the token's holder, never the token."""
    url = token_node.url
    space = f"{TENANT}&namespace_id=audited"
    assert request("POST", url + f"/api/cache/cas/a1?{space}", b"v", bearer(WRITE_TOKEN))[0] == 204
    clean = request("DELETE", url + f"/api/cache/clean?{space}", headers=bearer(WRITE_TOKEN))
    assert clean[0] == 204
    ccache = "/ccache/" + "c" * 40
    assert request("PUT", url + ccache, b"r", bearer(WRITE_TOKEN))[0] == 200
    assert request("DELETE", url + ccache, headers=bearer(WRITE_TOKEN))[0] == 204
    audit = [
        json.loads(line)
        for line in token_node.log().splitlines()
        if line.startswith("{") and '"audit": true' in line
    ]
    assert [(e["action"], e["namespace"], e["principal"]) for e in audit] == [
        ("clean", "audited", "token:ci"),
        ("delete", "ccache", "token:ci"),
    ]
    assert audit[1]["key"] == "c" * 40
    for secret in (WRITE_TOKEN, READ_TOKEN, METRICS_TOKEN):
        assert secret not in token_node.log()
        assert secret not in scrape(token_node)


def test_metrics_and_status_answer_only_their_token(token_node: RealNode) -> None:
    """KURA_METRICS_TOKEN closes /metrics; probes stay open for the kubelet."""
    assert request("GET", token_node.url + "/metrics")[0] == 401
    assert request("GET", token_node.url + "/metrics", headers=bearer(WRITE_TOKEN))[0] == 401
    assert "kura_http_requests_total" in scrape(token_node)
    assert request("GET", token_node.url + "/up")[0] == 200
    assert request("GET", token_node.url + "/ready")[0] == 200


def test_anonymous_reads_serve_reads_only(tmp_path: Any) -> None:
    """With KURA_AUTH_ANONYMOUS_READ, a GET needs no token (accelerated); a PUT still does."""
    node = RealNode(
        f"{tmp_path}/data", KURA_AUTH_WRITE_TOKENS=WRITE_TOKEN, KURA_AUTH_ANONYMOUS_READ="true"
    ).start()
    try:
        assert request("PUT", node.url + GRADLE, b"public", bearer(WRITE_TOKEN))[0] == 201
        before = accelerated(node)
        assert request("GET", node.url + GRADLE)[2] == b"public"
        assert accelerated(node) == before + 1
        assert request("PUT", node.url + GRADLE.replace("key1", "key2"), b"anon")[0] == 401
        assert get_json(node.url + "/status/rollout")["auth_mode"] == "tokens"
    finally:
        node.stop()

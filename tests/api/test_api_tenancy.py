"""Tenancy: the node enforces its one tenant on every route that carries one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kura.service import KuraNode
from kura.testing import request
from tests.conftest import anonymous_deletes

KV_BODY = json.dumps({"cas_id": "k1", "entries": [{"value": "x"}]}).encode()

#: (method, path, query besides the tenant, body) for every tenant-carrying route.
TENANT_ROUTES = [
    ("GET", "/api/cache/cas/c1", "", b""),
    ("POST", "/api/cache/cas/c1", "", b"body"),
    ("PUT", "/api/cache/keyvalue", "", KV_BODY),
    ("GET", "/api/cache/keyvalue/k1", "", b""),
    ("GET", "/api/cache/gradle/g1", "", b""),
    ("PUT", "/api/cache/gradle/g1", "", b"body"),
    ("POST", "/api/cache/module/start", "hash=h&name=n", b""),
    ("HEAD", "/api/cache/module/m", "hash=h&name=n", b""),
    ("GET", "/api/cache/module/m", "hash=h&name=n", b""),
    ("DELETE", "/api/cache/clean", "", b""),
]
IDS = [f"{method} {path}" for method, path, _, _ in TENANT_ROUTES]


def target(path: str, *params: str) -> str:
    query = "&".join(p for p in params if p)
    return f"{path}?{query}" if query else path


@pytest.mark.parametrize(("method", "path", "extra", "body"), TENANT_ROUTES, ids=IDS)
@pytest.mark.parametrize("tenant", [None, "tenant_id=", "account_handle="])
def test_missing_tenant_is_400(
    node: KuraNode, method: str, path: str, extra: str, body: bytes, tenant: str | None
) -> None:
    """Without a (non-empty) tenant every tenant route is 400 ``Missing tenant_id``."""
    response = request(node, method, target(path, tenant or "", extra), body)
    assert response.status == 400
    if method != "HEAD":
        assert response.json() == {"message": "Missing tenant_id"}


@pytest.mark.parametrize(("method", "path", "extra", "body"), TENANT_ROUTES, ids=IDS)
def test_other_tenant_is_403_naming_both(
    node: KuraNode, method: str, path: str, extra: str, body: bytes
) -> None:
    """A tenant other than KURA_TENANT_ID is 403 naming the request's and the node's tenant."""
    response = request(node, method, target(path, "tenant_id=acme", extra), body)
    assert response.status == 403
    if method != "HEAD":
        text = response.json()["message"]
        assert "'acme'" in text
        assert "'default'" in text


@pytest.mark.parametrize(("method", "path", "extra", "body"), TENANT_ROUTES, ids=IDS)
def test_duplicate_or_conflicting_tenant_is_400(
    node: KuraNode, method: str, path: str, extra: str, body: bytes
) -> None:
    """A tenant given twice, or under both names with different values, is ambiguous: 400."""
    for tenant in (
        "tenant_id=default&tenant_id=default",
        "tenant_id=default&tenant_id=acme",
        "tenant_id=default&account_handle=acme",
        "account_handle=default&account_handle=default",
    ):
        response = request(node, method, target(path, tenant, extra), body)
        assert response.status == 400, tenant


def test_tenant_match_is_case_insensitive(node: KuraNode) -> None:
    """``DEFAULT`` names the node's tenant ``default``."""
    assert request(node, "POST", "/api/cache/cas/c1?tenant_id=DEFAULT", b"v").status == 204
    assert request(node, "GET", "/api/cache/cas/c1?tenant_id=Default").body == b"v"


def test_forbidden_message_matches_upstream(node: KuraNode) -> None:
    """The 403 message is upstream's ``Forbidden: tenant 'X' is routed to server for 'Y'``."""
    response = request(node, "GET", "/api/cache/cas/c1?tenant_id=acme")
    assert response.json() == {
        "message": "Forbidden: tenant 'acme' is routed to server for 'default'"
    }


def test_node_tenant_is_configurable(nodes: Any) -> None:
    """With KURA_TENANT_ID=acme, ``acme`` is served and ``default`` is forbidden."""
    node = nodes.start(KURA_TENANT_ID="acme")
    assert request(node, "POST", "/api/cache/cas/c1?tenant_id=acme", b"v").status == 204
    assert request(node, "GET", "/api/cache/cas/c1?tenant_id=default").status == 403


def test_account_and_project_handles_are_aliases(node: KuraNode) -> None:
    """``account_handle``/``project_handle`` address what ``tenant_id``/``namespace_id`` do."""
    stored = request(
        node, "POST", "/api/cache/cas/c1?account_handle=default&project_handle=app", b"aliased"
    )
    assert stored.status == 204
    got = request(node, "GET", "/api/cache/cas/c1?tenant_id=default&namespace_id=app")
    assert got.body == b"aliased"
    assert request(node, "GET", "/api/cache/cas/c1?tenant_id=default").status == 404
    same = "tenant_id=default&account_handle=default&namespace_id=app&project_handle=app"
    assert request(node, "GET", f"/api/cache/cas/c1?{same}").body == b"aliased"


def test_conflicting_namespace_aliases_are_400(node: KuraNode) -> None:
    """``namespace_id`` and ``project_handle`` with different values are ambiguous: 400."""
    query = "tenant_id=default&namespace_id=a&project_handle=b"
    assert request(node, "GET", f"/api/cache/cas/c1?{query}").status == 400


@anonymous_deletes
def test_clean_aliases(node: KuraNode) -> None:
    """Clean accepts the aliases too and removes the aliased namespace."""
    request(node, "POST", "/api/cache/cas/c1?tenant_id=default&namespace_id=app", b"v")
    clean = request(node, "DELETE", "/api/cache/clean?account_handle=default&project_handle=app")
    assert clean.status == 204
    assert request(node, "GET", "/api/cache/cas/c1?tenant_id=default&namespace_id=app").status == (
        404
    )


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/cache/n1", b"nx"),
        ("GET", "/v1/cache/n1", b""),
        ("PUT", "/api/metro/cache/m1", b"metro"),
        ("GET", "/api/metro/cache/m1", b""),
    ],
)
def test_nx_and_metro_carry_no_tenant(node: KuraNode, method: str, path: str, body: bytes) -> None:
    """Nx and Metro need no tenant, and a foreign tenant in their query changes nothing."""
    if method == "GET":
        request(node, "PUT", path, b"stored")
    assert request(node, method, path, body).status == 200
    assert request(node, method, f"{path}?tenant_id=acme", body).status == 200


def test_upload_steps_after_start_carry_no_tenant(node: KuraNode) -> None:
    """Module part and complete are tied to the upload record, not to a query tenant."""
    start = request(node, "POST", "/api/cache/module/start?tenant_id=default&hash=h&name=n")
    upload_id = start.json()["upload_id"]
    part = request(
        node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"m"
    )
    assert part.status == 204
    done = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts":[1]}',
        {"Content-Type": "application/json"},
    )
    assert done.status == 204
    assert request(node, "GET", "/api/cache/module/x?tenant_id=default&hash=h&name=n").body == b"m"

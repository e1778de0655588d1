"""The gate remembers resolved targets: same answers, refusals never remembered."""

from __future__ import annotations

import pytest

from kura.api import gate
from kura.service import KuraNode
from kura.testing import request, succeeded
from kura.web.admission import RequestHead

CAS = "/api/cache/cas/{id}?tenant_id={tenant}{extra}"


def _get(node: KuraNode, id: str, tenant: str = "default", extra: str = "") -> int:
    return request(node, "GET", CAS.format(id=id, tenant=tenant, extra=extra)).status


def test_repeated_requests_resolve_to_the_same_artifact(node: KuraNode) -> None:
    stored = request(node, "POST", CAS.format(id="a1", tenant="default", extra=""), b"x")
    assert stored.status == 204
    for _ in range(3):
        assert _get(node, "a1") == 200
        # Another namespace is another artifact, however often it is asked for.
        assert _get(node, "a1", extra="&namespace_id=other") == 404


def test_refusals_are_decided_every_time(node: KuraNode) -> None:
    for _ in range(3):
        assert _get(node, "a1", tenant="someone-else") == 403
        assert _get(node, "a1", extra="&tenant_id=default") == 400  # ambiguous: given twice


def test_a_full_memo_starts_over(node: KuraNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate, "TARGET_MEMO_SIZE", 2)
    request(node, "POST", CAS.format(id="a1", tenant="default", extra=""), b"x")
    for index in range(5):
        assert _get(node, f"miss{index}") == 404
    assert len(node.gate._targets) <= 2
    assert _get(node, "a1") == 200


def test_a_head_without_its_raw_query_is_resolved_every_time(node: KuraNode) -> None:
    """Decoded parameters alone are no memo key: two such heads never share a target."""

    def namespace(name: str) -> str | None:
        head = RequestHead(
            method="GET",
            path=b"/api/cache/cas/a1",
            query={"tenant_id": ["default"], "namespace_id": [name]},
            headers={},
            declared_length=0,
        )
        return succeeded(node.gate.admit(head)).target.namespace

    assert namespace("one") == "one"
    assert namespace("two") == "two"


def _upload_head(id: str, length: int) -> RequestHead:
    return RequestHead(
        method="POST",
        path=f"/api/cache/cas/{id}".encode(),
        query={"tenant_id": ["default"]},
        raw_query=b"tenant_id=default",
        headers={},
        declared_length=length,
    )


def test_a_small_upload_of_an_unknown_artifact_is_admitted_at_once(
    node: KuraNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No lookup, no coroutine: the commit's write-once check settles a duplicate."""

    def no_waiting(*args: object) -> None:
        raise AssertionError("the head waited for something")

    monkeypatch.setattr(node.store, "stored", no_waiting)
    monkeypatch.setattr(node.gate, "_complete", no_waiting)
    assert succeeded(node.gate.admit(_upload_head("new", 10))).existing is None


def test_a_write_once_upload_of_a_known_artifact_is_answered_from_the_head(
    node: KuraNode,
) -> None:
    assert (
        request(node, "POST", CAS.format(id="a1", tenant="default", extra=""), b"x").status == 204
    )
    assert succeeded(node.gate.admit(_upload_head("a1", 1))).existing is not None
    # A body too large to arrive in memory always asks the store.
    large = node.store.memory_body_bytes + 1
    assert succeeded(node.gate.admit(_upload_head("a1", large))).existing is not None

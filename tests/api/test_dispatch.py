"""MatchedDispatch: a route admission matched is answered without Klein matching it again."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from klein.resource import KleinResource
from twisted.logger import LogLevel, globalLogPublisher

from kura.api import dispatch
from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, request, sample

CAS = "/api/cache/cas/{id}?tenant_id=default"


@pytest.fixture
def klein_renders(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The paths Klein's own resource rendered."""
    rendered: list[bytes] = []
    render = KleinResource.render

    def counting(self: KleinResource, req: Any) -> Any:
        rendered.append(req.path)
        return render(self, req)

    monkeypatch.setattr(KleinResource, "render", counting)
    return rendered


@pytest.fixture
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    yield errors
    gc.collect()  # an unhandled failure is reported when its Deferred is collected
    globalLogPublisher.removeObserver(observe)


def waiting_get(nodes: Any) -> tuple[KuraNode, ControlledRunner, Exchange]:
    """A node, its runner and a client whose GET of a stored artifact waits on
    the (held) manifest read: its responder is suspended at its first wait."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    request(node, "POST", CAS.format(id="a1"), b"body")
    node.store.drop_manifest_cache()
    lookup = node.store.metadata.get_manifest
    runner.hold = lambda f: f == lookup
    client = Exchange(node)
    client.send(f"GET {CAS.format(id='a1')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    return node, runner, client


def test_matched_routes_skip_klein_and_the_rest_go_through_it(
    node: KuraNode, klein_renders: list[bytes]
) -> None:
    """Hits, misses and handler errors of matched routes never reach Klein's matcher;
    an unknown path or method is still Klein's to answer."""
    assert request(node, "POST", CAS.format(id="a1"), b"body").status == 204
    assert request(node, "GET", CAS.format(id="a1")).body == b"body"
    assert request(node, "HEAD", CAS.format(id="a1")).status == 200
    assert request(node, "GET", CAS.format(id="missing")).status == 404
    assert request(node, "GET", "/api/cache/cas/a1").status == 400  # no tenant: the gate refuses
    assert klein_renders == []

    unknown = request(node, "GET", "/nope")
    assert unknown.status == 404
    assert unknown.json()["message"]
    assert request(node, "DELETE", CAS.format(id="a1")).status == 405
    assert klein_renders == [b"/nope", b"/api/cache/cas/a1"]


def test_a_client_leaving_a_waiting_responder_cancels_it_quietly(
    nodes: Any, logged_errors: list[dict[str, Any]]
) -> None:
    """The responder waiting on storage is cancelled when its client leaves; nothing is
    written to the gone request and nothing is logged as an error."""
    node, runner, client = waiting_get(nodes)
    assert runner.held  # the manifest lookup waits

    client.disconnect()
    while runner.held:
        runner.release()

    assert client.responses() == []
    route = "/api/cache/cas/{id}"
    assert sample(node, "kura_http_requests_total", route=route, status="499") == 1
    assert sample(node, "kura_http_inflight_requests") == 0
    assert logged_errors == []


@pytest.fixture
def deferred_renders(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The responders MatchedDispatch handed on to a Deferred at their first wait."""
    handed: list[object] = []
    resume = dispatch._resume

    def counting(responder: Any, waiting: object) -> Any:
        handed.append(responder)
        return resume(responder, waiting)

    monkeypatch.setattr(dispatch, "_resume", counting)
    return handed


def test_a_responder_that_never_waits_is_answered_without_a_deferred(
    node: KuraNode, deferred_renders: list[object]
) -> None:
    """A hit, a HEAD, a miss and a refused request are answered inside ``render``."""
    assert request(node, "POST", CAS.format(id="a1"), b"body").status == 204
    deferred_renders.clear()
    assert request(node, "GET", CAS.format(id="a1")).body == b"body"
    assert request(node, "HEAD", CAS.format(id="a1")).status == 200
    assert request(node, "GET", CAS.format(id="missing")).status == 404
    assert request(node, "GET", "/api/cache/cas/a1").status == 400
    assert deferred_renders == []


def test_a_responder_resumes_with_what_it_waited_for(
    nodes: Any, deferred_renders: list[object]
) -> None:
    """A responder that waits (a manifest read on the storage thread) is handed on at
    its first wait and answers with the result once it arrives."""
    _, runner, client = waiting_get(nodes)
    assert len(deferred_renders) == 1 and client.responses() == []

    while runner.held:
        runner.release()
    (response,) = client.responses()
    assert (response.status, response.body) == (200, b"body")


def test_a_failure_after_a_wait_reaches_the_error_handler(
    nodes: Any, logged_errors: list[dict[str, Any]]
) -> None:
    """What the awaited work raised is thrown back into the responder: the client
    gets kura's JSON error, and the failure is logged once."""
    _, runner, client = waiting_get(nodes)
    (_, args, kwargs, waiting) = runner.held.pop(0)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("metadata unreadable")

    runner.held.insert(0, (broken, args, kwargs, waiting))
    runner.release()
    (response,) = client.responses()
    assert response.status == 500
    assert response.json()["message"]
    assert len(logged_errors) == 1

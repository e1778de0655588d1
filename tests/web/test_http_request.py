"""KuraRequest's departures from twisted.web's Request, checked on a bare KuraSite."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from kura.service import KuraNode
from kura.testing import Exchange, parse_responses
from kura.web.admission import Admission, RequestHead, RouteMatch
from kura.web.interfaces import IGate
from kura.web.routing import BodyKind, Query, RouteSpec
from kura.web.site import KuraSite

FORM_POST = (
    b"POST /form HTTP/1.1\r\nHost: kura\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n\r\n"
    b"a=1&b=2"
)


class Recorder(Resource):
    """Records what each POST saw: its args and its body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: IRequest) -> bytes:
        self.seen.append((dict(request.args), request.content.read()))
        return b"ok"


@implementer(IGate)
class AdmitAll:
    """A gate that admits every request to one in-memory-body route."""

    spec = RouteSpec(endpoint="form", template="/form", body=BodyKind.MEMORY, public=False)
    routes: RouteMatch | None = None

    def classify(self, head: RequestHead) -> tuple[RouteSpec, Mapping[str, str]]:
        return self.spec, {}

    def admit(self, head: RequestHead) -> Deferred[Admission]:
        return succeed(Admission(self.spec, {}, Query(head.query)))


def post_form(channel: Any) -> None:
    """Send :data:`FORM_POST` on ``channel``; it must be answered 200."""
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(FORM_POST)
    responses, _ = parse_responses(transport.value(), [False])
    assert [r.status for r in responses] == [200]


def test_form_encoded_bodies_are_not_parsed_into_args(node: KuraNode) -> None:
    """A form-encoded POST body stays opaque bytes: it never reaches ``request.args``."""
    stock = Recorder()
    post_form(server.Site(stock).buildProtocol(None))
    assert stock.seen == [({b"a": [b"1"], b"b": [b"2"]}, b"a=1&b=2")]  # what twisted.web does
    recorder = Recorder()
    site = KuraSite(
        recorder,
        gate=AdmitAll(),
        store=node.store,
        state=node.state,
        metrics=node.metrics,
        traffic=node.traffic,
        reactor=node.reactor,
        header_timeout=30,
        idle_timeout=60,
        send_timeout=60,
    )
    post_form(site.make_channel())
    assert recorder.seen == [({}, b"a=1&b=2")]


def test_a_connection_asks_its_socket_for_its_address_once(node: KuraNode) -> None:
    """Requests on one connection share its local address and TLS answer: twisted.web
    asks for both per request (a getsockname and an interface adaptation each)."""
    client = Exchange(node)
    asked: list[object] = []
    get_host = client.transport.getHost

    def counting_get_host() -> Any:
        asked.append(None)
        return get_host()

    client.transport.getHost = counting_get_host  # type: ignore[method-assign]
    get = b"GET /up HTTP/1.1\r\nHost: kura\r\n\r\n"
    client.send(get * 3)
    responses = client.responses()
    assert [r.status for r in responses] == [200, 200, 200]
    assert len(asked) == 1
    assert client.channel.getHost() is client.channel.getHost()
    assert client.channel.isSecure() is False


def test_a_head_that_arrives_whole_arms_no_deadline(node: KuraNode) -> None:
    """The head deadline is armed only for a head still incomplete after a read."""
    client = Exchange(node)
    pending = len(node.reactor.getDelayedCalls())
    client.send(b"GET /up HTTP/1.1\r\nHost: kura\r\n\r\n")
    assert [r.status for r in client.responses()] == [200]
    assert len(node.reactor.getDelayedCalls()) == pending

    client.send(b"GET /up HTTP/1.1\r\n")  # a head cut at a line end is incomplete too
    node.reactor.advance(node.config.header_timeout_ms / 1000)
    (response,) = client.responses()
    assert response.status == 408
    assert client.closed


def test_a_response_head_leaves_with_its_first_body_bytes(node: KuraNode) -> None:
    """Head and body are one write (one segment for a small response); a HEAD's
    head and a bodiless answer's head are one write each, all in order."""
    client = Exchange(node)
    cas = "/api/cache/cas/coalesced?tenant_id=default"
    assert client.request("POST", cas, b"x" * 5000).status == 204
    writes: list[bytes] = []
    write = client.transport.write

    def recording(data: bytes) -> None:
        writes.append(data)
        write(data)

    client.transport.write = recording  # type: ignore[method-assign]
    client.send(f"GET {cas} HTTP/1.1\r\nHost: kura\r\n\r\n".encode(), heads=[False])
    (got,) = client.responses()
    assert got.status == 200 and got.body == b"x" * 5000
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n" + b"x" * 5000)

    writes.clear()
    client.send(f"HEAD {cas} HTTP/1.1\r\nHost: kura\r\n\r\n".encode(), heads=[True])
    client.send(b"GET /api/cache/cas/missing?tenant_id=default HTTP/1.1\r\nHost: kura\r\n\r\n")
    head, missing = client.responses()
    assert (head.status, head.body, missing.status) == (200, b"", 404)
    assert len(writes) == 2
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n")
    assert writes[1].startswith(b"HTTP/1.1 404 ") and b'"message"' in writes[1]


def test_a_finished_request_is_freed_without_the_cyclic_collector(node: KuraNode) -> None:
    """Nothing a request owns points back at it: once answered it is freed by its
    reference count, not left in a cycle for the collector (a hit, a miss, a PUT)."""
    from kura.web.request import KuraRequest

    client = Exchange(node)
    cas = "/api/cache/cas/freed?tenant_id=default"
    gc.collect()
    gc.disable()
    try:
        assert client.request("POST", cas, b"x" * 100).status == 204
        assert client.request("GET", cas).status == 200
        assert client.request("GET", "/api/cache/cas/nothing?tenant_id=default").status == 404
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # This test's requests only (another test's may be collected meanwhile).
        left = [
            found
            for found in gc.garbage
            if isinstance(found, KuraRequest)
            and found.uri.startswith(b"/api/cache/cas/")
            and (b"/freed?" in found.uri or b"/nothing?" in found.uri)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def test_responses_carry_one_server_header_and_the_clocks_date(node: KuraNode) -> None:
    """``Server: kura`` once, and ``Date`` from the site's clock, formatted again
    only when the second changes."""
    from twisted.web.http import datetimeToString

    node.reactor.advance(1_000_000_000.25 - node.reactor.seconds())
    client = Exchange(node)
    first = client.request("GET", "/up")
    node.reactor.advance(0.5)
    same_second = client.request("GET", "/up")
    node.reactor.advance(0.5)
    next_second = client.request("GET", "/up")
    assert first.headers["date"] == datetimeToString(1_000_000_000).decode()
    assert same_second.headers["date"] == first.headers["date"]
    assert next_second.headers["date"] == datetimeToString(1_000_000_001).decode()
    client.send(b"GET /up HTTP/1.1\r\nHost: kura\r\n\r\n")
    raw = client.transport.value()
    assert raw.count(b"\r\nServer: ") == 1 and b"\r\nServer: kura\r\n" in raw

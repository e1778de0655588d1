"""SamePortProtocol, deterministically: a StringTransport, the node's clock, a fake engine.

Each test drives connections of an in-memory node's accelerator rebuilt
around :class:`~kura.accel.testing.FakeTransferEngine` (see ``harness.py``):
serving with the bytes intact, keep-alive, pipelining, the hand-off to
twisted.web, the head and idle deadlines, drain, denies, transfers that end
badly, and every fall-back reason. ``test_serving.py`` and the fault tests
prove the kernel path on real sockets.

That machinery (permits, leases, checks, the engine's transfers) serves files,
so the node keeps its small bodies in files (:data:`FILES`); what holds for
bodies kept in the database too (sent from memory with their head, or left to
twisted.web) is checked on both layouts (:data:`LAYOUTS`).
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.web.http import datetimeToString

from kura.accel import reasons
from kura.accel.classify import Candidate
from kura.accel.head import parse_head
from kura.accel.interfaces import CLIENT_ABORTED, INCOMPLETE, WRITE_TIMEOUT
from kura.accel.protocol import State
from kura.accel.testing import FakeTransferEngine
from kura.domain.artifacts import Manifest
from kura.domain.errors import StorageFault, Unauthorized
from kura.service import KuraNode
from kura.testing import ControlledRunner, request, sample
from kura.web.request import SERVER_NAME
from tests.accel.harness import (
    CAS,
    NOTHING_HELD,
    Client,
    HeldAuthorization,
    Rig,
    StoreStandIn,
    artifact_id,
    blob_path,
    get,
    upload,
)
from tests.conftest import Nodes
from tests.support.corruption import flip_byte

BODY = os.urandom(4096)
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}
#: Small bodies in files, or kept in the database (the default from schema 4 on).
LAYOUTS = pytest.mark.parametrize("node", [FILES, {}], ids=["files", "database"], indirect=True)


@pytest.fixture
def node(nodes: Nodes, request: pytest.FixtureRequest) -> KuraNode:
    """A node keeping small bodies in files (:data:`FILES`) unless the test's
    parameter (:data:`LAYOUTS`) says otherwise; ``node_environ`` adds to it."""
    marker = request.node.get_closest_marker("node_environ")
    layout = getattr(request, "param", FILES)
    return nodes.start(**layout, **(marker.kwargs if marker else {}))


def in_database(rig: Rig) -> bool:
    """Whether the rig's node keeps small bodies in the database."""
    return rig.node.config.memory_body_max_bytes > 0


def served(rig: Rig) -> float:
    """Responses the accelerator sent itself, on its layout's path: by the engine
    from a file, or from memory with the head (a body kept in the database)."""
    if in_database(rig):
        return rig.metric("kura_artifact_serving_paths_total", path="memory")
    return rig.served


@pytest.fixture
def rig(node: KuraNode) -> Rig:
    """The node's accelerator around a fake engine that completes every transfer inline."""
    upload(node, "a", BODY)
    return Rig(node)


@pytest.fixture
def held(node: KuraNode) -> Rig:
    """The node's accelerator around a fake engine that holds every transfer."""
    upload(node, "a", BODY)
    return Rig(node, engine=FakeTransferEngine(hold=True))


# -- serving ---------------------------------------------------------------------------


def test_a_get_is_served_with_twisted_webs_head_and_the_body_intact(rig: Rig) -> None:
    """The head is byte-compatible with twisted.web's; the engine sends the file's bytes."""
    client = rig.connect()
    client.send(get(CAS.format("a"), "X-Request-Id: r-1"))
    (response,) = client.responses()
    assert response.status == 200 and response.body == BODY
    date = datetimeToString(int(rig.clock.seconds()))
    (transfer,) = rig.engine.transfers
    assert transfer.head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"Server: " + SERVER_NAME,
        b"Date: " + date,
        b"Content-Type: application/octet-stream",
        b"Content-Length: 4096",
        b"Accept-Ranges: bytes",
        b"ETag: " + response.headers["etag"].encode(),
        b"X-Request-Id: r-1",
        b"Connection: keep-alive",
        b"",
        b"",
    ]
    assert not client.closed and client.reading and client.transport.nodelay
    assert (rig.served, rig.requests(200), rig.egress("ok")) == (1, 1, 1)
    assert rig.held() == NOTHING_HELD


@LAYOUTS
def test_a_range_is_served_as_a_206_of_that_slice(rig: Rig) -> None:
    """A satisfiable single range is served here, exactly that slice."""
    client = rig.connect()
    client.send(get(CAS.format("a"), "Range: bytes=100-199"))
    (response,) = client.responses()
    assert response.status == 206 and response.body == BODY[100:200]
    assert response.headers["content-range"] == "bytes 100-199/4096"
    assert served(rig) == 1


@pytest.mark.parametrize("node", [{}], indirect=True)
def test_a_body_kept_in_the_database_goes_with_its_head_on_the_general_path(rig: Rig) -> None:
    """Not a plain head (here Connection and X-Request-Id): the general path
    sends a body held in memory with its head, its bytes counted as sent."""
    client = rig.connect()
    client.send(get(CAS.format("a"), "Connection: close", "X-Request-Id: abc"))
    (response,) = client.responses()
    assert response.status == 200 and response.body == BODY
    assert response.headers["x-request-id"] == "abc"
    assert client.closed
    assert served(rig) == 1
    assert sample(rig.node, "kura_artifact_egress_bytes_total", producer="xcode", result="ok") == (
        len(BODY)
    )
    assert rig.held() == NOTHING_HELD


@pytest.mark.parametrize("node", [{}], indirect=True)
def test_a_body_kept_in_the_database_but_not_held_is_read_by_twisted_web(rig: Rig) -> None:
    """The accelerator never reads the database: a body not held in memory
    (after a restart, or dropped under memory pressure) is twisted.web's,
    which reads it, checks it and holds it, so the next request is served here."""
    rig.node.store.bodies.clear()
    first = rig.connect()
    first.send(get(CAS.format("a"), "Range: bytes=0-9"))
    (response,) = first.responses()
    assert response.status == 206 and response.body == BODY[:10]
    assert rig.fallbacks(reasons.INLINE) == 1 and served(rig) == 0
    second = rig.connect()
    second.send(get(CAS.format("a"), "Range: bytes=0-9"))
    assert second.responses()[0].body == BODY[:10]
    assert served(rig) == 1


@LAYOUTS
def test_keep_alive_serves_one_request_after_another(rig: Rig) -> None:
    """Each answered request leaves the connection open for the next one."""
    upload(rig.node, "b", b"bee")
    client = rig.connect()
    bodies = []
    for key in ("a", "b", "a"):
        client.send(get(CAS.format(key)))
        (response,) = client.responses()
        assert response.headers["connection"] == "keep-alive"
        bodies.append(response.body)
    assert bodies == [BODY, b"bee", BODY]
    assert not client.closed and served(rig) == 3


@LAYOUTS
def test_every_served_request_counts_as_public_demand(rig: Rig) -> None:
    """Downloads that end inside ``start`` take no in-flight slot, but the load sampler
    (the replication limiter's CPU share) still counts them as public requests."""
    client = rig.connect()
    before = rig.node.traffic.started
    for _ in range(3):
        client.send(get(CAS.format("a")))
        client.responses()
    assert rig.node.traffic.started - before == 3
    assert rig.node.traffic.inflight == 0


@LAYOUTS
def test_pipelined_requests_are_served_in_order(rig: Rig) -> None:
    """Requests arriving in one write are answered one after the other, in order."""
    upload(rig.node, "b", b"bee")
    client = rig.connect()
    client.send(get(CAS.format("a")) + get(CAS.format("b")) + get(CAS.format("a")))
    assert [r.body for r in client.responses()] == [BODY, b"bee", BODY]
    assert served(rig) == 3 and not client.closed


@LAYOUTS
def test_thousands_of_pipelined_requests_do_not_nest(rig: Rig) -> None:
    """2,000 requests in one write, each answered inline, stay within the recursion limit."""
    client = rig.connect()
    client.send(get(CAS.format("a")) * 2000)
    responses = client.responses()
    assert len(responses) == 2000 and all(r.body == BODY for r in responses)
    assert served(rig) == 2000


def test_a_request_pipelined_behind_a_transfer_waits_for_it(held: Rig) -> None:
    """While a transfer runs the connection reads nothing; the next request starts after it."""
    upload(held.node, "b", b"bee")
    client = held.connect()
    client.send(get(CAS.format("a")))
    (first,) = held.engine.held
    assert not client.reading and held.held()["permits"] == 1
    client.send(get(CAS.format("b")))  # already on its way when reading paused
    assert len(held.engine.transfers) == 1 and client.responses() == []
    first.complete()
    (second,) = held.engine.held
    second.complete()
    assert [r.body for r in client.responses()] == [BODY, b"bee"]
    assert client.reading and held.held() == NOTHING_HELD


def test_a_request_split_anywhere_is_served_once_whole(rig: Rig) -> None:
    """A head arriving a few bytes at a time is classified once, when it is complete."""
    client = rig.connect()
    raw = get(CAS.format("a"))
    for start in range(0, len(raw), 7):
        client.send(raw[start : start + 7])
    (response,) = client.responses()
    assert response.body == BODY and len(rig.engine.transfers) == 1


def test_the_time_to_first_byte_runs_from_the_heads_first_byte(held: Rig) -> None:
    """TTFB is sampled when the response head leaves, from the request head's first byte."""
    client = held.connect()
    raw = get(CAS.format("a"))
    client.send(raw[:10])
    held.clock.advance(0.1)
    client.send(raw[10:])
    held.clock.advance(0.2)
    held.engine.held[0].complete()
    latency = held.metric(
        "kura_public_request_latency_seconds_sum", transport="http", route="/api/cache/cas/{id}"
    )
    assert latency == pytest.approx(0.3)


# -- hand-off to twisted.web -----------------------------------------------------------


def test_a_handed_off_connection_gets_every_byte_untouched(rig: Rig) -> None:
    """An upload split mid-head is twisted.web's, bytes intact; so is what follows it."""
    body = os.urandom(3000)
    raw = (
        f"POST {CAS.format('up')} HTTP/1.1\r\nHost: kura\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    client = rig.connect()
    client.send(raw[:9])
    client.send(raw[9:60])
    client.send(raw[60:] + get(CAS.format("up")))
    stored, fetched = client.responses()
    assert stored.status == 204 and fetched.status == 200 and fetched.body == body
    assert rig.fallbacks(reasons.METHOD) == 1 and rig.served == 0
    assert rig.accelerator.connections == set()


@LAYOUTS
def test_a_fallback_in_a_pipeline_keeps_the_order(rig: Rig) -> None:
    """Served, missed, served: the miss hands the connection (and the rest) to twisted.web."""
    client = rig.connect()
    client.send(get(CAS.format("a")) + get(CAS.format("missing")) + get(CAS.format("a")))
    assert [r.status for r in client.responses()] == [200, 404, 200]
    assert served(rig) == 1 and rig.fallbacks(reasons.MISS) == 1


FALLBACKS = [
    ("head", get(CAS.format("a"), method="HEAD"), reasons.METHOD, 200),
    ("http/1.0", get(CAS.format("a"), version="HTTP/1.0"), reasons.METHOD, 200),
    (
        "ambiguous",
        get(CAS.format("a"), "Range: bytes=0-1", "Range: bytes=2-3"),
        reasons.AMBIGUOUS,
        206,
    ),
    ("route", get("/up"), reasons.ROUTE, 200),
    ("query", get("/api/cache/cas/a?tenant_id=default&x=a+b"), reasons.QUERY, 200),
    ("request", get("/api/cache/cas/a?tenant_id=other"), reasons.REQUEST, 403),
    ("miss", get(CAS.format("missing")), reasons.MISS, 404),
    ("range", get(CAS.format("a"), "Range: bytes=5000-"), reasons.RANGE_OR_DAMAGE, 416),
]


@LAYOUTS
@pytest.mark.parametrize(
    ("raw", "reason", "status"), [case[1:] for case in FALLBACKS], ids=[c[0] for c in FALLBACKS]
)
def test_what_the_accelerator_does_not_serve_twisted_web_answers(
    rig: Rig, raw: bytes, reason: str, status: int
) -> None:
    """Each request the accelerator declines is counted by reason and answered by twisted.web."""
    client = rig.connect()
    client.send(raw, heads=[raw.startswith(b"HEAD")])
    (response,) = client.responses()
    assert response.status == status
    assert rig.fallbacks(reason) == 1 and served(rig) == 0
    assert rig.held() == NOTHING_HELD


def test_the_classifier_refuses_other_methods_and_versions(rig: Rig) -> None:
    """Only GET over HTTP/1.1 is a candidate (the strict parser already passes nothing else)."""
    head = parse_head(get(CAS.format("a")))
    assert head is not None
    classify = rig.accelerator.classifier.classify
    assert isinstance(classify(head), Candidate)
    assert classify(head._replace(method=b"HEAD")) == reasons.METHOD
    assert classify(head._replace(version=b"HTTP/1.0")) == reasons.METHOD


def test_a_head_too_large_is_handed_off_before_it_ends(rig: Rig) -> None:
    """Past 16 KiB without an end the head is twisted.web's, which refuses it."""
    client = rig.connect()
    client.send(b"GET /up HTTP/1.1\r\nX-Big: " + b"x" * (17 * 1024))
    assert rig.fallbacks(reasons.HEAD_TOO_LARGE) == 1
    assert rig.accelerator.connections == set()


@pytest.mark.node_environ(KURA_ACCELERATED_FILE_SERVING_ENABLED="false")
def test_with_the_kill_switch_off_every_connection_is_twisted_webs(rig: Rig) -> None:
    """Disabled, the accelerator hands every connection over at its first bytes."""
    client = rig.connect()
    client.send(get(CAS.format("a")))
    (response,) = client.responses()
    assert response.body == BODY
    assert rig.fallbacks(reasons.DISABLED) == 1 and rig.served == 0


def test_an_h2c_preface_is_handed_to_http2(rig: Rig) -> None:
    """The prior-knowledge preface goes to the HTTP/2 connection once it is complete."""
    pytest.importorskip("h2")
    client = rig.connect()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    client.send(preface[:10])
    assert rig.fallbacks(reasons.H2C) == 0
    client.send(preface[10:])
    assert rig.fallbacks(reasons.H2C) == 1
    assert client.transport.value().startswith(b"\x00")  # the server's SETTINGS frame


def test_a_draining_node_leaves_new_requests_to_twisted_web(rig: Rig) -> None:
    """While draining, a request falls back (twisted.web answers its 503)."""
    client = rig.connect()
    rig.node.state.start_draining()
    client.send(get(CAS.format("a")))
    (response,) = client.responses()
    assert response.status == 503
    assert rig.fallbacks(reasons.DRAINING) == 1


@pytest.mark.node_environ(KURA_ACCELERATED_FILE_SERVING_MAX_CONCURRENT="1")
def test_with_every_permit_taken_a_request_falls_back_instead_of_waiting(held: Rig) -> None:
    """The one permit is held by a transfer: a second download is served by twisted.web."""
    busy = held.connect()
    busy.send(get(CAS.format("a")))
    other = held.connect()
    other.send(get(CAS.format("a")))
    (response,) = other.responses()
    assert response.body == BODY
    assert held.fallbacks(reasons.SATURATED) == 1
    held.engine.held[0].complete()
    assert held.held() == NOTHING_HELD


def test_a_failed_look_up_falls_back(node: KuraNode) -> None:
    """A manifest look-up that fails leaves the request to twisted.web."""
    upload(node, "a", BODY)
    rig = Rig(node, store=StoreStandIn(node.store, lambda _: fail(StorageFault("disk"))))
    client = rig.connect()
    client.send(get(CAS.format("a")))
    (response,) = client.responses()
    assert response.body == BODY
    assert rig.fallbacks(reasons.LOOKUP_ERROR) == 1 and rig.held() == NOTHING_HELD


def slow_lookups(node: KuraNode) -> tuple[Rig, list[Deferred[Manifest | None]]]:
    """A rig whose every manifest look-up waits for the test to fire it."""
    upload(node, "a", BODY)
    lookups: list[Deferred[Manifest | None]] = []

    def lookup(artifact_id: str) -> Deferred[Manifest | None]:
        lookups.append(Deferred())
        return lookups[-1]

    return Rig(node, store=StoreStandIn(node.store, lookup)), lookups


def test_a_connection_lost_during_a_look_up_gives_everything_back(node: KuraNode) -> None:
    """The look-up's late answer finds the connection gone: its permit is returned, nothing sent."""
    rig, lookups = slow_lookups(node)
    client = rig.connect()
    client.send(get(CAS.format("a")))
    client.lose()
    lookups[0].callback(node.store.cached_manifest(artifact_id(node, "a")))
    assert rig.engine.transfers == [] and rig.held() == NOTHING_HELD


def test_a_slow_look_up_pauses_reading_and_then_serves(node: KuraNode) -> None:
    """A look-up off the reactor pauses the connection; its answer resumes it."""
    rig, lookups = slow_lookups(node)
    client = rig.connect()
    client.send(get(CAS.format("a")))
    assert not client.reading and client.responses() == []
    lookups[0].callback(node.store.cached_manifest(artifact_id(node, "a")))
    (response,) = client.responses()
    assert response.body == BODY and client.reading


def test_an_inline_artifact_falls_back(node: KuraNode) -> None:
    """An artifact stored inline has no file to send: twisted.web answers."""
    upload(node, "a", BODY)
    manifest = node.store.cached_manifest(artifact_id(node, "a"))
    assert manifest is not None
    inline = Manifest(**{**manifest.to_json(), "inline": True, "blob_path": None})  # type: ignore[arg-type]
    rig = Rig(node, store=StoreStandIn(node.store, lambda _: inline))
    client = rig.connect()
    client.send(get(CAS.format("a")))
    client.responses()
    assert rig.fallbacks(reasons.INLINE) == 1 and rig.held() == NOTHING_HELD


def test_a_file_that_will_not_open_falls_back(rig: Rig) -> None:
    """A blob missing from disk falls back; twisted.web finds it gone and answers 404."""
    os.unlink(blob_path(rig.node, "a"))
    client = rig.connect()
    client.send(get(CAS.format("a")))
    (response,) = client.responses()
    assert response.status == 404
    assert rig.fallbacks(reasons.OPEN) == 1 and rig.held() == NOTHING_HELD


def test_out_of_descriptors_for_a_pipe_falls_back(rig: Rig) -> None:
    """No pipe to be had: the request is twisted.web's, the file's lease is returned."""
    rig.engine.refuse = True
    client = rig.connect()
    client.send(get(CAS.format("a")))
    (response,) = client.responses()
    assert response.body == BODY
    assert rig.fallbacks(reasons.OPEN) == 1 and rig.held() == NOTHING_HELD


def test_a_damaged_file_falls_back_to_twisted_web_which_forgets_it(rig: Rig) -> None:
    """A file shorter than its manifest is never served here; twisted.web answers 404."""
    os.truncate(blob_path(rig.node, "a"), 100)
    client = rig.connect()
    client.send(get(CAS.format("a")))
    (response,) = client.responses()
    assert response.status == 404
    assert rig.fallbacks(reasons.RANGE_OR_DAMAGE) == 1 and rig.held() == NOTHING_HELD


def test_a_file_whose_bytes_changed_is_never_served_here(rig: Rig) -> None:
    """A byte flipped in place: not sent; the store forgets it and twisted.web answers 404."""
    flip_byte(blob_path(rig.node, "a"), offset=2000)
    client = rig.connect()
    client.send(get(CAS.format("a")) + get(CAS.format("a"), "Range: bytes=0-9"))
    assert [r.status for r in client.responses()] == [404, 404]
    assert rig.fallbacks(reasons.RANGE_OR_DAMAGE) == 1 and rig.served == 0
    assert rig.metric("kura_corrupt_artifacts_total") == 1
    assert rig.held() == NOTHING_HELD


def held_check(nodes: Nodes) -> tuple[ControlledRunner, Rig, Client, bytes]:
    """A GET of a 100 kB file never verified, waiting for its check on a storage thread."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    body = os.urandom(100_000)
    upload(node, "big", body)
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "_check_copy"
    rig = Rig(node)
    client = rig.connect()
    client.send(get(CAS.format("big")))
    assert len(runner.held) == 1 and client.responses() == []
    return runner, rig, client, body


def test_a_large_unverified_file_is_hashed_off_the_reactor_then_served_here(
    nodes: Nodes,
) -> None:
    """Past the inline size the check runs on a storage thread; the request waits, paused."""
    runner, rig, client, body = held_check(nodes)
    assert not client.reading and rig.held()["leases"] == 1
    runner.release()
    (response,) = client.responses()
    assert response.status == 200 and response.body == body
    assert rig.served == 1 and client.reading and rig.held() == NOTHING_HELD


def test_a_connection_lost_while_its_file_is_checked_gives_everything_back(
    nodes: Nodes,
) -> None:
    """The client leaves during the check: permit, lease and reservation all come back."""
    runner, rig, client, _ = held_check(nodes)
    client.lose()
    runner.release()
    assert rig.held() == NOTHING_HELD and rig.served == 0


def test_a_check_that_cannot_read_the_file_falls_back(nodes: Nodes) -> None:
    """An I/O error while hashing is no verdict: twisted.web is asked, nothing is forgotten."""
    runner, rig, client, _ = held_check(nodes)
    _, args, _, waiting = runner.held.pop(0)
    os.close(args[0])
    waiting.errback(OSError(5, "Input/output error"))
    assert rig.fallbacks(reasons.OPEN) == 1
    assert rig.metric("kura_damaged_artifacts_total") == 0
    runner.release()  # twisted.web's own check, which reads fine
    (response,) = client.responses()
    assert response.status == 200


# -- deadlines -------------------------------------------------------------------------


@pytest.mark.node_environ(KURA_HEADER_TIMEOUT_MS="2000")
def test_a_head_not_whole_by_its_deadline_is_a_408_from_twisted_web(rig: Rig) -> None:
    """Trickling does not extend the head deadline; at it the connection gets a 408 and closes."""
    client = rig.connect()
    client.send(b"GET /api/cache/cas/a?tenant_id=default HTTP/1.1\r\nHo")
    rig.clock.advance(1.5)
    client.send(b"s")
    assert client.raw() == b""
    rig.clock.advance(0.5)
    assert client.raw() == (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        b"Content-Length: 48\r\nConnection: close\r\n\r\n"
        b'{"message": "Request head not received in time"}'
    )
    assert client.closed and rig.fallbacks(reasons.HEAD_TIMEOUT) == 1


@pytest.mark.node_environ(KURA_KEEPALIVE_IDLE_TIMEOUT_MS="4000")
def test_an_idle_connection_closes_at_the_idle_timeout_counted_from_its_last_answer(
    rig: Rig,
) -> None:
    """Between requests the idle timeout runs; an answered request restarts it."""
    client = rig.connect()
    rig.clock.advance(3)
    client.send(get(CAS.format("a")))
    client.responses()
    rig.clock.advance(3.5)
    assert not client.closed
    rig.clock.advance(1)
    assert client.closed and not client.aborted


@pytest.mark.node_environ(KURA_KEEPALIVE_IDLE_TIMEOUT_MS="1000")
def test_a_running_transfer_has_no_idle_deadline(held: Rig) -> None:
    """A long transfer is not cut by the idle timeout (the send timeout governs it)."""
    client = held.connect()
    client.send(get(CAS.format("a")))
    held.clock.advance(5)
    assert not client.closed
    held.engine.held[0].complete()
    assert client.responses()[0].body == BODY


# -- drain -----------------------------------------------------------------------------


def test_drain_closes_idle_connections_and_lets_transfers_finish(held: Rig) -> None:
    """close_idle closes connections between requests; a running transfer ends, then closes."""
    idle, busy, partial = held.connect(), held.connect(), held.connect()
    busy.send(get(CAS.format("a")))
    partial.send(b"GET /api/cache/cas/a")
    held.node.state.start_draining()
    held.accelerator.close_idle()
    assert idle.closed and not busy.closed and not partial.closed
    held.engine.held[0].complete()
    (response,) = busy.responses()
    assert response.body == BODY and busy.closed and not busy.aborted
    partial.send(b"?tenant_id=default HTTP/1.1\r\nHost: kura\r\n\r\n")
    assert partial.responses()[0].status == 503
    assert held.held() == NOTHING_HELD


def test_cut_off_aborts_every_connection_and_stops_transfers(held: Rig) -> None:
    """At the drain deadline every accelerated connection is aborted, its transfer stopped."""
    idle, busy = held.connect(), held.connect()
    busy.send(get(CAS.format("a")))
    held.accelerator.cut_off()
    (transfer,) = held.engine.held
    assert idle.aborted and busy.aborted and transfer.stopped
    transfer.fail(CLIENT_ABORTED)
    assert held.requests(499) == 1 and held.held() == NOTHING_HELD


# -- how a transfer ends -------------------------------------------------------------------


def test_a_client_leaving_mid_transfer_is_499_and_frees_everything(held: Rig) -> None:
    """A lost connection stops the transfer; its end counts 499 and client_aborted."""
    client = held.connect()
    client.send(get(CAS.format("a")))
    (transfer,) = held.engine.held
    client.lose()
    assert transfer.stopped and held.held()["permits"] == 1
    transfer.fail(CLIENT_ABORTED, sent=1000)
    assert held.requests(499) == 1 and held.requests(200) == 0
    assert held.egress(CLIENT_ABORTED) == 1 and held.held() == NOTHING_HELD


def test_a_short_file_ends_the_response_and_closes_the_connection(held: Rig) -> None:
    """An incomplete body must end the connection, or the client would misread what follows."""
    client = held.connect()
    client.send(get(CAS.format("a")) + get(CAS.format("a")))
    held.engine.held[0].fail(INCOMPLETE, sent=10)
    assert client.closed and not client.aborted
    assert len(held.engine.transfers) == 1  # the pipelined request is never served
    assert held.egress(INCOMPLETE) == 1 and held.requests(200) == 1
    assert held.held() == NOTHING_HELD


def test_a_write_timeout_aborts_the_connection(held: Rig) -> None:
    """A client that stops reading is cut off (499, write_timeout)."""
    client = held.connect()
    client.send(get(CAS.format("a")))
    held.engine.held[0].fail(WRITE_TIMEOUT, sent=0)
    assert client.aborted
    assert held.egress(WRITE_TIMEOUT) == 1 and held.requests(499) == 1
    assert held.held() == NOTHING_HELD


def test_connection_close_is_honoured_after_the_response(rig: Rig) -> None:
    """``Connection: close`` is answered so and ends the connection; nothing after it is served."""
    client = rig.connect()
    client.send(get(CAS.format("a"), "Connection: close") + get(CAS.format("a")))
    (response,) = client.responses()
    assert response.headers["connection"] == "close" and response.body == BODY
    assert client.closed and not client.aborted
    assert len(rig.engine.transfers) == 1 and client.protocol.state is State.CLOSING


# -- authorization ---------------------------------------------------------------------

TOKEN = "w" * 24


@pytest.mark.node_environ(KURA_AUTH_WRITE_TOKENS=TOKEN)
def test_a_deny_is_the_error_response_twisted_web_would_send_then_a_close(
    node: KuraNode,
) -> None:
    """No token: 401 with the challenge, closed; later bytes on the connection are ignored."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(node, "POST", CAS.format("a"), BODY, auth).status == 204
    rig = Rig(node)
    client = rig.connect()
    client.send(get(CAS.format("a"), "X-Request-Id: r-9"))
    date = datetimeToString(int(rig.clock.seconds()))
    body = b'{"message": "Authentication required: send Authorization: Bearer <token>"}'
    assert client.raw() == (
        b"HTTP/1.1 401 Unauthorized\r\nServer: " + SERVER_NAME + b"\r\nDate: " + date + b"\r\n"
        b"Content-Type: application/json\r\n"
        b'WWW-Authenticate: Bearer realm="kura", Basic realm="kura"\r\n'
        b"Content-Length: %d\r\nConnection: close\r\nX-Request-Id: r-9\r\n\r\n" % len(body) + body
    )
    assert client.closed and rig.requests(401) == 1 and rig.held() == NOTHING_HELD
    client.send(get(CAS.format("a"), f"Authorization: Bearer {TOKEN}"))
    assert client.raw() == b"" and rig.engine.transfers == []


@pytest.mark.node_environ(KURA_AUTH_WRITE_TOKENS=TOKEN)
def test_an_authorized_request_is_served(node: KuraNode) -> None:
    """With its token the request is checked once and served here."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(node, "POST", CAS.format("a"), BODY, auth).status == 204
    rig = Rig(node)
    client = rig.connect()
    client.send(get(CAS.format("a"), f"Authorization: Bearer {TOKEN}"))
    (response,) = client.responses()
    assert response.body == BODY and rig.served == 1


def test_a_slow_check_pauses_reading_and_adds_its_headers(node: KuraNode) -> None:
    """A check that answers later pauses the connection; its extra headers go in the head."""
    upload(node, "a", BODY)
    checks = HeldAuthorization()
    rig = Rig(node, authorization=checks)
    client = rig.connect()
    client.send(get(CAS.format("a")))
    assert not client.reading and rig.held()["leases"] == 1
    checks.pending[0].callback([(b"X-Policy", b"checked")])
    (response,) = client.responses()
    assert response.headers["x-policy"] == "checked" and response.body == BODY
    assert client.reading and rig.held() == NOTHING_HELD


def slow_checks(node: KuraNode) -> tuple[Rig, HeldAuthorization, Client]:
    """A rig whose checks wait for the test, and a connection whose GET awaits its check."""
    upload(node, "a", BODY)
    checks = HeldAuthorization()
    rig = Rig(node, authorization=checks)
    client = rig.connect()
    client.send(get(CAS.format("a")))
    assert len(checks.pending) == 1
    return rig, checks, client


def test_a_connection_lost_during_its_check_gives_everything_back(node: KuraNode) -> None:
    """A check answering after the client left starts nothing and leaks nothing."""
    rig, checks, client = slow_checks(node)
    client.lose()
    checks.pending[0].callback([])
    assert rig.engine.transfers == [] and rig.held() == NOTHING_HELD


def test_a_deny_after_the_client_left_writes_nothing(node: KuraNode) -> None:
    """A refusal for a client that is gone is not written anywhere."""
    rig, checks, client = slow_checks(node)
    client.lose()
    checks.pending[0].errback(Unauthorized("Invalid token"))
    assert client.raw() == b"" and rig.held() == NOTHING_HELD


def test_a_cut_off_during_a_check_starts_no_transfer(node: KuraNode) -> None:
    """Aborted while its check runs, the request is dropped when the check answers."""
    rig, checks, client = slow_checks(node)
    rig.accelerator.cut_off()
    checks.pending[0].callback([])
    assert client.aborted and rig.engine.transfers == [] and rig.held() == NOTHING_HELD


def test_a_drain_during_a_check_closes_after_the_response(node: KuraNode) -> None:
    """A request already admitted is served when draining starts, then the connection closes."""
    rig, checks, client = slow_checks(node)
    node.state.start_draining()
    checks.pending[0].callback([])
    (response,) = client.responses()
    assert response.headers["connection"] == "close" and response.body == BODY
    assert client.closed and rig.held() == NOTHING_HELD


# -- the connection's state --------------------------------------------------------------


def test_a_connection_is_in_one_state_at_a_time(held: Rig) -> None:
    """Idle, reading a head, serving, idle again, closing at the idle deadline, closed."""
    client = held.connect()
    assert client.protocol.state is State.IDLE
    raw = get(CAS.format("a"))
    client.send(raw[:5])
    assert client.protocol.state is State.READING_HEAD
    client.send(raw[5:])
    assert client.protocol.state is State.SERVING
    held.engine.held[0].complete()
    assert client.protocol.state is State.IDLE
    held.clock.advance(held.accelerator.settings.idle_timeout + 1)
    assert client.protocol.state is State.CLOSING and client.closed
    client.lose()
    assert client.protocol.state is State.CLOSED
    assert held.accelerator.connections == set()


def test_a_handed_off_connection_leaves_the_accelerator(rig: Rig) -> None:
    """After a fall-back the connection is twisted.web's: no deadline, drain or cut-off of ours."""
    client = rig.connect()
    client.send(get("/up"))
    assert client.protocol.state is State.HANDED_OFF
    assert rig.accelerator.connections == set()
    rig.accelerator.cut_off()
    assert not client.aborted

"""Limits decided from the request head, staging budget and write shedding."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kura.memory import Pressure
from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, files_under, request, sample
from tests.api.test_api_routes import MODULE, complete, start_upload
from tests.support.stored import database_bodies

MiB = 1024 * 1024
GiB = 1024 * MiB
CAS = "/api/cache/cas/{id}?tenant_id=default"


def head(method: str, target: str, *lines: str) -> bytes:
    return (
        "\r\n".join([f"{method} {target} HTTP/1.1", "Host: kura", *lines]) + "\r\n\r\n"
    ).encode()


def message(body: bytes) -> str:
    return str(json.loads(body)["message"])


def part_target(node: KuraNode) -> str:
    start = request(node, "POST", "/api/cache/module/start?tenant_id=default&hash=h&name=n")
    return f"/api/cache/module/part?upload_id={start.json()['upload_id']}&part_number=1"


def assert_nothing_staged(node: KuraNode) -> None:
    assert files_under(node.store.layout.uploads) == []
    assert node.store.tmp_budget.used == 0


# -- over-limit Content-Length -------------------------------------------------------------


OVER_LIMIT = [
    ("POST", CAS.format(id="c1"), 256 * MiB + 1, "Request body exceeded allowed size"),
    ("PUT", "/api/cache/gradle/g1?tenant_id=default", 100 * MiB + 1, None),
    ("PUT", "/api/metro/cache/m1", 2 * GiB + 1, None),
    (
        "PUT",
        "/api/cache/keyvalue?tenant_id=default",
        MiB + 1,
        "Failed to read key-value request body: length limit exceeded",
    ),
    ("POST", CAS.format(id="c1"), 99999999999999999999999, None),
    ("POST", CAS.format(id="c1"), 2**63, None),
    ("GET", CAS.format(id="c1"), 64 * 1024 + 1, None),  # a stray body on a bodiless route
]


@pytest.mark.parametrize(("method", "target", "length", "text"), OVER_LIMIT)
def test_over_limit_content_length_is_413_from_the_head(
    node: KuraNode, method: str, target: str, length: int, text: str | None
) -> None:
    """413 arrives for the head alone: no 100 Continue, no body byte read, nothing staged."""
    client = Exchange(node)
    client.send(head(method, target, f"Content-Length: {length}", "Expect: 100-continue"))
    written = client.transport.value()
    assert written.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in written
    (response,) = client.responses()
    assert response.headers["connection"] == "close"
    if text is not None:
        assert message(response.body) == text
    assert client.closed
    assert_nothing_staged(node)
    # Body bytes that arrive anyway are never read as a body or as a request.
    client.send(b"x" * 4096 + head("GET", "/up"))
    assert client.responses() == []
    assert_nothing_staged(node)


def test_nx_over_limit_upload_is_409_not_stored(node: KuraNode) -> None:
    """Nx fails a task on 413, so an oversized Nx upload is a 409 'not stored', from the head."""
    client = Exchange(node)
    client.send(
        head("PUT", "/v1/cache/n1", f"Content-Length: {2 * GiB + 1}", "Expect: 100-continue")
    )
    written = client.transport.value()
    assert written.startswith(b"HTTP/1.1 409 ")
    assert b"100 Continue" not in written
    (response,) = client.responses()
    assert message(response.body) == "Request body exceeded allowed size"
    assert response.headers["connection"] == "close"
    assert_nothing_staged(node)


def test_nx_and_metro_reads_while_draining_are_misses(node: KuraNode) -> None:
    """A draining node answers Nx/Metro reads with a 404 miss (503 kills their builds)."""
    node.drain()
    for target in ("/v1/cache/n1", "/api/metro/cache/m1"):
        client = Exchange(node)
        client.send(head("GET", target))
        (response,) = client.responses()
        assert response.status == 404, target
        assert response.headers["connection"] == "close"
    client = Exchange(node)
    client.send(head("PUT", "/v1/cache/n2", "Content-Length: 1") + b"x")
    (response,) = client.responses()
    assert response.status == 409
    assert message(response.body) == "server is draining"


def test_module_part_over_limit_is_413_from_the_head(node: KuraNode) -> None:
    """A module part declared above 10 MiB is refused before its body, with upstream's text."""
    client = Exchange(node)
    client.send(head("POST", part_target(node), f"Content-Length: {10 * MiB + 1}"))
    (response,) = client.responses()
    assert response.status == 413
    assert message(response.body) == "Part exceeds 10MB limit"
    assert_nothing_staged(node)


def test_accepted_upload_gets_100_continue_after_admission(node: KuraNode) -> None:
    """An admissible upload asking for 100 Continue gets it, then its final status."""
    client = Exchange(node)
    client.send(head("POST", CAS.format(id="c1"), "Content-Length: 5", "Expect: 100-continue"))
    assert client.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"hello")
    (response,) = client.responses()
    assert response.status == 204
    assert request(node, "GET", CAS.format(id="c1")).body == b"hello"


def test_existing_key_is_answered_before_its_body(node: KuraNode) -> None:
    """Re-uploading a stored key is answered at once; the body is never read or staged."""
    request(node, "PUT", "/api/cache/gradle/g1?tenant_id=default", b"first")
    client = Exchange(node)
    client.send(
        head(
            "PUT",
            "/api/cache/gradle/g1?tenant_id=default",
            f"Content-Length: {50 * MiB}",
            "Expect: 100-continue",
        )
    )
    written = client.transport.value()
    assert b"100 Continue" not in written
    (response,) = client.responses()
    assert response.status == 200
    assert client.closed
    assert_nothing_staged(node)


# -- chunked bodies past the limit --------------------------------------------------------


def test_chunked_part_growing_past_the_limit_is_cut_with_413(node: KuraNode) -> None:
    """A chunked module part is counted as it arrives and cut with 413 past 10 MiB."""
    client = Exchange(node)
    client.send(head("POST", part_target(node), "Transfer-Encoding: chunked"))
    chunk = b"%x\r\n%s\r\n" % (MiB, b"p" * MiB)
    for _ in range(10):
        client.send(chunk)
    assert client.responses() == []
    client.send(b"1\r\nX\r\n")
    node.reactor.advance(0)  # the cut is answered once the body decoder has returned
    (response,) = client.responses()
    assert response.status == 413
    assert message(response.body) == "Part exceeds 10MB limit"
    assert client.closed
    client.send(chunk + b"0\r\n\r\n")
    assert client.responses() == []
    assert_nothing_staged(node)
    assert files_under(node.store.layout.parts) == []


def test_chunked_keyvalue_past_its_limit_is_413(nodes: Any) -> None:
    """A chunked key-value body past KURA_MAX_KEYVALUE_BYTES is cut with 413."""
    node = nodes.start(KURA_MAX_KEYVALUE_BYTES="64")
    client = Exchange(node)
    client.send(head("PUT", "/api/cache/keyvalue?tenant_id=default", "Transfer-Encoding: chunked"))
    client.send(b"40\r\n" + b"{" * 64 + b"\r\n")
    assert client.responses() == []
    client.send(b"1\r\n}\r\n0\r\n\r\n")
    node.reactor.advance(0)
    (response,) = client.responses()
    assert response.status == 413
    assert message(response.body).startswith("Failed to read key-value request body: ")
    assert client.closed


def test_declared_length_at_the_limit_is_accepted(nodes: Any) -> None:
    """The limit is inclusive: exactly KURA_MAX_KEYVALUE_BYTES is read and parsed."""
    node = nodes.start(KURA_MAX_KEYVALUE_BYTES="64")
    body = json.dumps({"cas_id": "k", "entries": [{"value": ""}]}).encode()
    body += b" " * (64 - len(body))
    assert len(body) == 64
    assert request(node, "PUT", "/api/cache/keyvalue?tenant_id=default", body).status == 204


# -- staging budget -----------------------------------------------------------------------


def test_upload_over_the_tmp_budget_is_503(nodes: Any) -> None:
    """An upload whose declared length cannot fit KURA_TMP_DIR_MAX_BYTES is 503 + Retry-After,
    from its head."""
    node = nodes.start(KURA_TMP_DIR_MAX_BYTES="1000")
    client = Exchange(node)
    client.send(head("POST", CAS.format(id="c1"), "Content-Length: 2000", "Expect: 100-continue"))
    written = client.transport.value()
    assert b"100 Continue" not in written
    (response,) = client.responses()
    assert response.status == 503
    assert response.headers["retry-after"] == "1"
    assert message(response.body).startswith("Temporary storage budget exhausted: ")
    assert client.closed
    assert_nothing_staged(node)
    assert sample(node, "kura_upload_rejections_total", reason="tmp_budget") == 1


def test_reservation_grows_as_the_body_arrives(nodes: Any) -> None:
    """An upload reserves staging budget a step (1 MiB) at a time as its bytes arrive,
    never its declared length up front; the last step stops at that length."""
    node = nodes.start(KURA_TMP_DIR_MAX_BYTES=str(8 * MiB))
    client = Exchange(node)
    client.send(head("POST", CAS.format(id="c1"), f"Content-Length: {2 * MiB + 10}"))
    assert node.store.tmp_budget.used == 0
    client.send(b"x")
    assert node.store.tmp_budget.used == MiB
    assert sample(node, "kura_tmp_dir_bytes") == MiB
    client.send(b"x" * MiB)
    assert node.store.tmp_budget.used == 2 * MiB
    client.send(b"x" * (MiB - 1))
    assert node.store.tmp_budget.used == 2 * MiB
    client.send(b"x")
    assert node.store.tmp_budget.used == 2 * MiB + 10
    client.send(b"x" * 9)
    (done,) = client.responses()
    assert done.status == 204
    assert_nothing_staged(node)
    assert request(node, "GET", CAS.format(id="c1")).body == b"x" * (2 * MiB + 10)


def test_trickling_upload_holds_one_step_not_the_budget(nodes: Any) -> None:
    """An upload that declares the whole budget and trickles holds one step; other uploads
    go on, and when it leaves its step is given back and nothing of it is published."""
    node = nodes.start(KURA_TMP_DIR_MAX_BYTES=str(8 * MiB))
    trickler = Exchange(node)
    trickler.send(head("POST", CAS.format(id="slow"), f"Content-Length: {8 * MiB}"))
    for _ in range(5):
        trickler.send(b"t")
    assert node.store.tmp_budget.used == MiB
    for n in range(3):
        body = bytes([n]) * (4 * MiB)
        assert request(node, "POST", CAS.format(id=f"fast{n}"), body).status == 204
        assert request(node, "GET", CAS.format(id=f"fast{n}")).body == body
    assert trickler.responses() == []
    trickler.disconnect()
    assert_nothing_staged(node)
    assert request(node, "GET", CAS.format(id="slow")).status == 404


def test_declared_length_is_checked_against_the_free_space(nodes: Any) -> None:
    """The head-time check compares a declared length with what is free now: room reserved
    by bodies in flight counts, room they only declared does not."""
    node = nodes.start(KURA_TMP_DIR_MAX_BYTES=str(3 * MiB))
    first = Exchange(node)
    first.send(head("POST", CAS.format(id="c1"), f"Content-Length: {2 * MiB}") + b"x")
    assert node.store.tmp_budget.used == MiB
    second = Exchange(node)
    second.send(
        head("POST", CAS.format(id="c2"), f"Content-Length: {2 * MiB}", "Expect: 100-continue")
    )
    assert second.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    second.send(b"y")
    assert node.store.tmp_budget.used == 2 * MiB
    third = Exchange(node)
    third.send(
        head("POST", CAS.format(id="c3"), f"Content-Length: {2 * MiB}", "Expect: 100-continue")
    )
    assert b"100 Continue" not in third.transport.value()
    (refused,) = third.responses()
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert message(refused.body).startswith("Temporary storage budget exhausted: ")
    assert third.closed
    assert node.store.tmp_budget.used == 2 * MiB


def test_upload_running_out_of_budget_midway_is_refused_and_released(nodes: Any) -> None:
    """An upload whose next step no longer fits is refused mid-body with 503; its file and
    reservation go at once, nothing of it is published, and the others finish."""
    node = nodes.start(KURA_TMP_DIR_MAX_BYTES=str(3 * MiB))
    first = Exchange(node)
    first.send(head("PUT", "/api/metro/cache/m1", f"Content-Length: {2 * MiB}") + b"a" * MiB)
    second = Exchange(node)
    second.send(head("PUT", "/api/metro/cache/m2", f"Content-Length: {2 * MiB}") + b"b" * MiB)
    second.send(b"b")
    assert node.store.tmp_budget.used == 3 * MiB
    first.send(b"a")  # its second step no longer fits
    node.reactor.advance(0)
    (refused,) = first.responses()
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert message(refused.body).startswith("Temporary storage budget exhausted: ")
    assert first.closed
    assert node.store.tmp_budget.used == 2 * MiB
    assert len(files_under(node.store.layout.uploads)) == 1  # the second upload's file
    assert sample(node, "kura_upload_rejections_total", reason="tmp_budget") == 1
    second.send(b"b" * (MiB - 1))
    (done,) = second.responses()
    assert done.status == 200
    assert_nothing_staged(node)
    assert request(node, "GET", "/api/metro/cache/m1").status == 404
    assert request(node, "GET", "/api/metro/cache/m2").body == b"b" * (2 * MiB)


def test_budget_is_released_when_an_upload_is_refused_midway(nodes: Any) -> None:
    """A chunked upload cut by the budget gives every reserved byte back."""
    node = nodes.start(KURA_TMP_DIR_MAX_BYTES=str(2 * MiB))
    client = Exchange(node)
    client.send(head("PUT", "/api/metro/cache/m1", "Transfer-Encoding: chunked"))
    client.send(b"%x\r\n%s\r\n" % (MiB, b"m" * MiB))
    client.send(b"%x\r\n%s\r\n" % (MiB, b"m" * MiB))
    client.send(b"1\r\nm\r\n")
    node.reactor.advance(0)
    (response,) = client.responses()
    assert response.status == 503
    assert message(response.body).startswith("Temporary storage budget exhausted: ")
    assert_nothing_staged(node)
    assert request(node, "GET", "/api/metro/cache/m1").status == 404


def test_module_complete_reserves_the_assembled_copy(nodes: Any) -> None:
    """Assembling a module stages a second copy of its parts: it must fit the budget
    too (503 + Retry-After, upload kept), and complete succeeds once it does."""
    node = nodes.start(KURA_TMP_DIR_MAX_BYTES="1500")
    upload_id = start_upload(node)
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    assert request(node, "POST", part, b"p" * 600).status == 204
    assert node.store.tmp_budget.used == 600
    in_flight = Exchange(node)
    in_flight.send(head("POST", CAS.format(id="c1"), "Content-Length: 800") + b"x")
    assert node.store.tmp_budget.used == 1400
    refused = complete(node, upload_id, [1])
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert message(refused.body).startswith("Temporary storage budget exhausted: ")
    assert request(node, "GET", MODULE).status == 404
    assert node.store.tmp_budget.used == 1400
    in_flight.send(b"x" * 799)
    assert in_flight.responses()[0].status == 204
    assert complete(node, upload_id, [1]).status == 204
    assert node.store.tmp_budget.used == 0
    assert request(node, "GET", MODULE).body == b"p" * 600


# -- write shedding -------------------------------------------------------------------------


def test_writes_are_shed_at_outbox_max_depth(nodes: Any) -> None:
    """At KURA_OUTBOX_MAX_DEPTH every write is 503 + Retry-After (Nx: 409, 'not stored');
    reads and probes still work."""
    node = nodes.start(KURA_OUTBOX_MAX_DEPTH="10")
    request(node, "POST", CAS.format(id="c1"), b"kept")
    node.store.outbox_depth = 10
    for method, target in [
        ("POST", CAS.format(id="c2")),
        ("PUT", "/api/cache/gradle/g?tenant_id=default"),
        ("PUT", "/v1/cache/n"),
        ("PUT", "/api/cache/keyvalue?tenant_id=default"),
        ("DELETE", "/api/cache/clean?tenant_id=default"),
        ("POST", "/api/cache/module/start?tenant_id=default&hash=h&name=n"),
    ]:
        client = Exchange(node)
        client.send(head(method, target, "Content-Length: 4", "Expect: 100-continue"))
        assert b"100 Continue" not in client.transport.value()
        (response,) = client.responses()
        assert response.status == (409 if target.startswith("/v1/cache") else 503), target
        assert response.headers["retry-after"] == "1"
        assert message(response.body) == "server is shedding writes while replication catches up"
    assert request(node, "GET", CAS.format(id="c1")).body == b"kept"
    assert request(node, "GET", "/ready").status == 200
    node.store.outbox_depth = 9
    assert request(node, "POST", CAS.format(id="c2"), b"new").status == 204


def test_critical_memory_pressure_sheds_writes_not_reads(nodes: Any) -> None:
    """Above the hard watermark writes get 503 + Retry-After before any body byte;
    reads and probes go on, and writes resume once the pressure is gone."""
    node = nodes.start(KURA_MEMORY_SOFT_LIMIT_BYTES="1", KURA_MEMORY_HARD_LIMIT_BYTES="2")
    assert node.memory.level is Pressure.CRITICAL  # sampled at start-up
    client = Exchange(node)
    client.send(head("POST", CAS.format(id="m1"), "Content-Length: 4", "Expect: 100-continue"))
    assert b"100 Continue" not in client.transport.value()
    (response,) = client.responses()
    assert response.status == 503
    assert response.headers["retry-after"] == "1"
    assert message(response.body) == "server is shedding writes due to memory pressure"
    assert request(node, "GET", CAS.format(id="m1")).status == 404
    rollout = json.loads(request(node, "GET", "/status/rollout").body)
    assert rollout["memory_pressure_state"] == 2
    node.memory.soft_bytes = node.memory.hard_bytes = 1 << 50
    node.memory.check()
    assert request(node, "POST", CAS.format(id="m1"), b"back").status == 204
    assert json.loads(request(node, "GET", "/status/rollout").body)["memory_pressure_state"] == 0


# -- admission that waits for a store lookup -------------------------------------------------


def test_body_waits_for_a_pending_admission(nodes: Any) -> None:
    """While the existence lookup runs, body bytes are held back and 100 Continue waits."""
    runner = ControlledRunner()
    # Staged bodies: a small in-memory one is not looked up at the head.
    node = nodes.start(runner=runner, KURA_MEMORY_BODY_MAX_BYTES="0")
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "MetadataStore.get_manifest"
    client = Exchange(node)
    client.send(head("POST", CAS.format(id="c1"), "Content-Length: 10", "Expect: 100-continue"))
    assert len(runner.held) == 1
    assert client.transport.value() == b""  # no 100 Continue before the verdict
    client.send(b"early")  # a client that does not wait for 100 Continue
    assert client.transport.producerState == "paused"
    assert files_under(node.store.layout.uploads) == []
    runner.hold = lambda f: False
    runner.release()
    assert client.transport.producerState == "producing"
    client.send(b"-late")
    (response,) = client.responses()
    assert response.status == 204
    assert request(node, "GET", CAS.format(id="c1")).body == b"early-late"


def test_a_small_upload_of_an_unknown_key_waits_for_no_lookup(nodes: Any) -> None:
    """A body received in memory is admitted without a metadata read: the commit decides."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "MetadataStore.get_manifest"
    client = Exchange(node)
    client.send(head("POST", CAS.format(id="c1"), "Content-Length: 5") + b"bytes")
    node.reactor.advance(0)
    assert runner.held == []
    (response,) = client.responses()
    assert response.status == 204
    runner.hold = lambda f: False
    assert request(node, "GET", CAS.format(id="c1")).body == b"bytes"


def test_a_small_duplicate_unknown_at_the_head_loses_at_the_commit(nodes: Any) -> None:
    """With a cold manifest cache a small write-once duplicate is received, then loses.

    The stored artifact stays, the new body is not stored, and the answer is
    the one an upload found at the head gets.
    """
    node = nodes.start()
    request(node, "POST", CAS.format(id="c1"), b"original")
    nodes.stop(node)
    node = nodes.start()  # a cold manifest cache
    assert request(node, "POST", CAS.format(id="c1"), b"replaced!").status == 204
    assert request(node, "GET", CAS.format(id="c1")).body == b"original"
    assert database_bodies(node.config.data_dir) == [("c1", len(b"original"))]
    assert files_under(node.store.layout.blobs) == []
    assert_nothing_staged(node)


def test_existing_key_found_by_a_pending_lookup_skips_the_body(nodes: Any) -> None:
    """An upload found to exist only after an asynchronous lookup still leaves its body unread."""
    node = nodes.start()
    request(node, "POST", CAS.format(id="c1"), b"original")
    nodes.stop(node)
    runner = ControlledRunner()
    # A cold manifest cache, so the lookup goes to SQLite; staged bodies, since
    # a small in-memory one is not looked up at the head.
    node = nodes.start(runner=runner, KURA_MEMORY_BODY_MAX_BYTES="0")
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "MetadataStore.get_manifest"
    client = Exchange(node)
    client.send(head("POST", CAS.format(id="c1"), "Content-Length: 9") + b"replaced!")
    runner.hold = lambda f: False
    runner.release()
    node.reactor.advance(0)
    (response,) = client.responses()
    assert response.status == 204
    assert client.closed
    assert_nothing_staged(node)
    assert request(node, "GET", CAS.format(id="c1")).body == b"original"

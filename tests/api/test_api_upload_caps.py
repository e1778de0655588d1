"""Caps on one client's uploads in flight and on unfinished multipart uploads.

KURA_MAX_UPLOADS_PER_CLIENT counts request bodies being staged per client
(its principal when the extension names one, else its address, as trusted
proxies report it); KURA_MULTIPART_MAX_UNFINISHED counts module uploads
started and not completed or expired. Both refuse with 429 + Retry-After.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, files_under, request, sample, succeeded
from kura.web.request import KuraRequest
from kura.web.upload_slots import TOO_MANY_UPLOADS
from tests.api.test_api_limits import CAS, MiB, head, message
from tests.api.test_api_routes import complete, start_upload

CLIENT = "10.0.0.1"


def in_flight(node: KuraNode, peer: str, key: str, *lines: str) -> Exchange:
    """An upload of 10 bytes from ``peer`` that has sent one of them."""
    client = Exchange(node, peer=peer)
    client.send(head("POST", CAS.format(id=key), "Content-Length: 10", *lines) + b"x")
    assert client.responses() == []
    return client


def upload(node: KuraNode, peer: str, key: str, *lines: str) -> Any:
    """A whole 10-byte upload from ``peer``; returns its one response."""
    client = Exchange(node, peer=peer)
    client.send(
        head("POST", CAS.format(id=key), "Content-Length: 10", "Expect: 100-continue", *lines)
    )
    refused = b"100 Continue" not in client.transport.value()
    if not refused:
        client.send(b"0123456789")
    (response,) = client.responses()
    if refused:
        assert client.closed
    return response


def slots_in_use(node: KuraNode) -> int:
    slots = node.site.upload_slots
    assert slots is not None
    return slots.clients


def assert_too_many(response: Any, status: int = 429) -> None:
    assert response.status == status
    assert response.headers["retry-after"] == "1"
    assert response.headers["connection"] == "close"
    assert message(response.body) == TOO_MANY_UPLOADS


# -- per-client cap ----------------------------------------------------------------------


def test_uploads_over_the_per_client_cap_are_429_from_the_head(nodes: Any) -> None:
    """Past KURA_MAX_UPLOADS_PER_CLIENT bodies in flight, a client's next upload is 429 +
    Retry-After before any body byte (no 100 Continue); other clients go on."""
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="2")
    held = [in_flight(node, CLIENT, "a"), in_flight(node, CLIENT, "b")]
    staged_before = files_under(node.store.layout.uploads)
    budget_before = node.store.tmp_budget.used
    refused = upload(node, CLIENT, "c")
    assert_too_many(refused)
    assert files_under(node.store.layout.uploads) == staged_before
    assert node.store.tmp_budget.used == budget_before
    assert sample(node, "kura_upload_rejections_total", reason="client_uploads") == 1
    assert request(node, "GET", CAS.format(id="c")).status == 404
    assert upload(node, "10.0.0.2", "d").status == 204
    for client in held:
        client.send(b"y" * 9)
        assert client.responses()[0].status == 204
    assert slots_in_use(node) == 0
    assert upload(node, CLIENT, "c").status == 204


def test_nx_sees_its_trouble_status_for_the_cap(nodes: Any) -> None:
    """Nx fails a build on 429: its over-cap upload gets Nx's 409 'not stored', Retry-After kept."""
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="1")
    held = in_flight(node, CLIENT, "a")
    client = Exchange(node, peer=CLIENT)
    client.send(head("PUT", "/v1/cache/n1", "Content-Length: 4") + b"nxnx")
    (response,) = client.responses()
    assert_too_many(response, status=409)
    held.disconnect()


def test_reads_and_bodiless_writes_take_no_upload_slot(nodes: Any) -> None:
    """Downloads, module starts and an upload answered from its head (already stored)
    are not uploads in flight."""
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="1")
    assert upload(node, CLIENT, "stored").status == 204
    held = in_flight(node, CLIENT, "a")
    assert request(node, "GET", CAS.format(id="stored")).status == 200
    existing = Exchange(node, peer=CLIENT)
    existing.send(head("POST", CAS.format(id="stored"), "Content-Length: 10"))
    assert existing.responses()[0].status == 204
    start = Exchange(node, peer=CLIENT).request(
        "POST", "/api/cache/module/start?tenant_id=default&hash=h&name=n"
    )
    assert start.status == 200
    held.disconnect()


def _completed(node: KuraNode, client: Exchange) -> None:
    client.send(b"y" * 9)
    assert client.responses()[0].status == 204


def _client_left(node: KuraNode, client: Exchange) -> None:
    client.disconnect()


def _bad_framing(node: KuraNode, client: Exchange) -> None:
    client.send(b"\r\nZZ\r\n")  # ends the chunk-size line with garbage
    assert client.responses()[0].status == 400


def _over_budget_midway(node: KuraNode, client: Exchange) -> None:
    client.send(b"%x\r\n%s\r\n" % (MiB, b"m" * MiB))  # past the 1 MiB budget
    node.reactor.advance(0)
    assert client.responses()[0].status == 503


ENDINGS: dict[str, tuple[Callable[[KuraNode, Exchange], None], bool]] = {
    "completed": (_completed, False),
    "client gone": (_client_left, False),
    "malformed body": (_bad_framing, True),
    "out of budget midway": (_over_budget_midway, True),
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_the_slot_is_released_however_the_upload_ends(nodes: Any, ending: str) -> None:
    """Completed, refused mid-body or abandoned by its client: the upload's slot comes back."""
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="1", KURA_TMP_DIR_MAX_BYTES=str(MiB))
    end, chunked = ENDINGS[ending]
    client = Exchange(node, peer=CLIENT)
    if chunked:
        client.send(head("PUT", "/api/metro/cache/m1", "Transfer-Encoding: chunked"))
        client.send(b"1\r\nm\r\n")
    else:
        client.send(head("POST", CAS.format(id="c1"), "Content-Length: 10") + b"x")
    assert slots_in_use(node) == 1
    assert_too_many(upload(node, CLIENT, "blocked"))
    end(node, client)
    assert slots_in_use(node) == 0
    assert node.store.tmp_budget.used == 0
    assert upload(node, CLIENT, "next").status == 204


def test_an_upload_refused_at_its_head_gives_its_slot_back(nodes: Any) -> None:
    """A declared length the staging budget cannot hold is refused at once, slot included."""
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="1", KURA_TMP_DIR_MAX_BYTES="100")
    client = Exchange(node, peer=CLIENT)
    client.send(head("POST", CAS.format(id="big"), "Content-Length: 101"))
    assert client.responses()[0].status == 503
    assert slots_in_use(node) == 0
    assert upload(node, CLIENT, "small").status == 204


def test_a_client_gone_during_admission_takes_no_slot(nodes: Any) -> None:
    """A client that leaves while its head is still being admitted never holds a slot."""
    runner = ControlledRunner()
    # Staged bodies: a small in-memory one is not looked up at the head.
    node = nodes.start(
        runner=runner, KURA_MAX_UPLOADS_PER_CLIENT="1", KURA_MEMORY_BODY_MAX_BYTES="0"
    )
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "MetadataStore.get_manifest"
    client = Exchange(node, peer=CLIENT)
    client.send(head("POST", CAS.format(id="c1"), "Content-Length: 10", "Expect: 100-continue"))
    client.disconnect()
    runner.hold = lambda f: False
    runner.release()
    assert slots_in_use(node) == 0
    assert files_under(node.store.layout.uploads) == []
    assert upload(node, CLIENT, "c2").status == 204


EXTENSION = """
from kura.auth import Allow, Anonymous, Principal


def authenticate(ctx):
    token = ctx.bearer_token()
    if token is None:
        return Anonymous(ttl_seconds=0)
    return Principal(token, kind="user", ttl_seconds=0)


def authorize(ctx, principal):
    return Allow(ttl_seconds=0)
"""


def test_an_authenticated_client_is_counted_as_its_principal(nodes: Any, tmp_path: Path) -> None:
    """With a principal the cap follows the principal across addresses, and two principals
    behind one address are two clients; anonymous uploads are counted by address."""
    script = tmp_path / "policy.py"
    script.write_text(textwrap.dedent(EXTENSION))
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="1", KURA_EXTENSION_SCRIPT_PATH=str(script))
    alice = in_flight(node, CLIENT, "a1", "Authorization: Bearer alice")
    assert_too_many(upload(node, "10.0.0.2", "a2", "Authorization: Bearer alice"))
    assert upload(node, CLIENT, "b1", "Authorization: Bearer bob").status == 204
    assert upload(node, CLIENT, "anon1").status == 204  # the address holds no slot
    anonymous = in_flight(node, CLIENT, "anon2")
    assert_too_many(upload(node, CLIENT, "anon3"))
    alice.disconnect()
    anonymous.disconnect()
    assert slots_in_use(node) == 0
    assert upload(node, "10.0.0.2", "a2", "Authorization: Bearer alice").status == 204


def test_trusted_proxies_name_the_client_and_others_cannot(nodes: Any) -> None:
    """Behind a trusted proxy the client is the forwarded address (request.client_address);
    an untrusted peer's X-Forwarded-For is ignored, so it cannot borrow or spend another
    client's slots."""
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="1", KURA_TRUSTED_PROXIES="10.9.0.0/16")
    via_proxy = in_flight(node, "10.9.0.1", "p1", "X-Forwarded-For: 1.2.3.4, 198.51.100.1")
    held = via_proxy.channel.requests[0]
    assert isinstance(held, KuraRequest)
    assert held.client_address == "198.51.100.1"
    # The same client through another proxy of the fleet: one client.
    assert_too_many(upload(node, "10.9.0.2", "p2", "X-Forwarded-For: 198.51.100.1"))
    assert upload(node, "10.9.0.2", "p3", "X-Forwarded-For: 198.51.100.2").status == 204
    # A spoofer cannot spend 198.51.100.1's slot, and is itself counted by its own address.
    assert upload(node, "203.0.113.5", "s1", "X-Forwarded-For: 198.51.100.1").status == 204
    spoofer = in_flight(node, "203.0.113.5", "s2", "X-Forwarded-For: 198.51.100.9")
    assert_too_many(upload(node, "203.0.113.5", "s3", "X-Forwarded-For: 198.51.100.8"))
    via_proxy.disconnect()
    spoofer.disconnect()
    assert slots_in_use(node) == 0


def test_without_trusted_proxies_forwarded_for_is_ignored(nodes: Any) -> None:
    """By default every peer is its own client, whatever X-Forwarded-For says."""
    node = nodes.start(KURA_MAX_UPLOADS_PER_CLIENT="1")
    held = in_flight(node, "10.9.0.1", "p1", "X-Forwarded-For: 198.51.100.1")
    assert held.channel.requests[0].client_address == "10.9.0.1"
    assert upload(node, "10.9.0.2", "p2", "X-Forwarded-For: 10.9.0.1").status == 204
    held.disconnect()


# -- unfinished multipart uploads --------------------------------------------------------


def start(node: KuraNode, name: str) -> Any:
    return request(node, "POST", f"/api/cache/module/start?tenant_id=default&hash=h&name={name}")


def test_module_start_beyond_the_unfinished_cap_is_429(nodes: Any) -> None:
    """At KURA_MULTIPART_MAX_UNFINISHED unfinished uploads, start is 429 + Retry-After and
    counted; completing one makes room."""
    node = nodes.start(KURA_MULTIPART_MAX_UNFINISHED="2")
    first = start(node, "one").json()["upload_id"]
    start(node, "two")
    assert sample(node, "kura_multipart_uploads") == 2
    refused = start(node, "three")
    assert refused.status == 429
    assert refused.headers["retry-after"] == "1"
    assert message(refused.body) == "Too many unfinished multipart uploads"
    assert sample(node, "kura_upload_rejections_total", reason="multipart_unfinished") == 1
    assert sample(node, "kura_multipart_uploads") == 2
    part = f"/api/cache/module/part?upload_id={first}&part_number=1"
    assert request(node, "POST", part, b"m").status == 204
    assert complete(node, first, [1]).status == 204
    assert sample(node, "kura_multipart_uploads") == 1
    assert start(node, "three").status == 200


def test_expiry_makes_room_and_gives_the_parts_budget_back(nodes: Any) -> None:
    """Unfinished uploads' parts hold staging budget; expiry frees both the budget and the
    room under the cap."""
    node = nodes.start(
        KURA_MULTIPART_MAX_UNFINISHED="1",
        KURA_MULTIPART_UPLOAD_TTL_MS="1000",
        KURA_MULTIPART_JANITOR_INTERVAL_MS="1000",
    )
    upload_id = start_upload(node)
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    assert request(node, "POST", part, b"p" * 600).status == 204
    assert node.store.tmp_budget.used == 600
    assert start(node, "more").status == 429
    node.reactor.advance(1)
    node.reactor.advance(1)  # the janitor runs past the TTL
    assert sample(node, "kura_multipart_uploads") == 0
    assert node.store.tmp_budget.used == 0
    assert files_under(node.store.layout.parts) == []
    assert start(node, "more").status == 200


def test_the_unfinished_count_survives_a_restart(nodes: Any) -> None:
    """Unfinished uploads are rows: a restarted node still counts them against the cap."""
    node = nodes.start(KURA_MULTIPART_MAX_UNFINISHED="1")
    upload_id = start_upload(node)
    node = nodes.restart(node, KURA_MULTIPART_MAX_UNFINISHED="1")
    assert sample(node, "kura_multipart_uploads") == 1
    assert start(node, "more").status == 429
    assert (
        request(
            node, "POST", f"/api/cache/module/part?upload_id={upload_id}&part_number=1", b"p"
        ).status
        == 204
    )
    assert complete(node, upload_id, [1]).status == 204
    assert start(node, "more").status == 200


def test_an_upload_abandoned_twice_is_given_back_once(node: KuraNode) -> None:
    """Completion and expiry racing on one upload give back its count and parts' budget once."""
    upload_id = start_upload(node)
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    assert request(node, "POST", part, b"p" * 600).status == 204
    node.store.tmp_budget.reserve(100)  # someone else's bytes in flight
    upload = succeeded(Deferred.fromCoroutine(node.store.upload(upload_id)))
    assert upload is not None
    for _ in range(2):
        succeeded(Deferred.fromCoroutine(node.store.abandon_upload(upload)))
    assert node.store.unfinished_uploads == 0
    assert node.store.tmp_budget.used == 100

"""Peer signatures: what a node signs, what it accepts, and what it refuses (on a Clock)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.config import PeerAuthConfig
from kura.domain.errors import Unauthorized
from kura.replication.peer_auth import (
    DIGEST_HEADER,
    EMPTY_SHA256,
    SIGNATURE_HEADER,
    BadSignature,
    PeerAuthenticator,
    sha256_hex,
)
from kura.telemetry.metrics import KuraMetrics

SECRET = b"a-mesh-secret-of-thirty-two-bytes!"
NEXT = b"the-next-mesh-secret-thirty-two-b!"
PATH = b"/_internal/replicate/artifact"
QUERY = b"producer=gradle&inline=false&namespace_id=&key=k&content_type=x&version_ms=5"
NOW = 1_800_000_000.0


def authenticator(clock: Clock | None = None, **config: Any) -> PeerAuthenticator:
    clock = clock or Clock()
    if not clock.seconds():
        clock.advance(NOW)
    settings = PeerAuthConfig(**{"secret": SECRET, **config})
    return PeerAuthenticator(
        settings, tenant="default", clock=clock, metrics=KuraMetrics(CollectorRegistry())
    )


def as_received(headers: dict[bytes, list[bytes]], tenant: str = "default") -> dict[str, Any]:
    """A signed request's headers as the receiving gate sees them."""
    received = {k.decode().lower(): [v.decode() for v in vs] for k, vs in headers.items()}
    return {"headers": received, "tenant": tenant}


def check(receiver: PeerAuthenticator, headers: dict[str, Any], **overrides: Any) -> Any:
    request = {"method": "PUT", "path": PATH, "query": QUERY, "peer": "10.0.0.2"}
    return receiver.check_request(**{**request, **headers, **overrides})


def test_a_signed_request_is_accepted_with_its_declared_body_digest() -> None:
    """A request signed with the mesh secret is admitted; its body digest is kept."""
    sender, receiver = authenticator(), authenticator()
    digest = sha256_hex(b"body")
    headers, nonce = sender.request_headers("PUT", PATH, QUERY, digest)
    caller = check(receiver, as_received(headers))
    assert caller.signed and caller.nonce == nonce and caller.digest == digest


@pytest.mark.parametrize(
    "tamper",
    [
        {"method": "DELETE"},
        {"path": b"/_internal/replicate/namespace"},
        {"query": QUERY.replace(b"version_ms=5", b"version_ms=9223372036854775807")},
        {"tenant": "other"},
    ],
)
def test_any_change_to_a_signed_request_is_refused(tamper: dict[str, Any]) -> None:
    """Method, target, query and tenant are all covered by the signature."""
    sender, receiver = authenticator(), authenticator()
    headers, _ = sender.request_headers("PUT", PATH, QUERY, EMPTY_SHA256)
    received = as_received(headers)
    with pytest.raises(Unauthorized, match="signature does not match"):
        check(receiver, received, **tamper)


def test_a_swapped_body_digest_is_refused() -> None:
    """The declared digest is signed: a different one does not verify."""
    sender, receiver = authenticator(), authenticator()
    headers, _ = sender.request_headers("PUT", PATH, QUERY, sha256_hex(b"real"))
    headers[DIGEST_HEADER] = [sha256_hex(b"poison").encode()]
    with pytest.raises(Unauthorized):
        check(receiver, as_received(headers))


def test_unsigned_and_foreign_requests_are_refused() -> None:
    """No signature, or one made with another secret, is a 401."""
    receiver = authenticator()
    with pytest.raises(Unauthorized, match="not signed"):
        check(receiver, {"headers": {}, "tenant": "default"})
    stranger = authenticator(secret=b"x" * 40)
    headers, _ = stranger.request_headers("PUT", PATH, QUERY)
    with pytest.raises(Unauthorized, match="does not hold"):
        check(receiver, as_received(headers))


def test_a_replayed_request_is_refused() -> None:
    """The same signed request is accepted once; its second arrival is a replay."""
    sender, receiver = authenticator(), authenticator()
    headers, _ = sender.request_headers("PUT", PATH, QUERY)
    check(receiver, as_received(headers))
    with pytest.raises(Unauthorized, match="already received"):
        check(receiver, as_received(headers))


def test_a_request_outside_the_clock_skew_window_is_refused() -> None:
    """A request signed more than KURA_MAX_CLOCK_SKEW_MS ago (or ahead) is refused."""
    clock = Clock()
    sender = authenticator(clock, max_clock_skew_ms=60_000)
    headers, _ = sender.request_headers("PUT", PATH, QUERY)
    late = Clock()
    late.advance(NOW + 61)
    with pytest.raises(Unauthorized, match="outside"):
        check(authenticator(late, max_clock_skew_ms=60_000), as_received(headers))
    early = Clock()
    early.advance(NOW - 61)
    with pytest.raises(Unauthorized, match="outside"):
        check(authenticator(early, max_clock_skew_ms=60_000), as_received(headers))


def test_secrets_rotate_without_downtime() -> None:
    """Nodes holding both secrets accept either, whichever one their peer signs with."""
    old_node = authenticator(secret=SECRET, next_secret=NEXT)
    new_node = authenticator(secret=NEXT, next_secret=SECRET)
    for sender, receiver in ((old_node, new_node), (new_node, old_node)):
        headers, nonce = sender.request_headers("GET", PATH, b"")
        caller = check(receiver, as_received(headers), method="GET", query=b"")
        # The answer is signed with the key the request came with.
        response = dict(receiver.response_headers(caller, 200, EMPTY_SHA256))
        received = {k.decode().lower(): [v.decode()] for k, v in response.items()}
        sender.check_response(nonce, 200, received, EMPTY_SHA256)


def test_a_response_is_accepted_only_for_its_request_status_and_body() -> None:
    """Responses are signed over the request nonce, the status and the body digest."""
    client, server = authenticator(), authenticator()
    headers, nonce = client.request_headers("GET", PATH, b"")
    caller = check(server, as_received(headers), method="GET", query=b"")
    digest = sha256_hex(b'{"manifests":[]}')
    signed = {
        k.decode().lower(): [v.decode()] for k, v in server.response_headers(caller, 200, digest)
    }
    client.check_response(nonce, 200, signed, digest)
    with pytest.raises(BadSignature):
        client.check_response(nonce, 200, signed, sha256_hex(b"poisoned page"))
    with pytest.raises(BadSignature):
        client.check_response(nonce, 204, signed, digest)
    with pytest.raises(BadSignature):
        client.check_response("0" * 32, 200, signed, digest)
    with pytest.raises(BadSignature, match="not signed"):
        client.check_response(nonce, 200, {}, digest)


def test_unsigned_peers_are_accepted_only_until_the_window_closes() -> None:
    """During a rolling upgrade unsigned traffic passes; after the deadline it does not."""
    clock = Clock()
    until_ms = int((NOW + 3600) * 1000)
    node = authenticator(clock, accept_unsigned_until_ms=until_ms)
    caller = check(node, {"headers": {}, "tenant": "default"})
    assert not caller.signed
    assert node.response_headers(caller, 200, EMPTY_SHA256) == []
    node.check_response("", 200, {}, EMPTY_SHA256)
    # A signature that is present must still verify, window or not.
    forged = {SIGNATURE_HEADER.decode().lower(): ["v1 0000 AAAA"]}
    with pytest.raises(Unauthorized):
        check(node, {"headers": forged, "tenant": "default"})
    clock.advance(3600)
    with pytest.raises(Unauthorized, match="not signed"):
        check(node, {"headers": {}, "tenant": "default"})
    with pytest.raises(BadSignature):
        node.check_response("", 200, {}, EMPTY_SHA256)


def test_a_node_without_a_secret_neither_signs_nor_checks() -> None:
    """Loopback-only or mTLS-only nodes send no signature headers and accept any."""
    node = authenticator(secret=None)
    assert node.request_headers("GET", PATH, b"") == ({}, "")
    assert not check(node, {"headers": {}, "tenant": "default"}).signed

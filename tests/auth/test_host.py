"""The host helpers: JWT verification, the JSON HTTP client, signing, env, secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import jwt
import pytest
from klein import Klein
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest

from kura.auth import (
    ExtensionConfig,
    ExtensionHost,
    HttpClientError,
    TokenInvalid,
    UnknownResource,
    constant_time_equals,
)
from kura.telemetry.metrics import KuraMetrics
from kura.testing import failed, succeeded
from tests.auth.support import sample

SECRET = "a-shared-secret-long-enough-for-hs512-which-wants-64-bytes-of-key!"


def host(clock: Clock, metrics: KuraMetrics, agent: Any = None, **environ: str) -> ExtensionHost:
    config = ExtensionConfig.from_environ(environ)
    return ExtensionHost(
        config,
        reactor=clock,
        metrics=metrics,
        agent_for=None if agent is None else (lambda client: agent),
    )


def token(clock: Clock, algorithm: str = "HS256", secret: str = SECRET, **claims: Any) -> str:
    payload = {"sub": "user-1", "exp": clock.seconds() + 600, **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


# -- JWT ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_jwt_verify_returns_claims(algorithm: str, clock: Clock, metrics: KuraMetrics) -> None:
    """A token signed with the verifier's algorithm and secret yields its claims (any id case)."""
    kura = host(
        clock,
        metrics,
        KURA_EXTENSION_JWT_VERIFIER_TUIST_SECRET=SECRET,
        KURA_EXTENSION_JWT_VERIFIER_TUIST_ALGORITHM=algorithm,
    )
    claims = kura.jwt_verify("tuist", token(clock, algorithm, projects=["acme/ios"]))
    assert claims["sub"] == "user-1" and claims["projects"] == ["acme/ios"]


def test_jwt_issuer_and_audience_are_checked(clock: Clock, metrics: KuraMetrics) -> None:
    """With an issuer and audiences configured, tokens must match them."""
    kura = host(
        clock,
        metrics,
        KURA_EXTENSION_JWT_VERIFIER_T_SECRET=SECRET,
        KURA_EXTENSION_JWT_VERIFIER_T_ISSUER="tuist",
        KURA_EXTENSION_JWT_VERIFIER_T_AUDIENCES="kura,cache",
    )
    assert kura.jwt_verify("t", token(clock, iss="tuist", aud="cache"))
    assert kura.jwt_verify("t", token(clock, iss="tuist", aud=["other", "kura"]))
    for bad in (
        token(clock, iss="evil", aud="kura"),
        token(clock, aud="kura"),
        token(clock, iss="tuist", aud="other"),
        token(clock, iss="tuist"),
    ):
        with pytest.raises(TokenInvalid):
            kura.jwt_verify("t", bad)


def test_jwt_without_configured_audience_accepts_any_aud(
    clock: Clock, metrics: KuraMetrics
) -> None:
    """Without configured audiences a token's aud claim is not checked."""
    kura = host(clock, metrics, KURA_EXTENSION_JWT_VERIFIER_T_SECRET=SECRET)
    assert kura.jwt_verify("t", token(clock, aud="anything"))["aud"] == "anything"


def test_jwt_time_claims_use_the_injected_clock(clock: Clock, metrics: KuraMetrics) -> None:
    """exp is required and checked against the host clock with 60 s leeway, as is nbf."""
    kura = host(clock, metrics, KURA_EXTENSION_JWT_VERIFIER_T_SECRET=SECRET)
    expiring = token(clock, exp=clock.seconds() + 10)
    clock.advance(70)
    assert kura.jwt_verify("t", expiring)
    clock.advance(0.5)
    with pytest.raises(TokenInvalid, match="expired"):
        kura.jwt_verify("t", expiring)
    with pytest.raises(TokenInvalid, match="exp"):
        kura.jwt_verify("t", jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"))
    with pytest.raises(TokenInvalid, match="not valid yet"):
        kura.jwt_verify("t", token(clock, nbf=clock.seconds() + 61))
    with pytest.raises(TokenInvalid):
        kura.jwt_verify("t", token(clock, exp="tomorrow"))


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-jwt",
        "",
        "Bearer \xe9",
        "a.b.c",
        "x" * 20000,
    ],
)
def test_malformed_tokens_raise_only_token_invalid(
    bad: str, clock: Clock, metrics: KuraMetrics
) -> None:
    """Garbage, non-ASCII and oversized input raise TokenInvalid, never anything else."""
    kura = host(clock, metrics, KURA_EXTENSION_JWT_VERIFIER_T_SECRET=SECRET)
    with pytest.raises(TokenInvalid):
        kura.jwt_verify("t", bad)


def test_forged_tokens_are_refused(clock: Clock, metrics: KuraMetrics) -> None:
    """A wrong secret, another HMAC algorithm, or alg=none are refused."""
    kura = host(clock, metrics, KURA_EXTENSION_JWT_VERIFIER_T_SECRET=SECRET)
    forged = [
        token(clock, secret=SECRET.upper()),
        token(clock, algorithm="HS512"),
        jwt.encode({"sub": "x", "exp": clock.seconds() + 60}, None, algorithm="none"),
    ]
    for bad in forged:
        with pytest.raises(TokenInvalid):
            kura.jwt_verify("t", bad)


def test_unknown_resources_raise_unknown_resource(clock: Clock, metrics: KuraMetrics) -> None:
    """Naming a verifier, client or signer that is not configured raises UnknownResource."""
    kura = host(clock, metrics)
    with pytest.raises(UnknownResource):
        kura.jwt_verify("nope", "x")
    with pytest.raises(UnknownResource):
        kura.sign_hmac_base64("nope", "x")
    assert isinstance(failed(Deferred.fromCoroutine(kura.http_json("nope", "/"))), UnknownResource)
    assert not kura.has_http_client("nope")


# -- signing, env, secrets ---------------------------------------------------------------


def test_sign_hmac_base64_uses_the_decoded_key(clock: Clock, metrics: KuraMetrics) -> None:
    """The signer key is the base64-decoded secret; the MAC is standard base64."""
    raw = b"\x00\xffraw key"
    kura = host(clock, metrics, KURA_EXTENSION_SIGNER_LICENSE_SECRET=base64.b64encode(raw).decode())
    expected = base64.b64encode(hmac.new(raw, "payload é".encode(), hashlib.sha256).digest())
    assert kura.sign_hmac_base64("license", "payload é") == expected.decode()
    assert kura.sign_hmac_base64("LICENSE", "payload é".encode()) == expected.decode()


def test_env_reads_the_node_environment(clock: Clock, metrics: KuraMetrics) -> None:
    """env(name) returns a variable of the environment the node started with, or None."""
    kura = host(clock, metrics, TUIST_CLIENT_ID="kura-node")
    assert kura.env("TUIST_CLIENT_ID") == "kura-node"
    assert kura.env("MISSING") is None


@pytest.mark.parametrize(
    ("given", "expected", "equal"),
    [
        ("secret", "secret", True),
        ("secret", "secreT", False),
        ("s", "secret", False),
        ("t\xe9", "t\xe9", True),
        ("t\xe9", "te", False),
        (b"\xff", "\xff", False),
        ("\ud800", "x", False),
    ],
)
def test_constant_time_equals_never_raises(
    given: str | bytes, expected: str | bytes, equal: bool
) -> None:
    """Secrets compare by SHA-256 digest: any length, non-ASCII or odd text, without error."""
    assert constant_time_equals(given, expected) is equal
    assert ExtensionHost.constant_time_equals(given, expected) is equal


# -- HTTP client ------------------------------------------------------------------------

backend = Klein()
seen: list[IRequest] = []


@backend.route("/echo", methods=["GET", "POST"])
def echo(request: IRequest) -> bytes:
    seen.append(request)
    request.setHeader(b"content-type", b"application/json")
    auth = request.getHeader(b"authorization") or b""
    query = request.args.get(b"q", [b""])[0]
    return b'{"auth": "%s", "q": "%s"}' % (auth, query)


@backend.route("/text")
def text(request: IRequest) -> bytes:
    request.setResponseCode(502)
    return b"<html>bad gateway</html>"


@backend.route("/big")
def big(request: IRequest) -> bytes:
    return b"[" + b"0," * (600 * 1024) + b"0]"


class FailingAgent:
    """Fails the first ``failures`` requests with ``error``, then serves ``backend``."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionRefusedError()
        self.calls = 0
        self.inner = RequestTraversalAgent(backend.resource())

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        if self.calls <= self.failures:
            return fail(self.error)
        return self.inner.request(*args, **kwargs)


CLIENT = {"KURA_EXTENSION_HTTP_CLIENT_BACKEND_BASE_URL": "http://backend.test/"}


def test_http_json_sends_and_parses_json(clock: Clock, metrics: KuraMetrics) -> None:
    """A request carries headers and query; the JSON body and status come back."""
    agent = FailingAgent(0)
    kura = host(clock, metrics, agent, **CLIENT)
    call = Deferred.fromCoroutine(
        kura.http_json("backend", "echo", headers={"authorization": "Bearer t"}, query={"q": "a b"})
    )
    agent.inner.flush()
    response = succeeded(call)
    assert response.status == 200
    assert response.body == {"auth": "Bearer t", "q": "a b"}
    assert response.headers["content-type"] == "application/json"
    assert (
        sample(metrics, "kura_extension_http_client_requests_total", client="BACKEND", result="2xx")
        == 1
    )


def test_http_json_returns_non_json_bodies_as_none(clock: Clock, metrics: KuraMetrics) -> None:
    """A non-JSON body (an HTML error page) gives body None and the status, not an exception."""
    agent = FailingAgent(0)
    kura = host(clock, metrics, agent, **CLIENT)
    call = Deferred.fromCoroutine(kura.http_json("backend", "/text"))
    agent.inner.flush()
    response = succeeded(call)
    assert (response.status, response.body) == (502, None)
    assert response.raw.startswith(b"<html>")


@pytest.mark.parametrize("error", [ConnectionRefusedError(), DNSLookupError("no such host")])
def test_network_errors_are_retried_once_after_100ms(
    error: Exception, clock: Clock, metrics: KuraMetrics
) -> None:
    """One network failure is retried after 100 ms on the clock; the retry's answer is returned."""
    agent = FailingAgent(1, error)
    kura = host(clock, metrics, agent, **CLIENT)
    call = Deferred.fromCoroutine(kura.http_json("backend", "/echo"))
    assert agent.calls == 1
    clock.advance(0.099)
    assert agent.calls == 1
    clock.advance(0.001)
    agent.inner.flush()
    assert agent.calls == 2
    assert succeeded(call).status == 200


def test_a_second_network_error_fails(clock: Clock, metrics: KuraMetrics) -> None:
    """Two network failures in a row raise HttpClientError (no third attempt)."""
    agent = FailingAgent(5)
    kura = host(clock, metrics, agent, **CLIENT)
    call = Deferred.fromCoroutine(kura.http_json("backend", "/echo"))
    clock.advance(0.1)
    assert isinstance(failed(call), HttpClientError)
    assert agent.calls == 2
    assert (
        sample(
            metrics, "kura_extension_http_client_requests_total", client="BACKEND", result="connect"
        )
        == 2
    )


def test_slow_responses_time_out_without_retry(clock: Clock, metrics: KuraMetrics) -> None:
    """An attempt past the request timeout fails with HttpClientError and is not retried."""
    cancelled: list[object] = []

    class Silent:
        calls = 0

        def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            self.calls += 1
            return Deferred(cancelled.append)

    agent = Silent()
    kura = host(
        clock, metrics, agent, KURA_EXTENSION_HTTP_CLIENT_BACKEND_REQUEST_TIMEOUT_MS="200", **CLIENT
    )
    call = Deferred.fromCoroutine(kura.http_json("backend", "/echo"))
    clock.advance(0.2)
    assert isinstance(failed(call), HttpClientError)
    assert agent.calls == 1 and len(cancelled) == 1
    assert (
        sample(
            metrics, "kura_extension_http_client_requests_total", client="BACKEND", result="timeout"
        )
        == 1
    )


def test_oversized_bodies_are_refused(clock: Clock, metrics: KuraMetrics) -> None:
    """A response body over 1 MiB raises HttpClientError."""
    agent = FailingAgent(0)
    kura = host(clock, metrics, agent, **CLIENT)
    call = Deferred.fromCoroutine(kura.http_json("backend", "/big"))
    agent.inner.flush()
    assert isinstance(failed(call), HttpClientError)

"""ExtensionAuthorizer: the hook contract, caching, deadlines and fail-closed paths."""

from __future__ import annotations

import base64
import hashlib
import hmac
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kura.auth import (
    ANONYMOUS,
    Allow,
    Anonymous,
    Deny,
    Headers,
    HookContext,
    IRequestAuthorizer,
    OpenAccess,
    Principal,
    SignRequest,
)
from kura.domain.errors import Forbidden, KuraError, ServiceUnavailable, Unauthorized
from kura.telemetry.metrics import KuraMetrics
from kura.testing import failed, succeeded
from tests.auth.support import authorizer, context, run, sample

SIGNER_KEY = b"signing-key-bytes"
SIGNER_ENV = {"KURA_EXTENSION_SIGNER_PRIMARY_SECRET": base64.b64encode(SIGNER_KEY).decode()}


class Policy:
    """An extension that counts its calls and answers what the test sets."""

    def __init__(self) -> None:
        self.authenticated: list[HookContext] = []
        self.authorized: list[tuple[HookContext, Principal | None]] = []
        self.authenticate_result: Any = Principal("user-1", "user", {"projects": ["acme/ios"]})
        self.authorize_result: Any = Allow()

    def authenticate(self, ctx: HookContext) -> Any:
        self.authenticated.append(ctx)
        result = self.authenticate_result
        return result() if callable(result) else result

    def authorize(self, ctx: HookContext, principal: Principal | None) -> Any:
        self.authorized.append((ctx, principal))
        result = self.authorize_result
        return result() if callable(result) else result


def check(auth: Any, ctx: HookContext | None = None) -> Deferred[Any]:
    return run(auth.check, ctx or context())


def headers_of(auth: Any, principal: Any = ANONYMOUS, **fields: Any) -> Deferred[Any]:
    return run(auth.response_headers, context(status_code=200, **fields), principal)


def raise_error() -> Any:
    raise RuntimeError("policy bug")


def hang() -> Deferred[Any]:
    return Deferred()


# -- contract and defaults -------------------------------------------------------


def test_an_extension_without_hooks_is_anonymous_and_allowed(
    clock: Clock, metrics: KuraMetrics
) -> None:
    """Missing hooks mean anonymous, allow and no headers, without running anything."""
    auth = authorizer(SimpleNamespace(), clock, metrics)
    assert succeeded(check(auth)) == ANONYMOUS
    assert succeeded(headers_of(auth)) == []
    assert (
        sample(metrics, "kura_extension_cache_lookups_total", cache="authenticate", result="miss")
        == 0
    )


def test_every_authorizer_provides_the_interface() -> None:
    """The extension runner and the built-in authorizers all provide IRequestAuthorizer."""
    clock = Clock()
    from prometheus_client import CollectorRegistry

    from kura.auth import AccessConfig, TokenAccess

    metrics = KuraMetrics(CollectorRegistry())
    extension = authorizer(Policy(), clock, metrics)
    assert verifyObject(IRequestAuthorizer, extension)
    assert extension.mode == "extension"
    assert extension.checks("artifact.read") and extension.checks("request")
    assert verifyObject(IRequestAuthorizer, OpenAccess())
    assert verifyObject(IRequestAuthorizer, TokenAccess(AccessConfig()))


@pytest.mark.parametrize("shape", ["value", "deferred", "coroutine"])
def test_hooks_may_return_values_deferreds_or_coroutines(
    shape: str, clock: Clock, metrics: KuraMetrics
) -> None:
    """A hook's result may come directly, through a Deferred, or from a coroutine."""
    principal = Principal("user-1")

    def wrap(result: object) -> Any:
        if shape == "deferred":
            return succeed(result)
        if shape == "coroutine":

            async def later() -> object:
                return result

            return later()
        return result

    extension = SimpleNamespace(
        authenticate=lambda ctx: wrap(principal),
        authorize=lambda ctx, who: wrap(Allow()),
        response_headers=lambda ctx, who: wrap(Headers({"x-cache": "hit"})),
    )
    auth = authorizer(extension, clock, metrics)
    assert succeeded(check(auth)) == principal
    assert succeeded(headers_of(auth, principal)) == [(b"x-cache", b"hit")]
    assert clock.getDelayedCalls() == []  # no deadline outlives its hook call
    assert sample(metrics, "kura_extension_hook_calls_total", hook="authorize", result="ok") == 1


def test_authorize_sees_the_principal_or_none(clock: Clock, metrics: KuraMetrics) -> None:
    """authorize gets the authenticated principal, and None for an anonymous caller."""
    policy = Policy()
    auth = authorizer(policy, clock, metrics)
    succeeded(check(auth))
    assert policy.authorized[-1][1] == policy.authenticate_result
    policy.authenticate_result = Anonymous()
    assert succeeded(check(auth, context(headers={"authorization": "Bearer other"}))) == Anonymous()
    assert policy.authorized[-1][1] is None


@pytest.mark.parametrize(
    ("status", "kind"), [(401, Unauthorized), (403, Forbidden), (503, ServiceUnavailable)]
)
def test_denies_raise_the_hooks_status_and_message(
    status: int, kind: type[KuraError], clock: Clock, metrics: KuraMetrics
) -> None:
    """A deny from either hook raises the matching KuraError with the hook's message."""
    policy = Policy()
    policy.authenticate_result = Deny(status, "from authenticate")
    error = failed(check(authorizer(policy, clock, metrics)))
    assert isinstance(error, kind) and error.message == "from authenticate"
    policy = Policy()
    policy.authorize_result = Deny(status, "from authorize")
    error = failed(check(authorizer(policy, clock, metrics)))
    assert isinstance(error, kind) and error.message == "from authorize"
    assert policy.authorized
    assert sample(metrics, "kura_extension_hook_calls_total", hook="authorize", result="deny") == 1


# -- caching ------------------------------------------------------------------------


def test_authentication_is_cached_per_credentials(clock: Clock, metrics: KuraMetrics) -> None:
    """Requests with the same credential headers share one authenticate call; noise is ignored."""
    policy = Policy()
    auth = authorizer(policy, clock, metrics)
    succeeded(check(auth, context(headers={"authorization": "Bearer a", "traceparent": "1"})))
    succeeded(check(auth, context(headers={"Authorization": "Bearer a", "traceparent": "2"})))
    assert len(policy.authenticated) == 1
    succeeded(check(auth, context(headers={"authorization": "Bearer a", "cookie": "s=1"})))
    succeeded(check(auth, context(headers={"authorization": "Bearer b"})))
    assert len(policy.authenticated) == 3
    assert (
        sample(metrics, "kura_extension_cache_lookups_total", cache="authenticate", result="hit")
        == 1
    )


def test_authorization_is_cached_per_request_target(clock: Clock, metrics: KuraMetrics) -> None:
    """authorize runs again when anything the request acts on or arrives by differs."""
    policy = Policy()
    auth = authorizer(policy, clock, metrics)
    succeeded(check(auth))
    succeeded(check(auth))
    assert len(policy.authorized) == 1
    changes: list[dict[str, Any]] = [
        {"namespace_id": "android"},
        {"tenant_id": "other"},
        {"operation": "artifact.write", "method": "PUT"},
        {"route": "/api/cache/gradle/{cache_key}"},
        {"producer": "gradle"},
        {"artifact_key": "blob/other"},
        {"transport": "h2"},
    ]
    for changed in changes:
        succeeded(check(auth, context(**changed)))
    assert len(policy.authorized) == 1 + len(changes)
    assert len(policy.authenticated) == 1


def test_an_allow_for_one_key_is_not_an_allow_for_another(
    clock: Clock, metrics: KuraMetrics
) -> None:
    """By default a cached allow answers only the artifact it was given for."""
    policy = Policy()
    policy.authorize_result = lambda: (
        Allow() if policy.authorized[-1][0].artifact_key == "blob/mine" else Deny(403, "no")
    )
    auth = authorizer(policy, clock, metrics)
    succeeded(check(auth, context(artifact_key="blob/mine")))
    assert isinstance(failed(check(auth, context(artifact_key="blob/theirs"))), Forbidden)


def test_a_namespace_scoped_result_answers_every_key_of_its_namespace(
    clock: Clock, metrics: KuraMetrics
) -> None:
    """Allow(scope="namespace") is shared by the namespace's keys, and only by them."""
    policy = Policy()
    policy.authorize_result = Allow(scope="namespace")
    auth = authorizer(policy, clock, metrics)
    for key in ("blob/a", "blob/b", "blob/c"):
        succeeded(check(auth, context(artifact_key=key)))
    assert len(policy.authorized) == 1
    succeeded(check(auth, context(artifact_key="blob/a", namespace_id="android")))
    succeeded(check(auth, context(artifact_key="blob/a", operation="artifact.write")))
    assert len(policy.authorized) == 3
    policy.authorize_result = Deny(403, "not yours", scope="namespace")
    auth = authorizer(policy, clock, metrics)
    assert isinstance(failed(check(auth, context(artifact_key="blob/a"))), Forbidden)
    assert isinstance(failed(check(auth, context(artifact_key="blob/b"))), Forbidden)
    assert len(policy.authorized) == 4


def test_a_result_scope_must_be_request_or_namespace() -> None:
    """Any other scope is a hook error (fail closed), not a silently wider grant."""
    with pytest.raises(ValueError, match="scope must be one of"):
        Allow(scope="tenant")


def test_a_different_principal_is_authorized_again(clock: Clock, metrics: KuraMetrics) -> None:
    """The authorize key includes the principal, attributes and all."""
    policy = Policy()
    auth = authorizer(policy, clock, metrics, KURA_EXTENSION_AUTH_CACHE_ALLOW_TTL_SECONDS="0")
    policy.authenticate_result = Principal("u", attributes={"projects": ["a"]}, ttl_seconds=0)
    succeeded(check(auth))
    policy.authenticate_result = Principal("u", attributes={"projects": ["b"]}, ttl_seconds=0)
    succeeded(check(auth))
    assert len(policy.authorized) == 2


def test_hook_ttls_and_default_ttls_expire_on_the_clock(clock: Clock, metrics: KuraMetrics) -> None:
    """A result's ttl_seconds wins over the defaults; entries expire as the clock advances."""
    policy = Policy()
    policy.authenticate_result = lambda: Principal("u", ttl_seconds=60)
    auth = authorizer(policy, clock, metrics, KURA_EXTENSION_AUTH_CACHE_ALLOW_TTL_SECONDS="5")
    succeeded(check(auth))
    clock.advance(59)
    succeeded(check(auth))
    assert (len(policy.authenticated), len(policy.authorized)) == (1, 2)
    clock.advance(1)
    succeeded(check(auth))
    assert len(policy.authenticated) == 2


def test_denies_are_cached_for_the_deny_ttl(clock: Clock, metrics: KuraMetrics) -> None:
    """A deny without ttl_seconds is cached for KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS (3 s)."""
    policy = Policy()
    policy.authenticate_result = Deny(401, "no")
    auth = authorizer(policy, clock, metrics)
    failed(check(auth))
    clock.advance(2.9)
    failed(check(auth))
    assert len(policy.authenticated) == 1
    clock.advance(0.1)
    failed(check(auth))
    assert len(policy.authenticated) == 2


def test_zero_ttl_results_are_never_cached(clock: Clock, metrics: KuraMetrics) -> None:
    """ttl_seconds=0 makes every request run the hook."""
    policy = Policy()
    policy.authenticate_result = Principal("u", ttl_seconds=0)
    policy.authorize_result = Allow(ttl_seconds=0)
    auth = authorizer(policy, clock, metrics)
    for _ in range(3):
        succeeded(check(auth))
    assert (len(policy.authenticated), len(policy.authorized)) == (3, 3)


def test_a_full_cache_rejects_new_entries(clock: Clock, metrics: KuraMetrics) -> None:
    """With KURA_EXTENSION_CACHE_MAX_ENTRIES reached, new results are used but not cached."""
    policy = Policy()
    auth = authorizer(policy, clock, metrics, KURA_EXTENSION_CACHE_MAX_ENTRIES="1")
    succeeded(check(auth, context(headers={"authorization": "Bearer a"})))
    succeeded(check(auth, context(headers={"authorization": "Bearer b"})))
    succeeded(check(auth, context(headers={"authorization": "Bearer b"})))
    assert len(policy.authenticated) == 3
    assert (
        sample(
            metrics, "kura_extension_cache_lookups_total", cache="authenticate", result="rejected"
        )
        == 2
    )


def test_clear_caches_forgets_results(clock: Clock, metrics: KuraMetrics) -> None:
    """clear_caches drops both caches, so the next request runs the hooks again."""
    policy = Policy()
    auth = authorizer(policy, clock, metrics)
    succeeded(check(auth))
    assert auth.clear_caches() == 2
    succeeded(check(auth))
    assert (len(policy.authenticated), len(policy.authorized)) == (2, 2)


def test_concurrent_checks_run_the_hook_once(clock: Clock, metrics: KuraMetrics) -> None:
    """Two concurrent checks with the same credentials share one authenticate call."""
    pending: list[Deferred[Any]] = []
    calls = []

    def authenticate(ctx: HookContext) -> Deferred[Any]:
        calls.append(ctx)
        pending.append(Deferred())
        return pending[-1]

    auth = authorizer(SimpleNamespace(authenticate=authenticate), clock, metrics)
    first, second = check(auth), check(auth)
    assert len(calls) == 1 and not first.called and not second.called
    pending[0].callback(Principal("u"))
    assert succeeded(first) == succeeded(second) == Principal("u")
    assert (
        sample(
            metrics, "kura_extension_cache_lookups_total", cache="authenticate", result="coalesced"
        )
        == 1
    )


# -- deadlines and fail-closed ------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour", [raise_error, hang, lambda: None, lambda: {"principal": "x"}, Allow]
)
def test_a_failing_authenticate_is_401(behaviour: Any, clock: Clock, metrics: KuraMetrics) -> None:
    """An authenticate hook that raises, hangs past the deadline or returns garbage gives 401."""
    policy = Policy()
    policy.authenticate_result = behaviour
    auth = authorizer(policy, clock, metrics)
    attempt = check(auth)
    clock.advance(1.0)  # the default 1000 ms deadline
    error = failed(attempt)
    assert isinstance(error, Unauthorized) and error.message == "Authentication failed"
    assert not policy.authorized


@pytest.mark.parametrize("behaviour", [raise_error, hang, lambda: True, lambda: Principal("x")])
def test_a_failing_authorize_is_403(behaviour: Any, clock: Clock, metrics: KuraMetrics) -> None:
    """An authorize hook that raises, hangs past the deadline or returns garbage gives 403."""
    policy = Policy()
    policy.authorize_result = behaviour
    auth = authorizer(policy, clock, metrics)
    attempt = check(auth)
    clock.advance(1.0)
    error = failed(attempt)
    assert isinstance(error, Forbidden) and error.message == "Forbidden"


def test_failures_are_counted_and_not_cached(clock: Clock, metrics: KuraMetrics) -> None:
    """Each failure kind has its metric, and a failed hook runs again on the next request."""
    policy = Policy()
    auth = authorizer(policy, clock, metrics, KURA_EXTENSION_HOOK_TIMEOUT_MS="50")
    for behaviour in (raise_error, hang, lambda: None):
        policy.authenticate_result = behaviour
        attempt = check(auth)
        clock.advance(0.05)
        failed(attempt)
    assert len(policy.authenticated) == 3
    for result in ("error", "timeout", "invalid"):
        assert (
            sample(metrics, "kura_extension_hook_calls_total", hook="authenticate", result=result)
            == 1
        )
    assert sample(
        metrics, "kura_extension_hook_duration_seconds_sum", hook="authenticate"
    ) == pytest.approx(0.05)


def test_the_deadline_cancels_the_hooks_work(clock: Clock, metrics: KuraMetrics) -> None:
    """When the deadline passes, the hook's pending Deferred is cancelled."""
    cancelled: list[Deferred[Any]] = []
    pending: Deferred[Any] = Deferred(cancelled.append)
    auth = authorizer(SimpleNamespace(authenticate=lambda ctx: pending), clock, metrics)
    attempt = check(auth)
    clock.advance(0.999)
    assert not attempt.called and not cancelled
    clock.advance(0.001)
    assert isinstance(failed(attempt), Unauthorized)
    assert cancelled == [pending]


def test_a_hook_raising_cancelled_error_is_a_hook_failure(
    clock: Clock, metrics: KuraMetrics
) -> None:
    """A CancelledError from inside the hook is its failure (401), not a client going away."""

    def authenticate(ctx: HookContext) -> Any:
        raise CancelledError()

    auth = authorizer(SimpleNamespace(authenticate=authenticate), clock, metrics)
    assert isinstance(failed(check(auth)), Unauthorized)


def test_a_caller_going_away_cancels_without_blame(clock: Clock, metrics: KuraMetrics) -> None:
    """Cancelling check() cancels the hook and is not counted as a hook failure."""
    cancelled: list[Deferred[Any]] = []
    pending: Deferred[Any] = Deferred(cancelled.append)
    auth = authorizer(SimpleNamespace(authenticate=lambda ctx: pending), clock, metrics)
    attempt = check(auth)
    attempt.cancel()
    assert isinstance(failed(attempt), CancelledError)
    assert cancelled == [pending]
    assert (
        sample(metrics, "kura_extension_hook_calls_total", hook="authenticate", result="error") == 0
    )


def test_a_hook_calling_sys_exit_does_not_escape(clock: Clock, metrics: KuraMetrics) -> None:
    """Even SystemExit from a hook is only a hook failure."""

    def authenticate(ctx: HookContext) -> Any:
        raise SystemExit(3)

    auth = authorizer(SimpleNamespace(authenticate=authenticate), clock, metrics)
    assert isinstance(failed(check(auth)), Unauthorized)


def test_fail_open_makes_failures_anonymous_and_allowed(clock: Clock, metrics: KuraMetrics) -> None:
    """With AUTH_FAIL_CLOSED=false failures mean anonymous / allowed; denies still deny."""
    policy = Policy()
    policy.authenticate_result = raise_error
    policy.authorize_result = raise_error
    auth = authorizer(policy, clock, metrics, KURA_EXTENSION_AUTH_FAIL_CLOSED="false")
    assert succeeded(check(auth)) == ANONYMOUS
    policy.authenticate_result = Deny(401, "still no")
    assert isinstance(failed(check(auth, context(headers={}))), Unauthorized)


# -- response headers -------------------------------------------------------------------


def test_response_headers_are_sanitized(clock: Clock, metrics: KuraMetrics) -> None:
    """Bad names and values and framing headers are dropped; the rest are sent lower-cased."""
    result = Headers(
        {
            "X-Cache-Region": "eu",
            "X-Tab": "a\tb",
            "Bad Name": "v",
            "x-colon:": "v",
            "x-crlf\r\nInjected": "v",
            "x-n\xe9": "v",
            "x-value-crlf": "a\r\nSet-Cookie: x",
            "x-value-nul": "a\x00b",
            "x-value-wide": "\u2603",
            "Content-Length": "0",
            "transfer-encoding": "chunked",
            "x-number": 5,
        }
    )
    auth = authorizer(SimpleNamespace(response_headers=lambda ctx, who: result), clock, metrics)
    assert succeeded(headers_of(auth)) == [(b"x-cache-region", b"eu"), (b"x-tab", b"a\tb")]


def test_response_headers_sign_the_payload(clock: Clock, metrics: KuraMetrics) -> None:
    """A sign request adds the base64 HMAC-SHA256 of the payload under the raw key."""

    def response_headers(ctx: HookContext, principal: Principal | None) -> Headers:
        assert ctx.status_code == 200
        assert principal == Principal("user-1")
        return Headers(
            {"x-owner": principal.id},
            sign=SignRequest("X-Cache-Signature", "primary", ctx.artifact_key or ""),
        )

    auth = authorizer(
        SimpleNamespace(response_headers=response_headers), clock, metrics, **SIGNER_ENV
    )
    expected = base64.b64encode(hmac.new(SIGNER_KEY, b"blob/abc", hashlib.sha256).digest())
    assert succeeded(headers_of(auth, Principal("user-1"))) == [
        (b"x-owner", b"user-1"),
        (b"x-cache-signature", expected),
    ]


@pytest.mark.parametrize(
    "behaviour",
    [
        raise_error,
        hang,
        lambda: {"x-a": "b"},
        lambda: Headers({"x-a": "b"}, sign=SignRequest("x-sig", "missing", "p")),
    ],
)
def test_failing_response_headers_leave_only_the_error_header(
    behaviour: Any, clock: Clock, metrics: KuraMetrics
) -> None:
    """A failure (raise, deadline, garbage, unknown signer) adds only the marker header."""
    auth = authorizer(
        SimpleNamespace(response_headers=lambda ctx, who: behaviour()), clock, metrics, **SIGNER_ENV
    )
    attempt = headers_of(auth)
    clock.advance(1.0)
    assert succeeded(attempt) == [(b"x-kura-extension-error", b"response_headers")]


def test_response_headers_none_adds_nothing(clock: Clock, metrics: KuraMetrics) -> None:
    """A response_headers hook returning None adds no headers."""
    auth = authorizer(SimpleNamespace(response_headers=lambda ctx, who: None), clock, metrics)
    assert succeeded(headers_of(auth)) == []


def test_response_headers_fail_closed_is_503(clock: Clock, metrics: KuraMetrics) -> None:
    """With KURA_EXTENSION_RESPONSE_HEADERS_FAIL_OPEN=false a failure is a 503."""
    auth = authorizer(
        SimpleNamespace(response_headers=lambda ctx, who: raise_error()),
        clock,
        metrics,
        KURA_EXTENSION_RESPONSE_HEADERS_FAIL_OPEN="false",
    )
    error = failed(headers_of(auth))
    assert isinstance(error, ServiceUnavailable) and error.retry_after is None

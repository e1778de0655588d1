"""JWKS verification: keys fetched over HTTP (in memory), on a fake clock.

The key set is served by :class:`~tests.auth.jwks_support.JwksResource`
through ``RequestTraversalAgent`` (treq's in-memory agent), so the real
fetch code runs (status, headers, body, JSON) while time stays under the
test's control.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from jwt.utils import base64url_encode
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.iweb import IAgent
from zope.interface import implementer

from kura.auth import TokenInvalid
from kura.auth.jwks import (
    DEFAULT_MAX_AGE_SECONDS,
    MAX_DOCUMENT_BYTES,
    MAX_MAX_AGE_SECONDS,
    MIN_MAX_AGE_SECONDS,
    UNKNOWN_KID_INTERVAL_SECONDS,
    JwksKeys,
    jwks_source,
    max_age_of,
)
from kura.auth.tokens import JwksJwtVerifier
from kura.config.extension import JwtVerifierConfig
from kura.testing import failed, succeeded
from tests.auth.jwks_support import (
    AUDIENCE,
    ISSUER,
    JwksResource,
    SigningKey,
    ec_key,
    ed_key,
    forged_hs256,
    jwks,
    rsa_key,
)

JWKS_URL = "http://jwks.test/jwks"

RSA = rsa_key()
EC = ec_key()
ED = ed_key()


@implementer(IAgent)
class Agent:
    """The in-memory agent, or a refused connection while ``down``."""

    def __init__(self, resource: JwksResource) -> None:
        self.inner = RequestTraversalAgent(resource)
        self.down = False
        #: While set, requests wait in ``held`` until :meth:`release`.
        self.hold = False
        self.held: list[Deferred[None]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        if self.down:
            return fail(ConnectionRefusedError("jwks.test"))
        if self.hold:
            gate: Deferred[None] = Deferred()
            self.held.append(gate)
            return gate.addCallback(lambda _: self.inner.request(method, uri, headers, body))
        return self.inner.request(method, uri, headers, body)

    def release(self) -> None:
        held, self.held, self.hold = self.held, [], False
        for gate in held:
            gate.callback(None)
        self.inner.flush()


class Fixture:
    """A JWKS server, a verifier on it, and the fake clock."""

    def __init__(self, clock: Clock, keys: list[SigningKey], **config: Any) -> None:
        self.clock = clock
        self.server = JwksResource(jwks(keys))
        self.agent = Agent(self.server)
        settings: dict[str, Any] = {
            "algorithm": "RS256",
            "issuer": ISSUER,
            "audiences": (AUDIENCE,),
            "jwks_url": JWKS_URL,
            "jwks_algorithms": ("RS256", "ES256", "EdDSA"),
        }
        settings.update(config)
        fetch, source = jwks_source(self.agent, clock, jwks_url=JWKS_URL, issuer=None)
        self.keys = JwksKeys("test", fetch, source=source, clock=clock)
        self.verifier = JwksJwtVerifier(JwtVerifierConfig(**settings), self.keys, clock)

    def start(self) -> None:
        self.keys.start()
        self.agent.inner.flush()

    def verify(self, token: str) -> Deferred[dict[str, Any]]:
        d = Deferred.fromCoroutine(self.verifier.verify_async(token))
        self.agent.inner.flush()
        return d

    def claims(self, token: str) -> dict[str, Any]:
        return succeed_claims(self.verify(token))

    def refused(self, token: str) -> str:
        error = failed(self.verify(token))
        assert isinstance(error, TokenInvalid), error
        return str(error)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.agent.inner.flush()


def succeed_claims(d: Deferred[dict[str, Any]]) -> dict[str, Any]:
    return succeeded(d)


@pytest.fixture
def fx(clock: Clock) -> Fixture:
    """RSA, EC and Ed25519 keys served and fetched once (t=1000)."""
    fixture = Fixture(clock, [RSA, EC, ED])
    fixture.start()
    return fixture


@pytest.mark.parametrize("key", [RSA, EC, ED], ids=["RS256", "ES256", "EdDSA"])
def test_valid_tokens_of_each_algorithm(key: SigningKey, fx: Fixture) -> None:
    """RS256, ES256 and EdDSA tokens signed by a key of the set yield their claims."""
    claims = fx.claims(key.sign(fx.clock.seconds()))
    assert claims["repository_owner"] == "acme" and claims["iss"] == ISSUER
    assert fx.server.hits == 1


@pytest.mark.parametrize(
    "claims, reason",
    [
        ({"iss": "https://evil.example"}, "issuer"),
        ({"iss": None}, "issuer"),
        ({"aud": "https://other.example"}, "audience"),
        ({"aud": None}, "aud"),
        ({"exp": 1000 - 61}, "expired"),
        ({"exp": None}, "exp"),
        ({"nbf": 1000 + 120}, "not valid yet"),
        ({"iat": 1000 + 120}, "future"),
    ],
)
def test_wrong_claims_are_refused(claims: dict[str, Any], reason: str, fx: Fixture) -> None:
    """Wrong or missing issuer or audience, expired, not yet valid: refused."""
    assert reason in fx.refused(RSA.sign(fx.clock.seconds(), **claims)).lower()


def test_leeway_of_sixty_seconds(fx: Fixture) -> None:
    """exp and nbf are honoured with 60 s of clock skew."""
    assert fx.claims(RSA.sign(1000, exp=1000 - 59, nbf=1000 + 59, iat=1000 + 59))


def test_hs256_token_signed_with_the_public_key_is_refused(fx: Fixture) -> None:
    """Algorithm confusion: an HS256 token whose HMAC secret is the RSA public PEM fails."""
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": 2000}
    forged = forged_hs256(RSA.public_pem(), payload, RSA.kid)
    assert "not allowed" in fx.refused(forged)
    # Even a verifier that (wrongly) allowed HS256 finds no HMAC key in the set.
    fixture = Fixture(fx.clock, [RSA], jwks_algorithms=("RS256", "HS256"))
    fixture.start()
    fixture.refused(forged)


def test_alg_none_is_refused(fx: Fixture) -> None:
    """An unsigned token (alg none) is refused, with or without a kid."""
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": 2000}
    for headers in ({"kid": RSA.kid}, None):
        unsigned = jwt.encode(payload, None, algorithm="none", headers=headers)
        assert "not allowed" in fx.refused(unsigned)


def test_a_key_verifies_only_its_own_algorithm(fx: Fixture) -> None:
    """A token naming the EC key's kid but signed (and labelled) RS256 is refused."""
    forged = SigningKey(EC.kid, "RS256", RSA.private).sign(fx.clock.seconds())
    fx.refused(forged)


def test_algorithm_allow_list(clock: Clock) -> None:
    """An algorithm outside the verifier's list is refused even with a valid key."""
    fixture = Fixture(clock, [RSA, EC], jwks_algorithms=("ES256",))
    fixture.start()
    assert "not allowed" in fixture.refused(RSA.sign(clock.seconds()))
    assert fixture.claims(EC.sign(clock.seconds()))


def test_garbage_is_refused_without_a_fetch(fx: Fixture) -> None:
    """Malformed, non-ASCII and oversized tokens are TokenInvalid, and fetch nothing."""
    for token in ("", "abc", "a.b.c", "é.é.é", "x" * 20_000, RSA.sign(1000) + "x"):
        fx.refused(token)
    assert fx.server.hits == 1


def test_unknown_kid_refreshes_once_and_finds_the_rotated_key(fx: Fixture) -> None:
    """After a key rotation, a token of the new key triggers one fetch and verifies."""
    rotated = rsa_key("rsa-2")
    fx.server.document = jwks([rotated, EC])
    fx.advance(UNKNOWN_KID_INTERVAL_SECONDS)
    assert fx.claims(rotated.sign(fx.clock.seconds()))
    assert fx.server.hits == 2
    assert fx.claims(rotated.sign(fx.clock.seconds()))
    assert fx.server.hits == 2
    assert "no key 'rsa-1'" in fx.refused(RSA.sign(fx.clock.seconds()))


def test_unknown_kid_flood_fetches_at_most_once_per_interval(fx: Fixture) -> None:
    """Thousands of tokens with made-up kids cost one fetch per 30 s, not one each."""
    forged = [SigningKey(f"kid-{n}", "EdDSA", ED.private) for n in range(20)]
    fx.advance(UNKNOWN_KID_INTERVAL_SECONDS)
    before = fx.server.hits
    for _ in range(90):
        for key in forged:
            fx.refused(key.sign(fx.clock.seconds()))
        fx.advance(1)
    # 90 s of flood: at most one fetch per started 30 s.
    assert fx.server.hits - before <= 3
    assert fx.claims(ED.sign(fx.clock.seconds()))


def test_concurrent_unknown_kids_share_one_fetch(clock: Clock) -> None:
    """Verifications waiting for the keys at the same time cause a single fetch."""
    fixture = Fixture(clock, [RSA])
    fixture.start()
    rotated = ec_key("ec-2")
    fixture.server.document = jwks([RSA, rotated])
    clock.advance(UNKNOWN_KID_INTERVAL_SECONDS)
    fixture.agent.hold = True
    waiting = [
        Deferred.fromCoroutine(fixture.verifier.verify_async(rotated.sign(clock.seconds())))
        for _ in range(5)
    ]
    assert not any(d.called for d in waiting)
    assert len(fixture.agent.held) == 1
    fixture.agent.release()
    assert all(succeeded(d)["iss"] == ISSUER for d in waiting)
    assert fixture.server.hits == 2


def test_server_down_at_start_fails_closed_then_recovers(clock: Clock) -> None:
    """No keys yet: every token is refused (401); backoff retries; it recovers."""
    fixture = Fixture(clock, [RSA])
    fixture.agent.down = True
    with capturedLogs() as events:
        fixture.start()
    assert any("fetch failed" in e["log_format"] for e in events)
    assert not fixture.keys.loaded
    assert "no keys" in fixture.refused(RSA.sign(clock.seconds()))
    # Retries back off: 1, 2, 4, ... seconds, capped at 60 s.
    fetches = fixture.keys.fetches
    fixture.advance(1)
    fixture.advance(2)
    assert fixture.keys.fetches == fetches + 2
    fixture.agent.down = False
    fixture.advance(4)
    assert fixture.keys.loaded
    assert fixture.claims(RSA.sign(clock.seconds()))


def test_an_unknown_kid_retries_sooner_than_the_backoff(clock: Clock) -> None:
    """While the server is down, a token triggers a fetch once the 30 s interval passed."""
    fixture = Fixture(clock, [RSA])
    fixture.agent.down = True
    fixture.start()
    for attempt in range(6):
        fixture.advance(2**attempt)  # the backoff reaches 32 s, then 60 s
    fixture.agent.down = False
    fixture.advance(UNKNOWN_KID_INTERVAL_SECONDS)
    assert fixture.claims(RSA.sign(clock.seconds()))


def test_a_failed_refresh_keeps_the_keys(fx: Fixture) -> None:
    """A refresh that fails (503, not JSON, no keys) keeps verifying with the held keys."""
    for status, document in ((503, jwks([RSA])), (200, {"keys": []}), (200, {"nope": 1})):
        fx.server.status = status
        fx.server.document = document
        fx.advance(DEFAULT_MAX_AGE_SECONDS)
        assert fx.claims(RSA.sign(fx.clock.seconds()))
        fx.server.status = 200


@pytest.mark.parametrize(
    "cache_control, refresh",
    [
        (None, DEFAULT_MAX_AGE_SECONDS),
        ("public, max-age=60", MIN_MAX_AGE_SECONDS),
        ("max-age=7200, must-revalidate", 7200),
        ("max-age=999999", MAX_MAX_AGE_SECONDS),
        ("no-store", DEFAULT_MAX_AGE_SECONDS),
    ],
)
def test_periodic_refresh_honours_max_age_within_bounds(
    cache_control: str | None, refresh: float, clock: Clock
) -> None:
    """The set is fetched again after its max-age, clamped to 5 min..24 h (default 1 h)."""
    fixture = Fixture(clock, [RSA])
    fixture.server.cache_control = cache_control
    fixture.start()
    fixture.advance(refresh - 1)
    assert fixture.server.hits == 1
    fixture.advance(1)
    assert fixture.server.hits == 2
    fixture.keys.stop()
    fixture.advance(MAX_MAX_AGE_SECONDS)
    assert fixture.server.hits == 2
    assert not clock.getDelayedCalls()


def test_max_age_parsing() -> None:
    """max-age is read from any position; no-store and absence mean 'not said'."""
    assert max_age_of("max-age=10") == 10
    assert max_age_of('public, MAX-AGE="20"') == 20
    assert max_age_of("s-maxage=5") is None
    assert max_age_of(None) is None


def test_encryption_and_symmetric_keys_are_dropped(clock: Clock) -> None:
    """Keys with use=enc, and oct (HMAC) keys, never verify anything."""
    fixture = Fixture(clock, [])
    enc = {**RSA.jwk(), "use": "enc"}
    secret = b"a-secret-of-more-than-32-bytes-for-hs256"
    oct_key = {"kty": "oct", "kid": "hmac", "k": base64url_encode(secret).decode(), "alg": "HS256"}
    fixture.server.document = {"keys": [enc, oct_key, EC.jwk()]}
    fixture.start()
    assert fixture.claims(EC.sign(clock.seconds()))
    fixture.refused(RSA.sign(clock.seconds()))
    hmac_token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": 2000}, secret, headers={"kid": "hmac"}
    )
    fixture.refused(hmac_token)


def test_a_key_without_alg_verifies_its_key_type_only(clock: Clock) -> None:
    """A JWK without alg verifies tokens of a matching key type (RS256 and RS384 for RSA)."""
    fixture = Fixture(clock, [], jwks_algorithms=("RS256", "RS384", "ES256"))
    fixture.server.document = {"keys": [RSA.jwk(with_alg=False)]}
    fixture.start()
    assert fixture.claims(RSA.sign(clock.seconds()))
    assert fixture.claims(SigningKey(RSA.kid, "RS384", RSA.private).sign(clock.seconds()))
    fixture.refused(SigningKey(RSA.kid, "ES256", EC.private).sign(clock.seconds()))


def test_a_token_without_kid_needs_a_single_key_set(clock: Clock) -> None:
    """Without kid the only key of a one-key set is used; with several keys it is refused."""
    fixture = Fixture(clock, [RSA])
    fixture.start()
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": 2000}, RSA.private, algorithm="RS256"
    )
    assert fixture.claims(token)
    fixture.server.document = jwks([RSA, EC])
    fixture.advance(DEFAULT_MAX_AGE_SECONDS)
    fixture.refused(token)


def test_discovery_finds_the_jwks_uri(clock: Clock) -> None:
    """Without a JWKS URL the issuer's openid-configuration names it; a foreign issuer fails."""
    server = JwksResource(jwks([RSA]))
    agent = Agent(server)
    fetch, source = jwks_source(agent, clock, jwks_url=None, issuer="http://jwks.test")
    assert source == "http://jwks.test/.well-known/openid-configuration"
    keys = JwksKeys("d", fetch, source=source, clock=clock)
    keys.start()
    agent.inner.flush()
    assert keys.loaded and server.hits == 1

    server.issuer = "http://evil.test"
    fetch, source = jwks_source(agent, clock, jwks_url=None, issuer="http://jwks.test")
    other = JwksKeys("e", fetch, source=source, clock=clock)
    with capturedLogs() as events:
        other.start()
        agent.inner.flush()
    assert not other.loaded
    assert any("does not name issuer" in str(e.get("reason")) for e in events)
    keys.stop()
    other.stop()


def test_an_oversized_key_set_is_refused_unread(clock: Clock) -> None:
    """A JWKS document over MAX_DOCUMENT_BYTES is a failed fetch (the keys stay unloaded)."""
    fixture = Fixture(clock, [RSA])
    fixture.server.document = {"keys": [], "padding": "x" * MAX_DOCUMENT_BYTES}
    with capturedLogs() as events:
        fixture.start()
    assert any(f"body over {MAX_DOCUMENT_BYTES} bytes" in str(e) for e in events)
    assert not fixture.keys.loaded

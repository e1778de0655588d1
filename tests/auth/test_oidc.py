"""OIDC: the KURA_AUTH_OIDC_* built-in mode, JWKS verifier configuration, and the host.

Keys are served in memory (``RequestTraversalAgent``) on a fake clock; the
real-socket forms are in ``test_oidc_real.py``.
"""

from __future__ import annotations

import base64
from typing import Any

import jwt
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kura.auth import (
    AccessConfig,
    ExtensionConfig,
    ExtensionHost,
    IRequestAuthorizer,
    Principal,
    TokenInvalid,
    build_authorizer,
)
from kura.auth.oidc import OidcAccess, matches
from kura.auth.tokens import AwaitRequired
from kura.config import ConfigError, KuraConfig
from kura.config.environ import Reader
from kura.domain.errors import Forbidden, Unauthorized
from kura.telemetry.metrics import KuraMetrics
from kura.testing import failed, succeeded
from tests.auth.jwks_support import AUDIENCE, ISSUER, JwksResource, ec_key, jwks, rsa_key
from tests.auth.support import context, sample
from tests.auth.test_jwks import JWKS_URL, Agent

RSA = rsa_key()
EC = ec_key()
STATIC_WRITE = "static-write-token-0123456789"

OIDC = {
    "KURA_AUTH_OIDC_ISSUER": ISSUER,
    "KURA_AUTH_OIDC_AUDIENCE": AUDIENCE,
    "KURA_AUTH_OIDC_JWKS_URL": JWKS_URL,
    "KURA_AUTH_OIDC_READ_CLAIMS": "repository_owner=acme",
    "KURA_AUTH_OIDC_WRITE_CLAIMS": "repository_owner=acme,ref=refs/heads/main",
}
WRITE_CTX = {"method": "PUT", "operation": "artifact.write"}


def access(**environ: str) -> AccessConfig:
    reader = Reader(environ)
    config = AccessConfig.read(reader)
    reader.raise_if_failed()
    return config


def problems(**environ: str) -> str:
    with pytest.raises(ConfigError) as raised:
        access(**environ)
    return str(raised.value)


# -- configuration ---------------------------------------------------------------


def test_oidc_configuration_is_parsed() -> None:
    """Issuer, audiences, JWKS URL, algorithms and claim rules reach OidcConfig."""
    config = access(**OIDC, KURA_AUTH_OIDC_ALGORITHMS="es256, RS256")
    oidc = config.oidc
    assert oidc is not None and config.guarded and not config.uses_tokens
    assert (oidc.issuer, oidc.audiences, oidc.jwks_url) == (ISSUER, (AUDIENCE,), JWKS_URL)
    assert oidc.algorithms == ("ES256", "RS256")
    assert oidc.read_claims == (("repository_owner", "acme"),)
    assert oidc.write_claims == (("repository_owner", "acme"), ("ref", "refs/heads/main"))
    assert access().oidc is None and not access().guarded


def test_oidc_is_not_open_mode() -> None:
    """A node with only OIDC configured is guarded (not open mode)."""
    config = KuraConfig.from_environ(
        {**OIDC, "KURA_DATA_DIR": "/tmp/kura-oidc-test"}, measure_filesystem=lambda _: 1 << 40
    )
    assert not config.open_access


@pytest.mark.parametrize(
    "environ, named",
    [
        ({"KURA_AUTH_OIDC_AUDIENCE": None}, "KURA_AUTH_OIDC_AUDIENCE must be set"),
        (
            {"KURA_AUTH_OIDC_READ_CLAIMS": None, "KURA_AUTH_OIDC_WRITE_CLAIMS": None},
            "needs KURA_AUTH_OIDC_READ_CLAIMS or KURA_AUTH_OIDC_WRITE_CLAIMS",
        ),
        ({"KURA_AUTH_OIDC_WRITE_CLAIMS": "repository_owner"}, "claim=value"),
        ({"KURA_AUTH_OIDC_ALGORITHMS": "HS256"}, "KURA_AUTH_OIDC_ALGORITHMS must list"),
        ({"KURA_AUTH_OIDC_ALGORITHMS": "none"}, "KURA_AUTH_OIDC_ALGORITHMS must list"),
        ({"KURA_AUTH_OIDC_JWKS_URL": "file:///etc/keys"}, "KURA_AUTH_OIDC_JWKS_URL must be"),
        ({"KURA_AUTH_OIDC_ISSUER": "github"}, "KURA_AUTH_OIDC_ISSUER must be"),
        ({"KURA_AUTH_OIDC_ISSUER": None}, "KURA_AUTH_OIDC_AUDIENCE needs KURA_AUTH_OIDC_ISSUER"),
    ],
)
def test_oidc_configuration_errors(environ: dict[str, str | None], named: str) -> None:
    """Missing audience or rules, bad rules, symmetric algorithms, bad URLs: start-up errors."""
    merged = {**OIDC, **environ}
    assert named in problems(**{k: v for k, v in merged.items() if v is not None})


def test_jwks_extension_verifier_is_parsed() -> None:
    """A verifier group with _JWKS_URL has public-key algorithms, issuer and audiences."""
    config = ExtensionConfig.from_environ(
        {
            "KURA_EXTENSION_JWT_VERIFIER_CI_JWKS_URL": JWKS_URL,
            "KURA_EXTENSION_JWT_VERIFIER_CI_ISSUER": ISSUER,
            "KURA_EXTENSION_JWT_VERIFIER_CI_AUDIENCES": AUDIENCE,
        }
    )
    verifier = config.jwt_verifiers["CI"]
    assert verifier.jwks_url == JWKS_URL and verifier.secret is None
    assert verifier.algorithms == ("RS256", "ES256", "EdDSA")


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"SECRET": "s" * 40}, "_CI_SECRET cannot be set with _JWKS_URL"),
        ({"ALGORITHM": "HS256"}, "_CI_ALGORITHM cannot be set with _JWKS_URL"),
        ({"ALGORITHMS": "HS256"}, "_CI_ALGORITHMS must list"),
        ({"ISSUER": ""}, "_CI_ISSUER must be set"),
        ({"AUDIENCES": ""}, "_CI_AUDIENCES must be set"),
        ({"JWKS_URL": "ftp://x/keys"}, "_CI_JWKS_URL must be"),
    ],
)
def test_jwks_extension_verifier_errors(extra: dict[str, str], named: str) -> None:
    """Secret and JWKS together, HS algorithms, no issuer or audience, bad URL: errors."""
    environ = {
        "KURA_EXTENSION_JWT_VERIFIER_CI_JWKS_URL": JWKS_URL,
        "KURA_EXTENSION_JWT_VERIFIER_CI_ISSUER": ISSUER,
        "KURA_EXTENSION_JWT_VERIFIER_CI_AUDIENCES": AUDIENCE,
    }
    environ.update({f"KURA_EXTENSION_JWT_VERIFIER_CI_{k}": v for k, v in extra.items()})
    with pytest.raises(ConfigError, match=named):
        ExtensionConfig.from_environ({k: v for k, v in environ.items() if v})


def test_hs_verifier_refuses_algorithms_list() -> None:
    """_ALGORITHMS belongs to JWKS verifiers; with a secret it is an error."""
    with pytest.raises(ConfigError, match="_ALGORITHMS applies only with _JWKS_URL"):
        ExtensionConfig.from_environ(
            {
                "KURA_EXTENSION_JWT_VERIFIER_X_SECRET": "s" * 40,
                "KURA_EXTENSION_JWT_VERIFIER_X_ALGORITHMS": "RS256",
            }
        )


# -- the built-in OIDC mode ------------------------------------------------------


class Node:
    """The built-in authorizer of an OIDC configuration, keys served in memory."""

    def __init__(self, clock: Clock, metrics: KuraMetrics, **environ: str) -> None:
        self.clock = clock
        self.server = JwksResource(jwks([RSA, EC]))
        self.agent = Agent(self.server)
        authorizer = build_authorizer(
            ExtensionConfig(),
            reactor=clock,
            metrics=metrics,
            access=access(**{**OIDC, **environ}),
            agent_for=lambda client: self.agent,
        )
        assert isinstance(authorizer, OidcAccess)
        self.authorizer = authorizer
        authorizer.start()
        self.agent.inner.flush()

    def check(self, token: str | None, **fields: Any) -> Deferred[Any]:
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        d = Deferred.fromCoroutine(self.authorizer.check(context(headers=headers, **fields)))
        self.agent.inner.flush()
        return d


@pytest.fixture
def node(clock: Clock, metrics: KuraMetrics) -> Node:
    """The OIDC authorizer with a static write token too, keys fetched."""
    return Node(clock, metrics, KURA_AUTH_WRITE_TOKENS=STATIC_WRITE)


def test_oidc_access_provides_the_interface(node: Node) -> None:
    """OidcAccess is an IRequestAuthorizer in mode "oidc" with no headers hook."""
    assert verifyObject(IRequestAuthorizer, node.authorizer)
    assert node.authorizer.mode == "oidc" and not node.authorizer.adds_headers


def test_a_main_branch_token_writes(node: Node) -> None:
    """A token matching the write rule reads and writes, as an oidc principal."""
    token = RSA.sign(node.clock.seconds())
    principal = succeeded(node.check(token, **WRITE_CTX))
    assert principal == Principal("repo:acme/app:ref:refs/heads/main", "oidc", {"scope": "write"})
    assert succeeded(node.check(token)).attributes["scope"] == "write"


def test_a_branch_token_only_reads(node: Node) -> None:
    """A token matching only the read rule reads; its writes and cleans are 403."""
    token = EC.sign(node.clock.seconds(), ref="refs/heads/feature")
    assert succeeded(node.check(token)).attributes["scope"] == "read"
    error = failed(node.check(token, **WRITE_CTX))
    assert isinstance(error, Forbidden) and "may only read" in str(error)
    clean = {"method": "DELETE", "operation": "namespace.delete", "artifact_key": None}
    assert isinstance(failed(node.check(token, **clean)), Forbidden)


def test_another_owners_token_is_forbidden(node: Node) -> None:
    """A valid token of the issuer whose claims match no rule is 403, even for reads."""
    token = RSA.sign(node.clock.seconds(), repository_owner="mallory")
    error = failed(node.check(token))
    assert isinstance(error, Forbidden) and "matches no read or write rule" in str(error)


def test_a_non_string_claim_never_matches() -> None:
    """Rules compare string claims exactly; an empty rule matches nothing."""
    assert matches((("a", "1"),), {"a": "1"})
    assert not matches((("a", "1"),), {"a": 1})
    assert not matches((), {"a": "1"})


@pytest.mark.parametrize(
    "claims",
    [{"aud": "https://other.example"}, {"exp": 900}, {"nbf": 1200}],
)
def test_invalid_tokens_of_the_issuer_are_401(claims: dict[str, Any], node: Node) -> None:
    """Wrong audience, expired, not yet valid: 401 Invalid token."""
    error = failed(node.check(RSA.sign(node.clock.seconds(), **claims), **WRITE_CTX))
    assert isinstance(error, Unauthorized) and str(error) == "Invalid token"


def test_static_tokens_work_alongside(node: Node) -> None:
    """A token that is not a JWT of the issuer goes to the static token table."""
    assert succeeded(node.check(STATIC_WRITE, **WRITE_CTX)).kind == "token"
    assert isinstance(failed(node.check("not-a-configured-token-123")), Unauthorized)
    foreign = RSA.sign(node.clock.seconds(), iss="https://other-issuer.example")
    assert isinstance(failed(node.check(foreign)), Unauthorized)
    assert isinstance(failed(node.check(None)), Unauthorized)


def test_basic_credentials_carry_a_jwt(node: Node) -> None:
    """Clients that send Basic credentials may put the ID token in the password."""
    token = RSA.sign(node.clock.seconds())
    raw = base64.b64encode(f"ci:{token}".encode()).decode()
    ctx = context(headers={"authorization": f"Basic {raw}"}, **WRITE_CTX)
    d = Deferred.fromCoroutine(node.authorizer.check(ctx))
    assert succeeded(d).kind == "oidc"


def test_without_static_tokens_anything_else_is_401(clock: Clock, metrics: KuraMetrics) -> None:
    """OIDC alone: a missing token asks for one; a non-JWT is Invalid token."""
    alone = Node(clock, metrics)
    error = failed(alone.check(None))
    assert isinstance(error, Unauthorized) and "Authentication required" in str(error)
    error = failed(alone.check("static-write-token-0123456789"))
    assert isinstance(error, Unauthorized) and str(error) == "Invalid token"


def test_anonymous_reads_apply(clock: Clock, metrics: KuraMetrics) -> None:
    """With KURA_AUTH_ANONYMOUS_READ, plain reads are not checked; writes still are."""
    anonymous = Node(clock, metrics, KURA_AUTH_ANONYMOUS_READ="true")
    assert not anonymous.authorizer.checks("artifact.read")
    assert anonymous.authorizer.checks("artifact.write")
    assert isinstance(failed(anonymous.check(None, **WRITE_CTX)), Unauthorized)


def test_keys_unavailable_fail_closed(clock: Clock, metrics: KuraMetrics) -> None:
    """With the JWKS server down since start, valid tokens are 401 until it is back."""
    server = JwksResource(jwks([RSA]))
    agent = Agent(server)
    agent.down = True
    authorizer = build_authorizer(
        ExtensionConfig(),
        reactor=clock,
        metrics=metrics,
        access=access(**OIDC),
        agent_for=lambda client: agent,
    )
    authorizer.start()
    assert sample(metrics, "kura_jwks_fetches_total", verifier="oidc", result="error") == 1
    token = RSA.sign(clock.seconds())
    ctx = context(headers={"authorization": f"Bearer {token}"})

    def check() -> Deferred[Any]:
        return Deferred.fromCoroutine(authorizer.check(ctx))

    assert isinstance(failed(check()), Unauthorized)
    agent.down = False
    clock.advance(1)
    agent.inner.flush()
    assert succeeded(check()).kind == "oidc"
    assert sample(metrics, "kura_jwks_fetches_total", verifier="oidc", result="ok") == 1
    succeeded(authorizer.close())
    assert not clock.getDelayedCalls()


# -- the extension host ----------------------------------------------------------


def host(clock: Clock, metrics: KuraMetrics, agent: Agent) -> ExtensionHost:
    config = ExtensionConfig.from_environ(
        {
            "KURA_EXTENSION_JWT_VERIFIER_CI_JWKS_URL": JWKS_URL,
            "KURA_EXTENSION_JWT_VERIFIER_CI_ISSUER": ISSUER,
            "KURA_EXTENSION_JWT_VERIFIER_CI_AUDIENCES": AUDIENCE,
            "KURA_EXTENSION_JWT_VERIFIER_HS_SECRET": "s" * 40,
        }
    )
    return ExtensionHost(config, reactor=clock, metrics=metrics, agent_for=lambda c: agent)


def test_host_verifies_jwks_tokens_asynchronously(clock: Clock, metrics: KuraMetrics) -> None:
    """jwt_verify_async verifies JWKS tokens; jwt_verify refuses to (it cannot wait)."""
    agent = Agent(JwksResource(jwks([RSA])))
    kura = host(clock, metrics, agent)
    kura.start()
    agent.inner.flush()
    token = RSA.sign(clock.seconds())
    claims = succeeded(Deferred.fromCoroutine(kura.jwt_verify_async("ci", token)))
    assert sample(metrics, "kura_jwks_fetches_total", verifier="extension:CI", result="ok") == 1
    assert claims["sub"].startswith("repo:acme/")
    with pytest.raises(AwaitRequired, match="jwt_verify_async"):
        kura.jwt_verify("ci", token)
    bad = Deferred.fromCoroutine(kura.jwt_verify_async("CI", token + "x"))
    assert isinstance(failed(bad), TokenInvalid)
    succeeded(kura.close())
    assert not clock.getDelayedCalls()


def test_host_async_form_serves_hs_verifiers(clock: Clock, metrics: KuraMetrics) -> None:
    """jwt_verify_async works for HS* verifiers too (one form for every verifier)."""
    kura = host(clock, metrics, Agent(JwksResource(jwks([RSA]))))
    token = jwt.encode({"sub": "u", "exp": clock.seconds() + 60}, "s" * 40, algorithm="HS256")
    assert succeeded(Deferred.fromCoroutine(kura.jwt_verify_async("hs", token)))["sub"] == "u"
    assert kura.jwt_verify("hs", token)["sub"] == "u"

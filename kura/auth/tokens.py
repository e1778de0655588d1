"""JWT verification for extensions and the built-in OIDC mode (PyJWT underneath).

Two kinds of verifier, one per ``KURA_EXTENSION_JWT_VERIFIER_<ID>_*`` group:

* :class:`JwtVerifier`: HS256/384/512 with a shared secret; synchronous;
* :class:`JwksJwtVerifier`: RS*/PS*/ES*/EdDSA with public keys from a JWKS
  URL (:mod:`.jwks`); a coroutine, since it may wait for the keys.

PyJWT checks the signature (with a constant-time comparison for HMAC), the
algorithm (only the verifier's allow-list is accepted, so ``alg: none`` or
an algorithm swap is refused; a JWKS key only verifies its own algorithm,
so an HS256 token "signed" with an RSA public key is refused), the issuer
and the audiences. Time-based claims are checked here against the injected
clock instead of the system time, so tests are deterministic: ``exp`` is
required, ``nbf`` and ``iat`` are honoured when present, all with
:data:`LEEWAY_SECONDS` of clock skew.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jwt
from jwt import PyJWK
from jwt.warnings import InsecureKeyLengthWarning
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent

from kura.config.extension import JwtVerifierConfig

from .errors import HostError
from .jwks import JwksKeys, KeyUnavailable, jwks_source

#: Clock skew tolerated on ``exp``, ``nbf`` and ``iat`` (upstream's library default).
LEEWAY_SECONDS = 60.0
#: Longer tokens are refused unread (headers are bounded anyway).
MAX_TOKEN_LENGTH = 16 * 1024


class TokenInvalid(HostError):
    """The token is malformed, badly signed, expired or for someone else."""


class AwaitRequired(HostError):
    """A JWKS verifier was called synchronously (``host.jwt_verify``)."""


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenInvalid(f"claim {name!r} is not a number")
    return float(value)


def _ascii(token: str | bytes) -> str:
    if isinstance(token, bytes):
        token = token.decode("latin-1")
    if not token.isascii() or len(token) > MAX_TOKEN_LENGTH:
        raise TokenInvalid("token is not a short ASCII string")
    return token


def decode(
    token: str,
    key: str | bytes | PyJWK,
    *,
    algorithms: Sequence[str],
    issuer: str | None,
    audiences: Sequence[str],
    now: float,
) -> dict[str, Any]:
    """The verified claims of ``token`` (see the module docstring).

    Raises:
        TokenInvalid: for every way the token can be wrong.
    """
    try:
        with warnings.catch_warnings():
            # Short secrets are the operator's choice; do not warn per request.
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            claims = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                audience=list(audiences) or None,
                issuer=issuer,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(audiences),
                    "verify_iss": issuer is not None,
                },
            )
    except jwt.PyJWTError as error:
        raise TokenInvalid(str(error)) from None
    except (ValueError, TypeError) as error:  # odd payloads PyJWT does not wrap
        raise TokenInvalid(repr(error)) from None
    if not isinstance(claims, dict):
        raise TokenInvalid("claims are not a JSON object")
    expires = _number(claims, "exp")
    if expires is None:
        raise TokenInvalid("token has no exp claim")
    if now > expires + LEEWAY_SECONDS:
        raise TokenInvalid("token has expired")
    not_before = _number(claims, "nbf")
    if not_before is not None and now < not_before - LEEWAY_SECONDS:
        raise TokenInvalid("token is not valid yet")
    issued = _number(claims, "iat")
    if issued is not None and now < issued - LEEWAY_SECONDS:
        raise TokenInvalid("token is issued in the future")
    return claims


def unverified_header(token: str | bytes) -> dict[str, Any]:
    """The JOSE header of ``token``, unverified (to pick the key).

    Raises:
        TokenInvalid: not a JWT.
    """
    try:
        header = jwt.get_unverified_header(_ascii(token))
    except jwt.PyJWTError as error:
        raise TokenInvalid(str(error)) from None
    return header


def unverified_issuer(token: str | bytes) -> str | None:
    """The ``iss`` claim of what looks like a JWT, unverified; ``None`` for
    anything else. Only for routing a token to the right verifier."""
    try:
        claims = jwt.decode(_ascii(token), options={"verify_signature": False})
    except (jwt.PyJWTError, TokenInvalid, ValueError, TypeError):
        return None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None


class JwtVerifier:
    """Verifies tokens for one ``KURA_EXTENSION_JWT_VERIFIER_<ID>_*`` group.

    Args:
        config: algorithm, secret, issuer, audiences.
        clock: the time ``exp``/``nbf`` are compared with.
    """

    def __init__(self, config: JwtVerifierConfig, clock: IReactorTime) -> None:
        self._config = config
        self._clock = clock

    def verify(self, token: str | bytes) -> dict[str, Any]:
        """The claims of a valid ``token``.

        Raises:
            TokenInvalid: for every way the token can be wrong, including
                non-ASCII or oversized input (never another exception).
        """
        config = self._config
        assert config.secret is not None
        return decode(
            _ascii(token),
            config.secret,
            algorithms=config.algorithms,
            issuer=config.issuer,
            audiences=config.audiences,
            now=self._clock.seconds(),
        )

    async def verify_async(self, token: str | bytes) -> dict[str, Any]:
        """:meth:`verify`, as a coroutine (the form that works for every verifier)."""
        return self.verify(token)


class JwksJwtVerifier:
    """Verifies asymmetric tokens with keys from a JWKS URL.

    Args:
        config: algorithms, issuer and audiences (both required for JWKS
            verifiers by the configuration).
        keys: the verifier's key cache.
        clock: the time ``exp``/``nbf``/``iat`` are compared with.
    """

    def __init__(self, config: JwtVerifierConfig, keys: JwksKeys, clock: IReactorTime) -> None:
        self._config = config
        self.keys = keys
        self._clock = clock

    def verify(self, token: str | bytes) -> dict[str, Any]:
        raise AwaitRequired(
            "this verifier fetches its keys from a JWKS URL: use await host.jwt_verify_async(...)"
        )

    async def verify_async(self, token: str | bytes) -> dict[str, Any]:
        """The claims of a valid ``token``; may wait for a key refresh.

        Raises:
            TokenInvalid: for every way the token can be wrong, including an
                unknown key id or no keys fetched yet (fail closed).
        """
        text = _ascii(token)
        config = self._config
        header = unverified_header(text)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in config.algorithms:
            raise TokenInvalid(f"algorithm {algorithm!r} is not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenInvalid("kid is not a string")
        # The issuer is checked again, verified, by decode; checking it
        # unverified first keeps other issuers' tokens from causing fetches.
        if unverified_issuer(text) != config.issuer:
            raise TokenInvalid("token is not from the configured issuer")
        try:
            key = await self.keys.key(kid, algorithm)
        except KeyUnavailable as error:
            raise TokenInvalid(str(error)) from None
        return decode(
            text,
            key,
            algorithms=config.algorithms,
            issuer=config.issuer,
            audiences=config.audiences,
            now=self._clock.seconds(),
        )


def build_verifier(
    name: str,
    config: JwtVerifierConfig,
    *,
    clock: IReactorTime,
    agent: Callable[[], IAgent],
    discover_issuer: bool = False,
    on_fetched: Callable[[str], None] = lambda result: None,
) -> JwtVerifier | JwksJwtVerifier:
    """The verifier of one configuration: HS* with a secret, else JWKS.

    Args:
        name: names the verifier in log events.
        agent: builds the ``IAgent`` the JWKS is fetched through (only
            called for a JWKS verifier).
        discover_issuer: without a ``jwks_url``, discover it from the
            issuer's OpenID configuration (the built-in OIDC mode).
        on_fetched: told the result (``ok``/``error``) of each key fetch.
    """
    if config.jwks_url is None and not discover_issuer:
        return JwtVerifier(config, clock)
    fetch, source = jwks_source(agent(), clock, jwks_url=config.jwks_url, issuer=config.issuer)
    keys = JwksKeys(name, fetch, source=source, clock=clock, on_fetched=on_fetched)
    return JwksJwtVerifier(config, keys, clock)

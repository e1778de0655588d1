"""HS256/384/512 JWT verification for extensions (PyJWT underneath).

PyJWT checks the signature (with a constant-time comparison), the algorithm
(only the verifier's configured one is accepted, so ``alg: none`` or an
algorithm swap is refused), the issuer and the audiences. Time-based claims
are checked here against the injected clock instead of the system time, so
tests are deterministic: ``exp`` is required, ``nbf`` is honoured when
present, both with :data:`LEEWAY_SECONDS` of clock skew.
"""

from __future__ import annotations

import warnings
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning
from twisted.internet.interfaces import IReactorTime

from kura.config.extension import JwtVerifierConfig

from .errors import HostError

#: Clock skew tolerated on ``exp`` and ``nbf`` (upstream's library default).
LEEWAY_SECONDS = 60.0
#: Longer tokens are refused unread (headers are bounded anyway).
MAX_TOKEN_LENGTH = 16 * 1024


class TokenInvalid(HostError):
    """The token is malformed, badly signed, expired or for someone else."""


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenInvalid(f"claim {name!r} is not a number")
    return float(value)


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
        if isinstance(token, bytes):
            token = token.decode("latin-1")
        if not token.isascii() or len(token) > MAX_TOKEN_LENGTH:
            raise TokenInvalid("token is not a short ASCII string")
        config = self._config
        try:
            with warnings.catch_warnings():
                # Short secrets are the operator's choice; do not warn per request.
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                claims = jwt.decode(
                    token,
                    config.secret,
                    algorithms=[config.algorithm],
                    audience=list(config.audiences) or None,
                    issuer=config.issuer,
                    options={
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": bool(config.audiences),
                        "verify_iss": config.issuer is not None,
                    },
                )
        except jwt.PyJWTError as error:
            raise TokenInvalid(str(error)) from None
        except (ValueError, TypeError) as error:  # odd payloads PyJWT does not wrap
            raise TokenInvalid(repr(error)) from None
        if not isinstance(claims, dict):
            raise TokenInvalid("claims are not a JSON object")
        now = self._clock.seconds()
        expires = _number(claims, "exp")
        if expires is None:
            raise TokenInvalid("token has no exp claim")
        if now > expires + LEEWAY_SECONDS:
            raise TokenInvalid("token has expired")
        not_before = _number(claims, "nbf")
        if not_before is not None and now < not_before - LEEWAY_SECONDS:
            raise TokenInvalid("token is not valid yet")
        return claims

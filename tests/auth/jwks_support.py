"""Signing keys, tokens and a JWKS server for the JWKS and OIDC tests.

Keys are generated with ``cryptography`` (RSA 2048, EC P-256, Ed25519) and
exported as JWKs with PyJWT's algorithm classes. :class:`JwksResource` is a
``twisted.web`` resource serving a key set the test changes at will (and
an OpenID configuration), counting requests; tests serve it in memory
(``RequestTraversalAgent``, on a fake clock) or on a loopback port.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import base64url_encode
from twisted.web.resource import Resource
from twisted.web.server import Request

ISSUER = "https://token.actions.githubusercontent.com"
AUDIENCE = "https://kura.example"


@attrs.frozen
class SigningKey:
    """A private key, its ``kid`` and the algorithm it signs with."""

    kid: str
    algorithm: str
    private: Any

    def jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        """The public half as a JWK."""
        public = self.private.public_key()
        if self.algorithm.startswith(("RS", "PS")):
            jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif self.algorithm.startswith("ES"):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk.update(kid=self.kid, use="sig")
        if with_alg:
            jwk["alg"] = self.algorithm
        return jwk

    def public_pem(self) -> bytes:
        """The public key as PEM (what an algorithm-confusion attacker uses as HMAC secret)."""
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def sign(self, now: float, **claims: Any) -> str:
        """A token with sensible defaults (GitHub-like claims), ``claims`` overriding."""
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "repo:acme/app:ref:refs/heads/main",
            "repository_owner": "acme",
            "ref": "refs/heads/main",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + 300,
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(
            payload, self.private, algorithm=self.algorithm, headers={"kid": self.kid}
        )


def forged_hs256(secret: bytes, payload: dict[str, Any], kid: str) -> str:
    """An HS256 token with ``secret`` as HMAC key, built by hand (PyJWT refuses to
    use a PEM public key as a secret, an algorithm-confusion attacker does not)."""
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    signing_input = b".".join(
        base64url_encode(json.dumps(part).encode()) for part in (header, payload)
    )
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64url_encode(signature)).decode()


def unsigned(payload: dict[str, Any], kid: str) -> str:
    """An ``alg: none`` token."""
    return jwt.encode(payload, None, algorithm="none", headers={"kid": kid})


def rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def ed_key(kid: str = "ed-1") -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def jwks(keys: Iterable[SigningKey]) -> dict[str, Any]:
    return {"keys": [key.jwk() for key in keys]}


class JwksResource(Resource):
    """Serves ``/jwks`` (the current ``document``) and the issuer's
    ``/.well-known/openid-configuration``; ``status`` other than 200 makes
    ``/jwks`` fail with it. Counts JWKS requests in ``hits``."""

    isLeaf = True

    def __init__(self, document: dict[str, Any], *, base_url: str = "http://jwks.test") -> None:
        super().__init__()
        self.document = document
        self.base_url = base_url
        self.status = 200
        self.cache_control: str | None = None
        self.issuer = base_url
        self.hits = 0

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode()
        request.setHeader(b"content-type", b"application/json")
        if path == "/.well-known/openid-configuration":
            return json.dumps({"issuer": self.issuer, "jwks_uri": self.base_url + "/jwks"}).encode()
        if path != "/jwks":
            request.setResponseCode(404)
            return b"{}"
        self.hits += 1
        if self.status != 200:
            request.setResponseCode(self.status)
            return b"{}"
        if self.cache_control is not None:
            request.setHeader(b"cache-control", self.cache_control.encode())
        return json.dumps(self.document).encode()

"""Peer authentication: every internal request and response is signed.

With ``KURA_PEER_SECRET`` set, a node signs each request it sends to a peer
and each successful response it serves, and refuses what is not signed with
a secret of the mesh. The signature is an HMAC-SHA256 (stdlib ``hmac``) of a
canonical message:

* request: ``kura-peer-request-v1``, method, raw path, raw query, tenant,
  time (epoch ms), nonce and the SHA-256 of the body (of nothing when there
  is none), one per line;
* response: ``kura-peer-response-v1``, the request's nonce, the status and
  the SHA-256 of the response body.

Headers (all peers of a release speak the same ones, see :mod:`.wire`):
``X-Kura-Peer-Time``, ``X-Kura-Peer-Nonce``, ``X-Kura-Content-Sha256`` and
``X-Kura-Peer-Signature: v1 <key id> <base64 MAC>``.

What this buys:

* nobody without the secret can write, pin or wipe anything, nor read
  anything through catch-up; a signed body's digest is verified after it
  lands and before it is published, so a body cannot be swapped in transit;
* a response is tied to its request by the nonce, so a node only takes
  membership answers, catch-up pages and bodies from real mesh members;
* a captured request is refused outside ``KURA_MAX_CLOCK_SKEW_MS`` of its
  time, and inside that window its nonce is refused a second time
  (replicated applies are idempotent anyway: last writer wins);
* ``KURA_PEER_SECRET_NEXT`` is accepted too, so secrets rotate without
  downtime; the key id says which secret signed, so nothing is tried twice.

Until ``KURA_PEER_ACCEPT_UNSIGNED_UNTIL`` unsigned requests and responses are
still accepted (a rolling upgrade from a release that did not sign), counted
and warned about; a signature that is present must always verify.

Nothing here is confidential: the secret authenticates, it does not encrypt.
Peer mTLS does both (and its identity check is in :mod:`.tls`).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import os
from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kura.config import PeerAuthConfig
from kura.domain.artifacts import is_digest
from kura.domain.errors import Unauthorized
from kura.telemetry.metrics import KuraMetrics

log = Logger(namespace="kura.replication.auth")

TIME_HEADER = b"X-Kura-Peer-Time"
NONCE_HEADER = b"X-Kura-Peer-Nonce"
DIGEST_HEADER = b"X-Kura-Content-Sha256"
SIGNATURE_HEADER = b"X-Kura-Peer-Signature"

#: SHA-256 of nothing: the digest signed for bodiless requests and responses.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_REQUEST = b"kura-peer-request-v1"
_RESPONSE = b"kura-peer-response-v1"
_VERSION = "v1"
#: Nonces remembered at most (a full window of requests at ~3,000/s); the
#: oldest go first when more arrive, which only narrows replay detection.
MAX_NONCES = 1 << 20

UNSIGNED_ACCEPTED = (
    "accepted an unsigned peer {what} (KURA_PEER_ACCEPT_UNSIGNED_UNTIL); "
    "upgrade every peer to signing before then"
)
REFUSED = "refused a peer request from {peer}: {reason}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_id(secret: bytes) -> str:
    """A short public name of a secret (which of the mesh's secrets signed)."""
    return hashlib.sha256(b"kura-peer-key\0" + secret).hexdigest()[:12]


def request_message(
    *,
    method: str,
    path: bytes,
    query: bytes,
    tenant: str,
    time_ms: int,
    nonce: str,
    digest: str,
) -> bytes:
    """The canonical bytes a request signature covers."""
    return b"\n".join(
        [
            _REQUEST,
            method.upper().encode("ascii"),
            path,
            query,
            tenant.encode("utf-8"),
            b"%d" % time_ms,
            nonce.encode("ascii"),
            digest.encode("ascii"),
        ]
    )


def response_message(*, nonce: str, status: int, digest: str) -> bytes:
    """The canonical bytes a response signature covers."""
    return b"\n".join([_RESPONSE, nonce.encode("ascii"), b"%d" % status, digest.encode("ascii")])


class BadSignature(Exception):
    """A signature is missing, malformed, wrong, stale or replayed.

    Attributes:
        result: the metric label (``unsigned``, ``invalid``, ``expired``,
            ``replayed``, ``unknown_key``).
    """

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result


class PeerKeys:
    """The mesh's secrets: the one this node signs with, and the next one.

    Args:
        secret: ``KURA_PEER_SECRET``.
        next_secret: ``KURA_PEER_SECRET_NEXT`` during a rotation.
    """

    def __init__(self, secret: bytes, next_secret: bytes | None = None) -> None:
        self.signing_id = key_id(secret)
        self._keys = {self.signing_id: secret}
        if next_secret is not None:
            self._keys[key_id(next_secret)] = next_secret

    def sign(self, message: bytes, kid: str | None = None) -> bytes:
        """The signature header value for ``message`` (with ``kid``'s secret, or ours)."""
        kid = kid if kid in self._keys else self.signing_id
        mac = hmac.new(self._keys[kid], message, hashlib.sha256).digest()
        return f"{_VERSION} {kid} {base64.b64encode(mac).decode('ascii')}".encode("ascii")

    def verify(self, value: str, message: bytes) -> str:
        """Check a signature header value; return the key id that signed.

        Raises:
            BadSignature: malformed, signed by no secret of ours, or wrong.
        """
        parts = value.split(" ")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise BadSignature("invalid", "malformed signature")
        kid, encoded = parts[1], parts[2]
        secret = self._keys.get(kid)
        if secret is None:
            raise BadSignature("unknown_key", "signed with a secret this node does not hold")
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadSignature("invalid", "malformed signature") from None
        expected = hmac.new(secret, message, hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            raise BadSignature("invalid", "signature does not match")
        return kid


class _Nonces:
    """Nonces seen within the replay window, forgotten once outside it."""

    def __init__(self, window_ms: int, capacity: int = MAX_NONCES) -> None:
        self._window_ms = window_ms
        self._capacity = capacity
        self._seen: set[str] = set()
        self._order: collections.deque[tuple[int, str]] = collections.deque()

    def add(self, nonce: str, now_ms: int) -> bool:
        """Remember ``nonce``; ``False`` when it was already seen (a replay)."""
        order = self._order
        while order and (
            order[0][0] < now_ms - 2 * self._window_ms or len(order) >= self._capacity
        ):
            self._seen.discard(order.popleft()[1])
        if nonce in self._seen:
            return False
        self._seen.add(nonce)
        order.append((now_ms, nonce))
        return True


@attrs.frozen
class PeerCaller:
    """Who sent an admitted internal request, as far as signatures tell.

    Attributes:
        nonce: the request's nonce (the response signature names it).
        kid: the key id that signed it (the response is signed with the same).
        digest: the signed SHA-256 of the request body.
        signed: ``False`` for an unsigned request accepted during the
            rolling-upgrade window, or on a node that does not sign.
    """

    nonce: str = ""
    kid: str | None = None
    digest: str | None = None
    signed: bool = False


UNSIGNED = PeerCaller()


def _one(headers: Mapping[str, list[str]], name: bytes) -> str | None:
    values = headers.get(name.decode("ascii").lower())
    if not values:
        return None
    if len(values) != 1:
        raise BadSignature("invalid", f"{name.decode('ascii')} given more than once")
    return values[0]


class PeerAuthenticator:
    """Both ends of peer signatures for one node.

    Args:
        config: ``config.replication.auth``.
        tenant: this node's tenant (part of every signed request).
        clock: the time signatures are checked against.
        metrics: ``kura_peer_auth_total``.
    """

    def __init__(
        self, config: PeerAuthConfig, *, tenant: str, clock: IReactorTime, metrics: KuraMetrics
    ) -> None:
        self._config = config
        self._tenant = tenant
        self._clock = clock
        self._metrics = metrics
        self.keys = (
            PeerKeys(config.secret, config.next_secret) if config.secret is not None else None
        )
        self._window_ms = config.max_clock_skew_ms
        self._nonces = _Nonces(self._window_ms)
        self._warned_unsigned: set[str] = set()

    @property
    def signs(self) -> bool:
        return self.keys is not None

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _unsigned_allowed(self) -> bool:
        until = self._config.accept_unsigned_until_ms
        return until is not None and self._now_ms() < until

    def _count(self, side: str, result: str) -> None:
        self._metrics.peer_auth.labels(side, result).inc()

    # -- client side ------------------------------------------------------------------

    def request_headers(
        self, method: str, path: bytes, query: bytes, digest: str = EMPTY_SHA256
    ) -> tuple[dict[bytes, list[bytes]], str]:
        """Headers that sign a request, and its nonce (empty when not signing)."""
        if self.keys is None:
            return {}, ""
        nonce = os.urandom(16).hex()
        now = self._now_ms()
        message = request_message(
            method=method,
            path=path,
            query=query,
            tenant=self._tenant,
            time_ms=now,
            nonce=nonce,
            digest=digest,
        )
        return {
            TIME_HEADER: [b"%d" % now],
            NONCE_HEADER: [nonce.encode("ascii")],
            DIGEST_HEADER: [digest.encode("ascii")],
            SIGNATURE_HEADER: [self.keys.sign(message)],
        }, nonce

    def check_response(
        self, nonce: str, status: int, headers: Mapping[str, list[str]], digest: str
    ) -> None:
        """Accept a peer's response to our request ``nonce`` with body ``digest``.

        Raises:
            BadSignature: unsigned (outside the upgrade window), wrong, or
                not for this request.
        """
        if self.keys is None:
            return
        try:
            signature = _one(headers, SIGNATURE_HEADER)
            if signature is None:
                if self._unsigned_allowed():
                    self._count("client", "unsigned_accepted")
                    self._warn_unsigned("response")
                    return
                raise BadSignature("unsigned", "the peer's response is not signed")
            declared = _one(headers, DIGEST_HEADER)
            if declared != digest:
                raise BadSignature("invalid", "response body does not match its digest")
            self.keys.verify(signature, response_message(nonce=nonce, status=status, digest=digest))
        except BadSignature as error:
            self._count("client", error.result)
            raise
        self._count("client", "ok")

    # -- server side ------------------------------------------------------------------

    def check_request(
        self,
        *,
        method: str,
        path: bytes,
        query: bytes,
        headers: Mapping[str, list[str]],
        tenant: str,
        peer: str,
    ) -> PeerCaller:
        """Authenticate a request from its head (``tenant``: the one it names).

        Raises:
            Unauthorized: 401 (the connection closes), naming what is wrong
                but never echoing a secret.
        """
        if self.keys is None:
            return UNSIGNED
        try:
            caller = self._verify(method, path, query, headers, tenant)
        except BadSignature as error:
            self._count("server", error.result)
            log.warn(REFUSED, peer=peer, reason=str(error))
            raise Unauthorized(f"Peer authentication failed: {error}", close=True) from None
        self._count("server", "ok" if caller.signed else "unsigned_accepted")
        return caller

    def _verify(
        self, method: str, path: bytes, query: bytes, headers: Mapping[str, list[str]], tenant: str
    ) -> PeerCaller:
        assert self.keys is not None
        signature = _one(headers, SIGNATURE_HEADER)
        if signature is None:
            if self._unsigned_allowed():
                self._warn_unsigned("request")
                return UNSIGNED
            raise BadSignature("unsigned", "the request is not signed")
        time_text = _one(headers, TIME_HEADER) or ""
        nonce = _one(headers, NONCE_HEADER) or ""
        digest = _one(headers, DIGEST_HEADER) or ""
        if not time_text.isascii() or not time_text.isdigit() or len(time_text) > 15:
            raise BadSignature("invalid", "missing or malformed time")
        if not (16 <= len(nonce) <= 64 and nonce.isascii() and nonce.isalnum()):
            raise BadSignature("invalid", "missing or malformed nonce")
        if not is_digest(digest):
            raise BadSignature("invalid", "missing or malformed body digest")
        sent_ms = int(time_text)
        now = self._now_ms()
        kid = self.keys.verify(
            signature,
            request_message(
                method=method,
                path=path,
                query=query,
                tenant=tenant,
                time_ms=sent_ms,
                nonce=nonce,
                digest=digest,
            ),
        )
        # Time and nonce are checked only once the signature holds, so
        # nobody can fill the nonce table with forged requests.
        if abs(now - sent_ms) > self._window_ms:
            raise BadSignature("expired", "signed outside KURA_MAX_CLOCK_SKEW_MS of our clock")
        if not self._nonces.add(nonce, now):
            raise BadSignature("replayed", "this request was already received")
        return PeerCaller(nonce=nonce, kid=kid, digest=digest, signed=True)

    def response_headers(
        self, caller: PeerCaller, status: int, digest: str
    ) -> list[tuple[bytes, bytes]]:
        """Headers that sign our response to ``caller`` (none to an unsigned caller)."""
        if self.keys is None or not caller.signed:
            return []
        message = response_message(nonce=caller.nonce, status=status, digest=digest)
        return [
            (DIGEST_HEADER, digest.encode("ascii")),
            (SIGNATURE_HEADER, self.keys.sign(message, caller.kid)),
        ]

    def _warn_unsigned(self, what: str) -> None:
        if what not in self._warned_unsigned:
            self._warned_unsigned.add(what)
            log.warn(UNSIGNED_ACCEPTED, what=what)

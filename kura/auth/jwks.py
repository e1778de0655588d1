"""Public keys from a JWKS URL, cached and refreshed: for RS*/PS*/ES*/EdDSA JWTs.

One :class:`JwksKeys` per verifier (an extension's
``KURA_EXTENSION_JWT_VERIFIER_<ID>_JWKS_URL``, or the built-in
``KURA_AUTH_OIDC_*``). The keys are fetched with Twisted's HTTP client (treq on
an ``IAgent``: the reactor never blocks) and parsed by PyJWT
(:class:`jwt.PyJWKSet`); nothing here does cryptography.

When the keys are fetched:

* at :meth:`JwksKeys.start` (node start). Readiness does not wait for it: a
  failed fetch is logged and retried with exponential backoff
  (:data:`RETRY_MIN_SECONDS` doubling up to :data:`RETRY_MAX_SECONDS`);
  until a fetch succeeds every token is refused (fail closed: 401);
* periodically: after the ``Cache-Control: max-age`` of the response,
  clamped to [:data:`MIN_MAX_AGE_SECONDS`, :data:`MAX_MAX_AGE_SECONDS`]
  (:data:`DEFAULT_MAX_AGE_SECONDS` without one);
* when a token names a key id (``kid``) the set does not hold (the issuer
  rotated its keys), at most once per :data:`UNKNOWN_KID_INTERVAL_SECONDS`
  since the last fetch: a flood of tokens with made-up ``kid`` values costs
  the issuer one request per interval, not one per token. Concurrent
  verifications waiting for keys share one fetch (single flight).

A failed refresh keeps the keys already held. Keys whose ``use`` is not
``sig`` and symmetric (``oct``) keys are dropped: a JWKS is public, so an
HMAC key in it would let anyone sign.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from jwt import PyJWK, PyJWKSet
from jwt.exceptions import PyJWTError
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IResponse

from .errors import HostError
from .http_client import BodyTooLarge, read_bounded

log = Logger(namespace="kura.auth")

#: Log events (grep-able, asserted on in tests).
JWKS_FETCHED = "JWKS {name} fetched from {url}: {keys} keys; next refresh in {next_seconds}s"
JWKS_FETCH_FAILED = "JWKS {name} fetch failed: {reason}; retrying in {retry_seconds}s"

#: Refresh bounds: ``Cache-Control: max-age`` is honoured within them.
MIN_MAX_AGE_SECONDS = 300.0
MAX_MAX_AGE_SECONDS = 86_400.0
DEFAULT_MAX_AGE_SECONDS = 3_600.0
#: An unknown ``kid`` triggers a fetch at most this often.
UNKNOWN_KID_INTERVAL_SECONDS = 30.0
#: Backoff of failed fetches.
RETRY_MIN_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
#: One fetch (connect, head and body) must finish within this.
FETCH_TIMEOUT_SECONDS = 10.0
#: Larger documents are refused (a JWKS is a few KiB).
MAX_DOCUMENT_BYTES = 1024 * 1024

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)


class KeyUnavailable(HostError):
    """No key of the set verifies this token (unknown ``kid``, or no keys yet)."""


class FetchFailed(Exception):
    """A JWKS or discovery document could not be fetched or parsed."""


@attrs.frozen
class Document:
    """A fetched JSON document and how long it may be kept (``None``: not said)."""

    body: Any
    max_age: float | None


def max_age_of(cache_control: str | None) -> float | None:
    """The ``max-age`` of a ``Cache-Control`` value, or ``None``."""
    if not cache_control or "no-store" in cache_control.lower():
        return None
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


async def fetch_json(http: HTTPClient, url: str, clock: IReactorTime) -> Document:
    """GET ``url``: its JSON body and ``max-age``.

    Raises:
        FetchFailed: network error, timeout, non-200 status, a body over
            :data:`MAX_DOCUMENT_BYTES`, or not JSON.
    """

    async def exchange() -> Document:
        accept: dict[bytes | str, bytes | str] = {"accept": "application/json"}
        response: IResponse = await http.get(url, headers=accept, allow_redirects=False)
        try:
            raw = await read_bounded(response, MAX_DOCUMENT_BYTES)
        except BodyTooLarge:
            raise FetchFailed(f"body over {MAX_DOCUMENT_BYTES} bytes") from None
        if response.code != 200:
            raise FetchFailed(f"GET {url} answered {response.code}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise FetchFailed(f"GET {url} is not JSON") from None
        values = response.headers.getRawHeaders(b"cache-control") or []
        return Document(body, max_age_of(", ".join(v.decode("latin-1") for v in values)))

    attempt = Deferred.fromCoroutine(exchange())
    attempt.addTimeout(FETCH_TIMEOUT_SECONDS, clock)
    try:
        return await attempt
    except FetchFailed:
        raise
    except TimeoutError:
        raise FetchFailed(f"GET {url} took over {FETCH_TIMEOUT_SECONDS}s") from None
    except Exception as error:  # network errors of every kind
        raise FetchFailed(f"GET {url} failed: {error!r}") from None


Fetch = Callable[[], Awaitable[Document]]


def jwks_source(
    agent: IAgent, clock: IReactorTime, *, jwks_url: str | None, issuer: str | None
) -> tuple[Fetch, str]:
    """A fetch of the JWKS document, and a description of where it comes from.

    With ``jwks_url`` the set is fetched from there. Without it, the URL is
    discovered from ``<issuer>/.well-known/openid-configuration`` (OpenID
    Connect Discovery): that document's ``issuer`` must be ``issuer`` exactly
    and its ``jwks_uri`` must use the issuer's scheme. The discovered URL is
    kept once a JWKS fetch from it succeeded.
    """
    http = HTTPClient(agent)
    if jwks_url is not None:
        fixed = jwks_url

        async def fetch_fixed() -> Document:
            return await fetch_json(http, fixed, clock)

        return fetch_fixed, jwks_url
    if issuer is None:
        raise ValueError("a JWKS source needs a URL or an issuer")
    discovery = issuer.rstrip("/") + "/.well-known/openid-configuration"
    discovered: list[str] = []

    async def fetch_discovered() -> Document:
        if discovered:
            return await fetch_json(http, discovered[0], clock)
        config = (await fetch_json(http, discovery, clock)).body
        if not isinstance(config, dict) or config.get("issuer") != issuer:
            raise FetchFailed(f"{discovery} does not name issuer {issuer!r}")
        uri = config.get("jwks_uri")
        scheme = issuer.split(":", 1)[0].lower()
        if not isinstance(uri, str) or not uri.lower().startswith(scheme + "://"):
            raise FetchFailed(f"{discovery} has no {scheme} jwks_uri")
        document = await fetch_json(http, uri, clock)
        discovered.append(uri)
        return document

    return fetch_discovered, discovery


def _signing_keys(document: Any) -> dict[str, Mapping[str, Any]]:
    """The usable signing keys of a JWKS document by ``kid`` (``""`` if none).

    Raises:
        FetchFailed: not a JWKS, or no usable key (PyJWT parses each one).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchFailed("not a JWKS document (no keys list)")
    kept = [
        key
        for key in document["keys"]
        if isinstance(key, dict) and key.get("use", "sig") == "sig" and key.get("kty") != "oct"
    ]
    try:
        # Validates every key (unusable ones are skipped by PyJWT).
        usable = PyJWKSet.from_dict({"keys": kept})
    except PyJWTError as error:
        raise FetchFailed(f"no usable signing key: {error}") from None
    found: dict[str, Mapping[str, Any]] = {}
    for parsed in usable.keys:
        raw = next(k for k in kept if k.get("kid") == parsed.key_id)
        found[parsed.key_id or ""] = raw
    return found


class JwksKeys:
    """The cached key set of one verifier (see the module docstring).

    Args:
        name: names the verifier in log events.
        fetch: fetches the JWKS document (see :func:`jwks_source`).
        source: the URL (or discovery URL) fetched, for log events.
        clock: schedules refreshes and retries, and rate-limits fetches.
        unknown_kid_interval: the minimum time between two fetches triggered
            by unknown ``kid`` values (the last fetch of any kind counts).
        on_fetched: called with ``"ok"`` or ``"error"`` after each fetch (metrics).
    """

    def __init__(
        self,
        name: str,
        fetch: Fetch,
        *,
        source: str,
        clock: IReactorTime,
        unknown_kid_interval: float = UNKNOWN_KID_INTERVAL_SECONDS,
        on_fetched: Callable[[str], None] = lambda result: None,
    ) -> None:
        self._on_fetched = on_fetched
        self.name = name
        self.source = source
        self._fetch = fetch
        self._clock = clock
        self._interval = unknown_kid_interval
        self._keys: dict[str, Mapping[str, Any]] = {}
        self._parsed: dict[tuple[str, str], PyJWK] = {}
        self._inflight: list[Deferred[None]] | None = None
        self._last_fetch: float | None = None
        self._failures = 0
        self._timer: IDelayedCall | None = None
        self._running = False
        #: How many fetches were started (for tests and diagnostics).
        self.fetches = 0

    @property
    def loaded(self) -> bool:
        """Whether a fetch has succeeded (keys are held)."""
        return bool(self._keys)

    def start(self) -> None:
        """Fetch now, then keep the set fresh (idempotent)."""
        if self._running:
            return
        self._running = True
        self.refresh()

    def stop(self) -> None:
        """Stop refreshing (a fetch under way still completes)."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def refresh(self) -> Deferred[None]:
        """Fetch the set now, or join the fetch under way; fires when it ended
        (successful or not: failures are logged, never raised)."""
        waiter: Deferred[None] = Deferred()
        if self._inflight is not None:
            self._inflight.append(waiter)
            return waiter
        self._inflight = [waiter]
        self._last_fetch = self._clock.seconds()
        self.fetches += 1
        Deferred.fromCoroutine(self._fetch_and_install()).addBoth(self._fetched)
        return waiter

    async def _fetch_and_install(self) -> float:
        document = await self._fetch()
        keys = _signing_keys(document.body)
        self._keys = keys
        self._parsed = {}
        max_age = DEFAULT_MAX_AGE_SECONDS if document.max_age is None else document.max_age
        next_seconds = min(MAX_MAX_AGE_SECONDS, max(MIN_MAX_AGE_SECONDS, max_age))
        log.info(
            JWKS_FETCHED, name=self.name, url=self.source, keys=len(keys), next_seconds=next_seconds
        )
        return next_seconds

    def _fetched(self, result: float | Failure) -> None:
        waiters, self._inflight = self._inflight or [], None
        self._on_fetched("error" if isinstance(result, Failure) else "ok")
        if isinstance(result, Failure):
            self._failures += 1
            delay = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (self._failures - 1))
            reason = str(result.value) if result.check(FetchFailed) else repr(result.value)
            log.warn(JWKS_FETCH_FAILED, name=self.name, reason=reason, retry_seconds=delay)
        else:
            self._failures = 0
            delay = result
        self._schedule(delay)
        for waiter in waiters:
            waiter.callback(None)

    def _schedule(self, delay: float) -> None:
        if not self._running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self.refresh)

    def _lookup(self, kid: str | None, algorithm: str) -> PyJWK | None:
        if kid is None:
            # A token without kid: only unambiguous when the set has one key.
            if len(self._keys) != 1:
                return None
            kid = next(iter(self._keys))
        raw = self._keys.get(kid)
        if raw is None:
            return None
        cached = self._parsed.get((kid, algorithm))
        if cached is None:
            # The key's own alg when it states one (PyJWT then refuses a token
            # of another algorithm); else the token's, which PyJWT only
            # accepts for a key of the matching type.
            try:
                cached = PyJWK(dict(raw), algorithm=raw.get("alg") or algorithm)
            except PyJWTError as error:
                raise KeyUnavailable(f"key {kid!r} cannot verify {algorithm}: {error}") from None
            self._parsed[(kid, algorithm)] = cached
        return cached

    async def key(self, kid: str | None, algorithm: str) -> PyJWK:
        """The key that verifies a token with this ``kid`` and ``alg``.

        Waits for a fetch when the set does not hold ``kid`` and the last
        fetch is older than the unknown-kid interval (or one is under way).

        Raises:
            KeyUnavailable: no such key, even after a refresh allowed now.
        """
        found = self._lookup(kid, algorithm)
        if found is not None:
            return found
        now = self._clock.seconds()
        if self._inflight is not None or (
            self._last_fetch is None or now - self._last_fetch >= self._interval
        ):
            await self.refresh()
            found = self._lookup(kid, algorithm)
            if found is not None:
                return found
        if not self._keys:
            raise KeyUnavailable(f"no keys from {self.source} yet")
        raise KeyUnavailable(f"no key {kid!r} in the JWKS of {self.source}")

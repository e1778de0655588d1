"""The peer client: treq over one pooled Agent (mTLS when configured).

Every request carries the tenant header (see :mod:`.wire`) and, with a peer
secret, a signature (:mod:`.peer_auth`). Every response comes back as a
:class:`PeerResponse`, which the caller verifies once it has the body's
digest: nothing a peer sends is used before its signature held. Small JSON
exchanges (status, catch-up pages) have a total timeout; body transfers
(uploads, catch-up bodies) have none and are watched for byte progress by
their callers instead, so a large healthy transfer is never cut off.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.python.components import proxyForInterface
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse

from kura.web.client_pool import quiet_pool

from . import wire
from .peer_auth import DIGEST_HEADER, EMPTY_SHA256, BadSignature, PeerAuthenticator, sha256_hex

#: Seconds a status check or a catch-up page may take in total.
JSON_TIMEOUT = 30.0
#: Seconds to establish a TCP connection to a peer.
CONNECT_TIMEOUT = 10.0
#: Largest JSON body accepted from a peer (a page of 2048 manifests fits).
MAX_JSON_BYTES = 16 * 1024 * 1024


class PeerError(Exception):
    """A peer answered, but not with what the protocol promises.

    Attributes:
        status: the HTTP status (0 when the body was unusable).
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class PeerResponse(proxyForInterface(IResponse, "original")):  # type: ignore[misc]
    """A peer's response, to be verified (:meth:`verify`) before it is used.

    Attributes:
        original: the response as treq delivered it.
    """

    def __init__(self, original: IResponse, nonce: str, auth: PeerAuthenticator) -> None:
        self.original = original
        self._nonce = nonce
        self._auth = auth

    def verify(self, digest: str = EMPTY_SHA256) -> None:
        """Check the response's signature over its status and body ``digest``.

        Raises:
            PeerError: the response is not from a member of the mesh, or its
                body is not the one the peer signed.
        """
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in self.original.headers.getAllRawHeaders()
        }
        try:
            self._auth.check_response(self._nonce, int(self.original.code), headers, digest)
        except BadSignature as error:
            raise PeerError(f"peer response refused: {error}", int(self.original.code)) from None


class PeerClient:
    """HTTP requests to peers' internal planes.

    Args:
        reactor: where the Agent and its pool connect (their timeouts use
            its time too).
        tenant_id: sent with every request.
        auth: signs requests and checks responses.
        tls_policy: the client side of peer mTLS (``None``: plain HTTP or
            the default browser-like policy for https URLs).
        max_connections_per_peer: persistent connections kept per peer.
    """

    def __init__(
        self,
        *,
        reactor: IReactorTCP,
        tenant_id: str,
        auth: PeerAuthenticator,
        tls_policy: IPolicyForHTTPS | None = None,
        max_connections_per_peer: int = 8,
    ) -> None:
        self._auth = auth
        self._tenant = tenant_id.encode("ascii")
        self.pool = quiet_pool(reactor, max_connections_per_peer)
        agent = Agent(
            reactor,
            contextFactory=tls_policy or BrowserLikePolicyForHTTPS(),
            connectTimeout=CONNECT_TIMEOUT,
            pool=self.pool,
        )
        self._http = HTTPClient(agent)

    def request(
        self,
        method: str,
        target: str,
        path: str,
        params: list[tuple[str, str]] | None = None,
        body: IBodyProducer | None = None,
        timeout: float | None = None,
        body_sha256: str = EMPTY_SHA256,
    ) -> Deferred[PeerResponse]:
        """Send one signed request; the Deferred is cancellable (the connection is aborted).

        Args:
            body_sha256: the SHA-256 of ``body`` (``X-Kura-Content-Sha256``,
                signed when this node signs), which the peer verifies before
                it publishes anything.
        """
        query = wire.encode_query(params or ())
        signed, nonce = self._auth.request_headers(
            method, path.encode("ascii"), query.encode("ascii"), body_sha256
        )
        headers = Headers({wire.TENANT_HEADER: [self._tenant], **signed})
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/octet-stream"])
            # Declared signed or not: the peer checks the body against it
            # before publishing (a previous release ignores it unsigned).
            headers.setRawHeaders(DIGEST_HEADER, [body_sha256.encode("ascii")])
        d: Deferred[Any] = self._http.request(
            method,
            wire.url(target, path, params or ()),
            headers=headers,
            data=body,
            timeout=timeout,
        )
        return d.addCallback(PeerResponse, nonce, self._auth)

    async def get_json(
        self,
        target: str,
        path: str,
        params: list[tuple[str, str]] | None = None,
        timeout: float = JSON_TIMEOUT,
    ) -> Any:
        """GET a JSON document (bounded in size and time).

        Raises:
            PeerError: a non-200 answer or an unusable body.
            Exception: connection failures, timeouts (``CancelledError``).
        """
        response = await self.request("GET", target, path, params, timeout=timeout)
        if response.code != 200:
            await drain(response)
            raise PeerError(f"{path} answered {response.code}", response.code)
        length = response.length
        if isinstance(length, int) and length > MAX_JSON_BYTES:
            await drain(response)
            raise PeerError(f"{path} answered {length} bytes", response.code)
        raw: bytes = await treq.content(response)
        response.verify(sha256_hex(raw))
        try:
            return json.loads(raw)
        except ValueError as error:
            raise PeerError(f"{path} answered invalid JSON: {error}", response.code) from None

    async def status(self, target: str, timeout: float = JSON_TIMEOUT) -> wire.PeerStatus:
        """``GET /_internal/status`` of ``target``.

        Raises:
            PeerError: the answer is not a status document.
        """
        data = await self.get_json(target, wire.STATUS_PATH, timeout=timeout)
        try:
            return wire.PeerStatus.from_json(data)
        except ValueError as error:
            raise PeerError(str(error)) from None

    async def close(self) -> None:
        """Close idle pooled connections (at stop)."""
        await self.pool.closeCachedConnections()


async def drain(response: IResponse) -> bytes:
    """Read (and return) a response body so its connection can be reused."""
    data: bytes = await treq.content(response)
    return data


async def drain_verified(response: PeerResponse) -> bytes:
    """Read a response body and verify the response (see :meth:`PeerResponse.verify`)."""
    data = await drain(response)
    response.verify(sha256_hex(data))
    return data

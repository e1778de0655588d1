"""A small JSON-over-HTTP client for extensions, on treq.

One :class:`JsonHttpClient` per ``KURA_EXTENSION_HTTP_CLIENT_<ID>_*`` group.
Each attempt has a connect deadline (the agent's) and a whole-attempt
deadline (response head and body, on the injected clock). A network error
(connection refused/reset/timed out, DNS failure, the connection dropping
before the response) is retried once after 100 ms; a slow response (the
attempt deadline) and any HTTP status are not retried: retrying a backend
that is slow or answering doubles its load and cannot fit the hook deadline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import error as net
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent, IResponse

from kura.config.extension import HttpClientConfig
from kura.telemetry.metrics import KuraMetrics

from .errors import HostError

#: Pause before the one retry of a network error.
RETRY_DELAY_SECONDS = 0.1
#: Response bodies beyond this are refused (an auth answer is small).
MAX_RESPONSE_BYTES = 1024 * 1024

_NETWORK_ERRORS = (
    net.ConnectError,  # refused, connect timeout, no route, ...
    net.DNSLookupError,
    net.ConnectionLost,
    net.ConnectionDone,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    ResponseFailed,
)


@attrs.frozen
class _Call:
    """One request to send (and, on a network error, to send once more)."""

    method: str
    url: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: Any

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


class HttpClientError(HostError):
    """The request failed (network, deadline, oversized body)."""


class BodyTooLarge(Exception):
    """A response body grew past the reader's limit (it was not read further)."""


async def read_bounded(response: IResponse, limit: int) -> bytes:
    """The whole body of ``response``, refusing one over ``limit`` bytes.

    Raises:
        BodyTooLarge: the body passed ``limit``.
    """
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


@attrs.frozen
class JsonResponse:
    """An HTTP response.

    Attributes:
        status: the status code.
        headers: lower-cased names; repeated headers joined with ``", "``.
        body: the parsed JSON body, or ``None`` when it is empty or not JSON.
        raw: the body bytes.
    """

    status: int
    headers: Mapping[str, str]
    body: Any
    raw: bytes = attrs.field(repr=False)


class JsonHttpClient:
    """See the module docstring.

    Args:
        client_id: the normalised id (metric label).
        config: base URL and timeouts.
        agent: the ``IAgent`` to send through (connect timeout and pool
            configured by the host).
        clock: for the attempt deadline and the retry pause.
        metrics: ``kura_extension_http_client_requests``.
    """

    def __init__(
        self,
        client_id: str,
        config: HttpClientConfig,
        *,
        agent: IAgent,
        clock: IReactorTime,
        metrics: KuraMetrics,
    ) -> None:
        self.client_id = client_id
        self._config = config
        self._http = HTTPClient(agent)
        self._clock = clock
        self._metrics = metrics

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> JsonResponse:
        """Send ``method base_url+path`` and return the response.

        Args:
            path: appended to the base URL (a leading ``/`` is added).
            headers: request headers.
            query: query parameters (encoded).
            body: sent as JSON when not ``None``.

        Raises:
            HttpClientError: the request failed after its retry, timed out,
                or the body was larger than :data:`MAX_RESPONSE_BYTES`.
        """
        url = self._config.base_url + ("" if path.startswith("/") else "/") + path
        call = _Call(method, url, headers or {}, query or {}, body)
        for attempt in (1, 2):
            try:
                return await self._attempt(call)
            except _NETWORK_ERRORS as error:
                self._count("network" if not isinstance(error, net.ConnectError) else "connect")
                if attempt == 2:
                    raise HttpClientError(f"{call} failed twice: {error!r}") from None
            await deferLater(self._clock, RETRY_DELAY_SECONDS, lambda: None)
        raise AssertionError("unreachable")

    async def _attempt(self, call: _Call) -> JsonResponse:
        attempt = Deferred.fromCoroutine(self._exchange(call))
        attempt.addTimeout(self._config.request_timeout_ms / 1000, self._clock)
        try:
            return await attempt
        except TimeoutError:
            self._count("timeout")
            raise HttpClientError(
                f"{call} took over {self._config.request_timeout_ms} ms"
            ) from None
        except BodyTooLarge:
            self._count("too_large")
            raise HttpClientError(f"{call}: body over {MAX_RESPONSE_BYTES} bytes") from None

    async def _exchange(self, call: _Call) -> JsonResponse:
        extra: dict[str, Any] = {} if call.body is None else {"json": call.body}
        sent: dict[bytes | str, bytes | str] = {"accept": "application/json"}
        sent.update(call.headers)
        response: IResponse = await self._http.request(
            call.method,
            call.url,
            headers=sent,
            params=dict(call.query),
            allow_redirects=False,
            **extra,
        )
        raw = await read_bounded(response, MAX_RESPONSE_BYTES)
        self._count(f"{response.code // 100}xx")
        return JsonResponse(
            status=response.code,
            headers={
                name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
                for name, values in response.headers.getAllRawHeaders()
            },
            body=_json_or_none(raw),
            raw=raw,
        )

    def _count(self, result: str) -> None:
        self._metrics.extension_http_client_requests.labels(self.client_id, result).inc()


def _json_or_none(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None

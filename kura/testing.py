"""Deterministic helpers for kura's tests: in-memory nodes and exchanges.

:func:`memory_node` builds a complete node on an in-memory reactor with
storage work run inline, so a request fed to :class:`Exchange` is answered
synchronously and every test is deterministic. The node still uses real
SQLite, real files and the real twisted.web channel, request and Klein app.
Helpers that start processes or open sockets live in ``tests/support/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from kura.config import KuraConfig
from kura.service import KuraNode
from kura.storage.interfaces import IBlockingRunner
from kura.storage.runner import ImmediateRunner

T = TypeVar("T")

__all__ = [
    "ClientTransport",
    "ControlledRunner",
    "Exchange",
    "Response",
    "failed",
    "files_under",
    "memory_node",
    "parse_responses",
    "request",
    "sample",
    "succeeded",
    "test_config",
]


def succeeded(d: Deferred[T]) -> T:
    """The result of an already-fired Deferred (fails the test otherwise)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def failed(d: Deferred[Any]) -> BaseException:
    """The exception of an already-failed Deferred."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    error = results[0].value
    assert isinstance(error, BaseException)
    return error


def test_config(data_dir: str, **environ: str) -> KuraConfig:
    """A configuration rooted at ``data_dir`` with ``environ`` overrides."""
    base = {
        "KURA_DATA_DIR": data_dir,
        "KURA_PORT": "0",
        "KURA_INTERNAL_PORT": "0",
        "KURA_NODE_URL": "http://127.0.0.1:0",
        "KURA_CAS_CAPACITY_BYTES": str(1 << 30),
        "KURA_LOG_FORMAT": "text",
        # A real gRPC server binds real sockets and threads; in-memory nodes
        # have neither (tests that want it set KURA_GRPC_ENABLED=true).
        "KURA_GRPC_ENABLED": "false",
    }
    base.update(environ)
    return KuraConfig.from_environ(base, measure_filesystem=lambda path: 1 << 40)


def memory_node(
    data_dir: str, *, runner: IBlockingRunner | None = None, **environ: str
) -> KuraNode:
    """A started node on a :class:`MemoryReactorClock`, storage run inline.

    ``runner`` replaces the default :class:`ImmediateRunner` (e.g. a
    :class:`ControlledRunner` that holds chosen calls back).
    """
    os.makedirs(data_dir, exist_ok=True)
    reactor = MemoryReactorClock()
    node = KuraNode(
        test_config(data_dir, **environ),
        reactor,
        registry=CollectorRegistry(),
        runner=runner or ImmediateRunner(),
    )
    node.startService()
    succeeded(node.started)
    return node


@attrs.frozen
class Response:
    """A parsed HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes, head_methods: list[bool]) -> tuple[list[Response], bytes]:
    """Parse complete HTTP/1.1 responses from ``data``; return them and the rest.

    ``head_methods`` says, per expected response in order, whether it answers
    a HEAD (which carries no body); it is consumed as responses are parsed.
    Interim (1xx) responses are skipped.
    """
    found: list[Response] = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return found, data
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4 :]
        if 100 <= status < 200:
            data = rest
            continue
        is_head = head_methods[0] if head_methods else False
        if is_head or status in (204, 304):
            body, after = b"", rest
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length:
                return found, data
            body, after = rest[:length], rest[length:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, after_or_none = _dechunk(rest)
            if after_or_none is None:
                return found, data
            after = after_or_none
        else:
            body, after = rest, b""
        if head_methods:
            head_methods.pop(0)
        found.append(Response(status, headers, body))
        data = after


def _dechunk(data: bytes) -> tuple[bytes, bytes | None]:
    body = b""
    while True:
        end = data.find(b"\r\n")
        if end < 0:
            return body, None
        size = int(data[:end].split(b";")[0], 16)
        if len(data) < end + 2 + size + 2:
            return body, None
        body += data[end + 2 : end + 2 + size]
        data = data[end + 2 + size + 2 :]
        if size == 0:
            return body, data


def files_under(path: str) -> list[str]:
    """Every regular file below ``path``, relative to it and sorted."""
    found = []
    for directory, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(directory, name), path) for name in names]
    return sorted(found)


def sample(node: KuraNode, name: str, **labels: str) -> float:
    """The value of one metric sample of ``node`` (0.0 when it was never set)."""
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@implementer(IBlockingRunner)
class ControlledRunner:
    """An inline runner that records every call and can hold chosen calls back.

    A call runs at once on the calling thread (as :class:`ImmediateRunner`),
    with :attr:`inside` above zero while it runs, unless :attr:`hold` says
    otherwise for its function: then it waits in :attr:`held` until
    :meth:`release` runs it.

    Attributes:
        calls: the qualified name of every function run, in order.
        hold: ``hold(f)`` is true for functions to hold back.
        inside: how many runner calls are executing right now.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hold: Any = lambda f: False
        self.held: list[tuple[Any, tuple[Any, ...], dict[str, Any], Deferred[Any]]] = []
        self.inside = 0

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.hold(f):
            waiting: Deferred[Any] = Deferred()
            self.held.append((f, args, kwargs, waiting))
            return waiting
        return self._call(f, args, kwargs)

    def _call(self, f: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Deferred[Any]:
        self.calls.append(getattr(f, "__qualname__", repr(f)))
        self.inside += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            return fail(Failure())
        finally:
            self.inside -= 1
        return succeed(result)

    def release(self) -> None:
        """Run the oldest held call and fire its Deferred."""
        f, args, kwargs, waiting = self.held.pop(0)
        self._call(f, args, kwargs).chainDeferred(waiting)


class ClientTransport(StringTransport):
    """A :class:`StringTransport` that can be half-closed, as a TCP socket can."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Exchange:
    """One client connection to a node's public channel, bytes in, responses out.

    Args:
        node: the node to talk to.
        peer: the TCP peer address the node sees (IPv4 or IPv6).
    """

    def __init__(self, node: KuraNode, *, peer: str = "127.0.0.1") -> None:
        self.node = node
        address = (
            IPv6Address("TCP", peer, 50000) if ":" in peer else IPv4Address("TCP", peer, 50000)
        )
        self.transport = ClientTransport(peerAddress=address)
        self.channel = node.site.make_channel()
        self.channel.makeConnection(self.transport)
        self._pending = b""
        self._heads: list[bool] = []

    def send(self, data: bytes, *, heads: list[bool] | None = None) -> None:
        """Feed raw bytes; ``heads`` flags which expected responses answer HEADs."""
        self._heads.extend(heads or [])
        self.channel.dataReceived(data)

    def responses(self) -> list[Response]:
        """Everything the server completed so far (interim responses skipped)."""
        self._pending += self.transport.value()
        self.transport.clear()
        found, self._pending = parse_responses(self._pending, self._heads)
        return found

    @property
    def closed(self) -> bool:
        """Whether the server closed (or is closing, or half-closed) the connection."""
        return bool(
            self.transport.disconnecting
            or self.transport.disconnected
            or self.transport.write_closed
        )

    def disconnect(self) -> None:
        """The client goes away, in the order a TCP transport reports it.

        As ``FileDescriptor.connectionLost`` does, the transport's producer
        (the channel, which forwards to a response body producer) is stopped
        first, then the protocol loses its connection.
        """
        producer = self.transport.producer
        if producer is not None:
            producer.stopProducing()
        self.transport.disconnected = True
        self.channel.connectionLost(Failure(ConnectionDone("client went away")))

    def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request with a Content-Length body and return its response."""
        lines = [f"{method} {target} HTTP/1.1", "Host: kura"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.send(raw, heads=[method == "HEAD"])
        responses = self.responses()
        assert len(responses) == 1, f"expected one response, got {responses!r}"
        return responses[0]


def request(
    node: KuraNode,
    method: str,
    target: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """One request on a fresh connection to ``node`` (see :meth:`Exchange.request`)."""
    return Exchange(node).request(method, target, body, headers)

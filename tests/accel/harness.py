"""Driving the same-port accelerator deterministically.

A :class:`Rig` rebuilds an in-memory node's :class:`Accelerator` around a
:class:`~kura.accel.testing.FakeTransferEngine` (and, when a test asks, a
stand-in store or authorization), on the node's ``MemoryReactorClock``.
Each :class:`Client` is one connection: a ``StringTransport`` attached to a
``SamePortProtocol`` from the real factory. Bytes go in with :meth:`Client.send`;
whatever the accelerator, the fake engine or a twisted.web channel it handed
the connection to wrote comes out as parsed responses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from kura.accel.accelerator import Accelerator
from kura.accel.protocol import SamePortFactory, SamePortProtocol
from kura.accel.testing import FakeTransferEngine
from kura.api.routes import xcode_cas
from kura.domain.artifacts import Manifest
from kura.service import KuraNode
from kura.testing import ClientTransport, Response, parse_responses, request, sample
from kura.web.routing import Query

CAS = "/api/cache/cas/{}?tenant_id=default"
CAS_ROUTE = "/api/cache/cas/{id}"


def get(target: str, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    """A request head for ``target`` with a Host and ``headers`` (``"Name: value"``)."""
    lines = [f"{method} {target} {version}", "Host: kura", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def upload(node: KuraNode, key: str, body: bytes) -> None:
    """Store ``body`` as the Xcode CAS artifact ``key`` (through twisted.web)."""
    assert request(node, "POST", CAS.format(key), body).status == 204


def artifact_id(node: KuraNode, key: str) -> str:
    """The id of the Xcode CAS artifact ``key``."""
    address = xcode_cas({"id": key}, Query({"tenant_id": ["default"]}), "default")
    return node.store.artifact_id(address)


def blob_path(node: KuraNode, key: str) -> str:
    """Where the Xcode CAS artifact ``key``'s body file is."""
    manifest = node.store.cached_manifest(artifact_id(node, key))
    assert manifest is not None and manifest.blob_path is not None
    return str(node.store.layout.absolute(manifest.blob_path))


class AcceleratedTransport(ClientTransport):
    """A client connection's transport as the accelerator sees it."""

    nodelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


class Client:
    """One connection to a rig's accelerator (see the module docstring)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.transport = AcceleratedTransport()
        protocol = SamePortFactory(accelerator).buildProtocol(None)
        assert isinstance(protocol, SamePortProtocol)
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        self._pending = b""
        self._heads: list[bool] = []

    def send(self, data: bytes, *, heads: list[bool] | None = None) -> None:
        """Feed raw bytes; ``heads`` flags which expected responses answer HEADs."""
        self._heads.extend(heads or [])
        self.protocol.dataReceived(data)

    def responses(self) -> list[Response]:
        """Every response completed since the last call."""
        self._pending += self.transport.value()
        self.transport.clear()
        found, self._pending = parse_responses(self._pending, self._heads)
        return found

    def raw(self) -> bytes:
        """Everything written since the last call, unparsed."""
        data = self._pending + self.transport.value()
        self._pending = b""
        self.transport.clear()
        return data

    @property
    def closed(self) -> bool:
        """Whether the server closed (or is closing) the connection."""
        return bool(self.transport.disconnecting or self.transport.disconnected)

    @property
    def aborted(self) -> bool:
        """Whether the server aborted the connection (no graceful close)."""
        return bool(self.transport.disconnected)

    @property
    def reading(self) -> bool:
        """Whether the server reads from the connection (it pauses during a transfer)."""
        return self.transport.producerState == "producing"

    def lose(self) -> None:
        """The client goes away, in the order a TCP transport reports it."""
        producer = self.transport.producer
        if producer is not None:
            producer.stopProducing()
        self.transport.disconnected = True
        self.protocol.connectionLost(Failure(ConnectionDone("client went away")))


class Rig:
    """A node's accelerator with a fake transfer engine (see the module docstring).

    Args:
        node: an in-memory node (its store, site, clock and metrics are used).
        engine: the engine; a fresh :class:`FakeTransferEngine` by default.
        replace: collaborators to swap (``store=...``, ``authorization=...``).
    """

    def __init__(
        self, node: KuraNode, *, engine: FakeTransferEngine | None = None, **replace: Any
    ) -> None:
        self.node = node
        self.clock = node.reactor
        self.engine = engine or FakeTransferEngine()
        base = node.accelerator
        self.accelerator = Accelerator(
            base.settings, attrs.evolve(base.collaborators, **replace), self.engine
        )
        self.accelerator.start()

    def connect(self) -> Client:
        return Client(self.accelerator)

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.node, name, **labels)

    def fallbacks(self, reason: str) -> float:
        return self.metric("kura_accelerator_fallbacks_total", reason=reason)

    def requests(self, status: int, route: str = CAS_ROUTE) -> float:
        return self.metric("kura_http_requests_total", route=route, status=str(status))

    def egress(self, result: str, producer: str = "xcode") -> float:
        return self.metric(
            "kura_artifact_egress_completions_total", producer=producer, result=result
        )

    @property
    def served(self) -> float:
        return self.metric("kura_artifact_serving_paths_total", path=self.engine.mode)

    def held(self) -> dict[str, int]:
        """Everything a request holds while it is served; all zero once every one is over."""
        accelerator = self.accelerator
        return {
            "permits": accelerator.permits.in_use,
            "reservations": self.engine.reserved,
            "leases": accelerator.handles.lent,
            "in flight": self.node.traffic.inflight,
        }


NOTHING_HELD = {"permits": 0, "reservations": 0, "leases": 0, "in flight": 0}


class StoreStandIn:
    """The node's store, with its manifest look-ups replaced.

    Args:
        store: the real store (everything else is delegated to it).
        lookup: what ``manifest(artifact_id)`` does instead; nothing is cached,
            so every look-up goes through it.
    """

    def __init__(
        self, store: Any, lookup: Callable[[str], Deferred[Manifest | None] | Manifest | None]
    ) -> None:
        self._store = store
        self._lookup = lookup

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def cached_manifest(self, artifact_id: str) -> None:
        return None

    async def manifest(self, artifact_id: str) -> Manifest | None:
        found = self._lookup(artifact_id)
        if isinstance(found, Deferred):
            return await found
        return found


class HeldAuthorization:
    """Checks every request and answers when the test fires its Deferred.

    Attributes:
        pending: one Deferred per check, in order: fire it with the extra
            response headers, or fail it with the ``KuraError`` to answer.
    """

    def __init__(self) -> None:
        self.pending: list[Deferred[list[tuple[bytes, bytes]]]] = []

    def needs_check(self, spec: Any) -> bool:
        return True

    def context(self, **fields: Any) -> dict[str, Any]:
        return fields

    def check_response(self, ctx: Any, status: int) -> Deferred[list[tuple[bytes, bytes]]]:
        decided: Deferred[list[tuple[bytes, bytes]]] = Deferred()
        self.pending.append(decided)
        return decided

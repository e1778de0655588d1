"""An in-memory mesh of memory nodes: real peer clients, fake network, simulated time.

Each node is a complete :func:`kura.testing.memory_node` on its own
``MemoryReactorClock``. When a node's treq Agent connects to a peer's
``host:port``, :class:`MemoryMesh` wires the connection to that peer's
internal ``KuraSite`` through ``twisted.test.iosim`` transports, so the
production client, receiver, outbox and catch-up code run unchanged and
deterministically. Time only moves when the mesh advances it, in lockstep
on every node.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from kura.service import KuraNode
from kura.storage.runner import ImmediateRunner
from kura.testing import Exchange, Response, succeeded, test_config
from tests.support.mesh import MESH_SECRET

PORT = 7443


def host_of(index: int) -> str:
    return f"127.0.0.{index + 2}"


def url_of(index: int) -> str:
    return f"http://{host_of(index)}:{PORT}"


@implementer(IHostnameResolver)
class MeshResolver:
    """Resolves IP literals to themselves and names through ``names``."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.lookups: list[str] = []

    def resolveHostName(
        self, receiver: IResolutionReceiver, host: str, *args: Any, **kwargs: Any
    ) -> Any:
        port = kwargs.get("portNumber", args[0] if args else 0)
        self.lookups.append(host)
        receiver.resolutionBegan(None)
        for address in self.names.get(host, [host] if host[0].isdigit() else []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, port))
        receiver.resolutionComplete()
        return None


#: Bytes moved per delivery step (a TCP-ish segment train).
SEGMENT = 64 * 1024


class PausableTransport(iosim.FakeTransport):
    """A fake transport whose protocol can pause delivery to itself, as TCP can."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.loseConnection()


class Link:
    """One connection between two nodes: moves bytes in segments, honours pauses."""

    def __init__(
        self, source: str, target: str, client: PausableTransport, server: PausableTransport
    ) -> None:
        self.source = source
        self.target = target
        self.client = client
        self.server = server

    @property
    def closed(self) -> bool:
        return bool(self.client.disconnected and self.server.disconnected)

    def _move(self, src: PausableTransport, dst: PausableTransport) -> bool:
        if dst.paused or not src.stream:
            return False
        data = b"".join(src.stream)
        src.stream = [data[SEGMENT:]] if len(data) > SEGMENT else []
        dst.bufferReceived(data[:SEGMENT])
        return True

    def step(self) -> bool:
        moved = self._move(self.client, self.server) | self._move(self.server, self.client)
        if moved:
            return True
        for here, there in ((self.server, self.client), (self.client, self.server)):
            if here.disconnecting and not here.disconnected and not here.stream:
                here.disconnected = True
                there.disconnecting = True
                there.reportDisconnect()
                return True
        return False

    def cut(self) -> None:
        """The peer is gone: whatever was in flight is lost."""
        for io in (self.client, self.server):
            io.stream.clear()
            if not io.disconnected:
                io.disconnecting = io.disconnected = True
                io.disconnectReason = ConnectionLost("peer down")
                io.reportDisconnect()


class MemoryMesh:
    """Memory nodes connected through in-memory transports (see the module docstring)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.nodes: dict[str, KuraNode] = {}
        self.down: set[str] = set()
        self.frozen: set[str] = set()
        self._seen: dict[str, int] = {}
        self._links: list[Link] = []
        self.now = 0.0
        self.connections: list[tuple[str, str]] = []
        #: DNS names the nodes' resolvers know (name -> addresses).
        self.names: dict[str, list[str]] = {}

    def add(self, index: int, peers: list[int] | None = None, **environ: str) -> KuraNode:
        """Start node ``index`` with the given peer indexes as seeds."""
        host = host_of(index)
        seeds = ",".join(url_of(p) for p in (peers or []))
        data_dir = os.path.join(self.root, f"node{index}")
        os.makedirs(data_dir, exist_ok=True)
        reactor = MemoryReactorClock()
        reactor.installNameResolver(MeshResolver(self.names))
        reactor.advance(self.now)
        config = test_config(
            data_dir,
            KURA_INTERNAL_PORT=str(PORT),
            KURA_PORT="4000",
            KURA_NODE_URL=url_of(index),
            KURA_PEERS=seeds,
            # Mesh tests clean namespaces anonymously; who may is tested elsewhere.
            **{"KURA_PEER_SECRET": MESH_SECRET, "KURA_ALLOW_ANONYMOUS_DELETE": "true", **environ},
        )
        node = KuraNode(config, reactor, registry=CollectorRegistry(), runner=ImmediateRunner())
        node.startService()
        succeeded(node.started)
        self.nodes[host] = node
        self._seen[host] = 0
        return node

    def node(self, index: int) -> KuraNode:
        return self.nodes[host_of(index)]

    # -- the fake network ------------------------------------------------------------

    def _connect_new(self) -> bool:
        moved = False
        for host, node in list(self.nodes.items()):
            clients = node.reactor.tcpClients
            while self._seen[host] < len(clients):
                index = self._seen[host]
                self._seen[host] += 1
                target_host, port, factory, _, _ = clients[index]
                connector = node.reactor.connectors[index]
                target = self.nodes.get(target_host)
                moved = True
                if target is None or port != PORT or {host, target_host} & self.down:
                    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                    continue
                client_address = IPv4Address("TCP", host, 40000 + index)
                server_address = IPv4Address("TCP", target_host, port)
                server = target.replication.site.make_channel()
                server_io = PausableTransport(
                    server, isServer=True, hostAddress=server_address, peerAddress=client_address
                )
                client = factory.buildProtocol(server_address)
                client_io = PausableTransport(
                    client, isServer=False, hostAddress=client_address, peerAddress=server_address
                )
                server.makeConnection(server_io)
                client.makeConnection(client_io)
                self._links.append(Link(host, target_host, client_io, server_io))
                self.connections.append((host, target_host))
        return moved

    def flush(self) -> None:
        """Deliver everything deliverable without moving time."""
        for _ in range(100_000):
            moved = False
            for node in self.nodes.values():
                node.reactor.advance(0)
            moved |= self._connect_new()
            alive = []
            for link in self._links:
                if {link.source, link.target} & self.down:
                    link.cut()
                    moved = True
                    continue
                if link.target not in self.frozen:
                    moved |= link.step()
                if not link.closed:
                    alive.append(link)
            self._links = alive
            if not moved:
                return
        raise AssertionError("the mesh never went quiet")

    def advance(self, seconds: float) -> None:
        """Move every clock forward by ``seconds``, firing what falls due on the way."""
        self.run_until(lambda: False, seconds, fail=False)

    def _next_call(self) -> float | None:
        times = [
            call.getTime()
            for node in self.nodes.values()
            for call in node.reactor.getDelayedCalls()
            if call.active()
        ]
        return min(times) if times else None

    def _set_time(self, when: float) -> None:
        self.now = when
        for node in self.nodes.values():
            node.reactor.advance(when - node.reactor.seconds())

    def run_until(
        self, done: Callable[[], Any], timeout: float = 120.0, *, fail: bool = True
    ) -> float:
        """Run events in time order until ``done()`` is truthy; return the time taken."""
        start = self.now
        deadline = start + timeout
        while True:
            self.flush()
            if done():
                return self.now - start
            next_call = self._next_call()
            if next_call is None or next_call > deadline:
                if fail:
                    raise AssertionError(f"not done after {timeout}s of simulated time")
                self._set_time(deadline)
                self.flush()
                return self.now - start
            self._set_time(max(next_call, self.now))

    def remove(self, index: int) -> None:
        """Stop node ``index`` (its data directory stays for a restart)."""
        host = host_of(index)
        node = self.nodes[host]
        self.down.add(host)
        self.flush()
        done = node.stopService()
        self.flush()
        succeeded(done)
        del self.nodes[host]
        self.down.discard(host)

    def stop(self) -> None:
        for host in list(self.nodes):
            self.remove(int(host.rsplit(".", 1)[1]) - 2)


def public(node: KuraNode, method: str, target: str, body: bytes = b"", **headers: str) -> Response:
    """One request on ``node``'s public channel."""
    return Exchange(node).request(method, target, body, headers)


def outbox_rows(node: KuraNode) -> list[Any]:
    return node.store.metadata.outbox_batch(0, 10_000)


def blob_files(node: KuraNode) -> list[str]:
    found = []
    for directory, _, names in os.walk(node.store.layout.blobs):
        found += [os.path.join(directory, name) for name in names]
    return found


def ready(node: KuraNode) -> bool:
    return node.state.readiness()[0]

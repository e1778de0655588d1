"""Node state as the probes report it: joining, serving or draining.

``/ready`` is 200 only when the writer lock is held, the node is not
draining, no start-up task holds it back (the store scan), and membership
says it is caught up with every known peer.
``/up`` is always 200; ``/status/rollout`` always 200, draining included.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

from kura.config import KuraConfig
from kura.memory import MemoryMonitor, Pressure
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic

#: ``fd_timeout_count`` in ``/status/rollout``. Upstream counts waits for a
#: free file descriptor that timed out; kura never waits for one (an open that
#: fails, out of descriptors, is answered 503 at once), so the count is always
#: 0. The field stays for rollout tooling written against upstream's report.
FD_TIMEOUT_COUNT = 0


class TrafficState(enum.IntEnum):
    JOINING = 0
    SERVING = 1
    DRAINING = 2


class IMembershipView(Interface):
    """What readiness and the probes need to know about the peer mesh.

    Implemented by :class:`kura.replication.membership.Membership` and, for
    a node without peers, :class:`SingleNode`.
    """

    generation = Attribute("int: bumped on every join or leave.")
    initial_discovery_completed = Attribute("bool: the first membership round is done.")
    known_peers = Attribute("list[str]: the peers in the view, sorted.")
    bootstrapped_peers = Attribute("list[str]: known peers this node has caught up with.")
    bootstrap_inflight_peers = Attribute("list[str]: known peers being caught up with now.")
    bootstrap_progress = Attribute(
        "dict[str, tuple[int, int | None]]: items walked and the pass's total "
        "(None when unknown) per peer being caught up with."
    )

    def settling() -> bool:
        """Whether the topology changed too recently to call the node caught up."""


@implementer(IMembershipView)
class SingleNode:
    """Membership of a node with no peers: always settled and caught up."""

    generation = 1
    initial_discovery_completed = True
    known_peers: list[str] = []
    bootstrapped_peers: list[str] = []
    bootstrap_inflight_peers: list[str] = []
    bootstrap_progress: dict[str, tuple[int, int | None]] = {}

    def settling(self) -> bool:
        return False


def _progress(peer: str, done: int, total: int | None) -> str:
    return f"peer {peer} {done}/{'?' if total is None else total} items"


class NodeState:
    """Lifecycle flags plus the reports the probes render."""

    def __init__(
        self,
        *,
        config: KuraConfig,
        clock: IReactorTime,
        metrics: KuraMetrics,
        traffic: PublicTraffic,
        outbox_depth: Callable[[], int],
        membership: IMembershipView | None = None,
        memory: MemoryMonitor | None = None,
        access_mode: str = "open",
    ) -> None:
        self._config = config
        self._access_mode = access_mode
        self._clock = clock
        self._metrics = metrics
        self._traffic = traffic
        self._outbox_depth = outbox_depth
        self.membership: IMembershipView = membership or SingleNode()
        self.memory = memory
        self.draining = False
        self.writer_lock_owned = False
        #: gRPC (REAPI) calls in progress; the node sets it when it serves gRPC.
        self.grpc_inflight: Callable[[], int] = lambda: 0
        #: Writes and deletes queued for the object store; set when the tier is on.
        self.object_store_uploads: Callable[[], int] = lambda: 0
        #: Start-up work that keeps the node unready while it runs (its reasons).
        self.holds: list[str] = []
        metrics.ready_state.set_function(lambda: float(self.readiness()[0]))
        metrics.drain_state.set_function(lambda: float(self.draining))
        metrics.traffic_state.set_function(lambda: float(self.state))
        metrics.writer_lock_owned.set_function(lambda: float(self.writer_lock_owned))

    def start_draining(self) -> None:
        self.draining = True

    def hold(self, reason: str) -> None:
        """Keep ``/ready`` 503 with ``reason`` until :meth:`release` (start-up work)."""
        if reason not in self.holds:
            self.holds.append(reason)

    def release(self, reason: str) -> None:
        if reason in self.holds:
            self.holds.remove(reason)

    @property
    def memory_pressure(self) -> Pressure:
        return Pressure.NORMAL if self.memory is None else self.memory.level

    @property
    def state(self) -> TrafficState:
        if self.draining:
            return TrafficState.DRAINING
        if self._caught_up_reasons():
            return TrafficState.JOINING
        return TrafficState.SERVING

    def _caught_up_reasons(self) -> list[str]:
        view = self.membership
        reasons = []
        if not view.initial_discovery_completed:
            reasons.append("initial discovery incomplete")
        if view.settling():
            reasons.append("discovery settling")
        inflight = view.bootstrap_inflight_peers
        if inflight:
            progress = view.bootstrap_progress
            details = [_progress(peer, *progress[peer]) for peer in inflight if peer in progress]
            reasons.append("bootstrap in progress" + (": " + "; ".join(details) if details else ""))
        missing = sorted(set(view.known_peers) - set(view.bootstrapped_peers))
        if missing:
            reasons.append(f"bootstrap incomplete for {', '.join(missing)}")
        return reasons

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if not self.writer_lock_owned:
            reasons.append("writer lock not held")
        if self.draining:
            reasons.append("draining")
        reasons += self.holds
        reasons += self._caught_up_reasons()
        return not reasons, reasons

    def up_report(self) -> dict[str, object]:
        view = self.membership
        members = [self._config.node_url, *view.known_peers]
        return {
            "status": "ok",
            "generation": view.generation,
            "tenant_id": self._config.tenant_id,
            "region": self._config.region,
            "node": self._config.region,
            "node_url": self._config.node_url,
            "connected_nodes": len(view.known_peers),
            "ring_members": len(view.known_peers) + 1,
            "members": members,
            "regions": [self._config.region],
            "nodes": members,
        }

    def ready_report(self) -> dict[str, object]:
        ready, reasons = self.readiness()
        view = self.membership
        return {
            "status": "ok" if ready else "not_ready",
            "generation": view.generation,
            "state": self.state.name.lower(),
            "ready": ready,
            "draining": self.draining,
            "writer_lock_owned": self.writer_lock_owned,
            "initial_discovery_completed": view.initial_discovery_completed,
            "known_peers": len(view.known_peers),
            "bootstrapped_peers": len(view.bootstrapped_peers),
            "bootstrap_inflight_peers": len(view.bootstrap_inflight_peers),
            "http_inflight_requests": self._traffic.inflight,
            "grpc_inflight_requests": self.grpc_inflight(),
            "reasons": reasons,
        }

    def rollout_report(self) -> dict[str, object]:
        ready, _ = self.readiness()
        view = self.membership
        return {
            "generation": view.generation,
            "ready": ready,
            "state": self.state.name.lower(),
            "ring_members": len(view.known_peers) + 1,
            "initial_discovery_completed": view.initial_discovery_completed,
            "writer_lock_owned": self.writer_lock_owned,
            "bootstrap_known_peers": len(view.known_peers),
            "bootstrap_completed_peers": len(view.bootstrapped_peers),
            "bootstrap_inflight_peers": len(view.bootstrap_inflight_peers),
            "http_inflight_requests": self._traffic.inflight,
            "grpc_inflight_requests": self.grpc_inflight(),
            "outbox_messages": self._outbox_depth(),
            "object_store_uploads": self.object_store_uploads(),
            "memory_pressure_state": int(self.memory_pressure),
            "fd_timeout_count": FD_TIMEOUT_COUNT,
            # How the public port and the internal plane are guarded.
            "auth_mode": self._access_mode,
            "peer_auth_mode": self._config.replication.peer_auth_mode,
        }

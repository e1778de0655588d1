"""Membership: who the peers are, and whether this node has caught up with them.

Candidates are the seed peers (``KURA_PEERS``) plus, when
``KURA_DISCOVERY_DNS_NAME`` is set, the addresses that name resolves to
(through the reactor's resolver, which never blocks the reactor): over http
each A/AAAA record becomes ``http://IP:port`` (the port of ``KURA_NODE_URL``),
over https the name itself is the candidate, so certificates can name it.

Every :data:`POLL_SECONDS` each candidate is asked for ``/_internal/status``.
A candidate joins the view (``known_peers``) when it reports our tenant and a
node URL other than ours; two candidate URLs reporting the same node count
once. A known peer leaves after :data:`LEAVE_AFTER_FAILURES` consecutive
failed checks (one lost answer on a busy node must not churn the view), or
at once when it reports another tenant or turns out to be this node.

Every join or leave bumps :attr:`generation` and opens a
:data:`SETTLE_SECONDS` settle window; ``initial_discovery_completed`` turns
true after the first round (at once with no candidates at all).

Replication targets are wider than the view: every seed and every address
discovered (and not gone from DNS for :data:`FORGET_AFTER_ROUNDS` rounds),
minus those known to be this node, an alias of another candidate, or another
tenant's (:meth:`Membership.targets`, the store's
:class:`~kura.storage.interfaces.IReplicationTargets`). A peer that is down
keeps receiving outbox rows, so it gets every write when it returns.

This class also keeps the catch-up bookkeeping readiness reads (which known
peers are caught up, which are being caught up), so it implements
:class:`kura.lifecycle.IMembershipView` on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kura.lifecycle import IMembershipView
from kura.storage.interfaces import IReplicationTargets
from kura.telemetry.metrics import KuraMetrics

from . import wire

log = Logger(namespace="kura.replication.membership")

PEER_JOINED = "peer {peer} joined (generation {generation})"
PEER_LEFT = "peer {peer} left: {reason} (generation {generation})"
PEER_FOREIGN = "peer {peer} serves tenant {tenant}, not ours; never admitted"
PEER_FORGOTTEN = "discovered address {peer} missing from DNS for {rounds} rounds; forgotten"

#: Seconds between membership rounds.
POLL_SECONDS = 2.0
#: Seconds after a topology change during which the node is not ready.
SETTLE_SECONDS = 5.0
#: A status check taking longer than this counts as failed.
STATUS_TIMEOUT = 3.0
#: Consecutive failed checks after which a known peer leaves the view.
LEAVE_AFTER_FAILURES = 3
#: Rounds (about five minutes) after which an address that left DNS and is
#: not a known peer stops being a replication target; its rows are dropped.
FORGET_AFTER_ROUNDS = 150


class StatusSource(Protocol):
    """Asks a candidate for its status (the peer client, or a fake)."""

    async def status(self, target: str, timeout: float) -> wire.PeerStatus: ...


class Discovery(Protocol):
    """Resolves the discovery name to candidate URLs."""

    def resolve(self) -> Deferred[list[str]]: ...


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N803
        pass

    def addressResolved(self, address: object) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.hosts:
            self.hosts.append(host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.hosts)


class DnsDiscovery:
    """Candidates from a DNS name (A and AAAA records), resolved without blocking.

    Args:
        resolver: the reactor's ``nameResolver``.
        name: ``KURA_DISCOVERY_DNS_NAME``.
        scheme: ``http`` or ``https`` (peer mTLS).
        port: the internal port every node listens on.
    """

    def __init__(self, resolver: IHostnameResolver, name: str, scheme: str, port: int) -> None:
        self._resolver = resolver
        self._name = name
        self._scheme = scheme
        self._port = port

    def resolve(self) -> Deferred[list[str]]:
        if self._scheme == "https":
            # Certificates name the service, not pod IPs.
            done: Deferred[list[str]] = Deferred()
            done.callback([f"https://{self._name}:{self._port}"])
            return done
        collector = _Collector()
        self._resolver.resolveHostName(collector, self._name, portNumber=self._port)
        return collector.done.addCallback(self._urls)

    def _urls(self, hosts: list[str]) -> list[str]:
        return [
            f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"
            for host in hosts
        ]


@attrs.define
class _Candidate:
    failures: int = 0
    #: Consecutive rounds a discovered (non-seed) address was missing from DNS.
    absent: int = 0
    #: "peer", "self", "foreign" or "alias" once a status answer was seen.
    identity: str | None = None
    reported_url: str | None = None


@implementer(IReplicationTargets, IMembershipView)
class Membership:
    """The peer view and catch-up bookkeeping (see the module docstring).

    Args:
        clock: time source (settle window).
        client: asks candidates for their status.
        node_url: this node's own internal URL.
        tenant_id: the tenant peers must serve.
        seeds: ``KURA_PEERS``.
        discovery: DNS discovery, or ``None``.
        metrics: gauges and counters.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        client: StatusSource,
        node_url: str,
        tenant_id: str,
        seeds: Sequence[str],
        discovery: Discovery | None,
        metrics: KuraMetrics,
        settle_seconds: float = SETTLE_SECONDS,
        status_timeout: float = STATUS_TIMEOUT,
        leave_after_failures: int = LEAVE_AFTER_FAILURES,
        forget_after_rounds: int = FORGET_AFTER_ROUNDS,
    ) -> None:
        self._clock = clock
        self._client = client
        self._self_url = wire.normalize_url(node_url)
        self._tenant = tenant_id
        self._seeds = [s for s in dict.fromkeys(seeds) if wire.normalize_url(s) != self._self_url]
        self._discovery = discovery
        self._metrics = metrics
        self._settle = settle_seconds
        self._status_timeout = status_timeout
        self._leave_after = leave_after_failures
        self._forget_after = forget_after_rounds
        self._candidates: dict[str, _Candidate] = {s: _Candidate() for s in self._seeds}
        self._known: set[str] = set()
        self._epochs: dict[str, int] = {}
        self._bootstrapped: set[str] = set()
        self._inflight: set[str] = set()
        self._progress: dict[str, tuple[int, int | None]] = {}
        self._last_change: float | None = None
        self._generation = 1
        self._initial = not self._seeds and discovery is None
        self.listeners: list[Callable[[], None]] = []
        metrics.membership_generation.set(self._generation)
        metrics.initial_discovery_completed.set(float(self._initial))
        metrics.discovered_peer_nodes.set(len(self._candidates))

    # -- IMembershipView --------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def initial_discovery_completed(self) -> bool:
        return self._initial

    @property
    def known_peers(self) -> list[str]:
        return sorted(self._known)

    @property
    def bootstrapped_peers(self) -> list[str]:
        return sorted(self._bootstrapped & self._known)

    @property
    def bootstrap_inflight_peers(self) -> list[str]:
        return sorted(self._inflight & self._known)

    @property
    def bootstrap_progress(self) -> dict[str, tuple[int, int | None]]:
        return {p: v for p, v in self._progress.items() if p in self._inflight}

    def settling(self) -> bool:
        return (
            self._last_change is not None
            and self._clock.seconds() - self._last_change < self._settle
        )

    # -- replication targets ---------------------------------------------------------

    def targets(self) -> list[str]:
        """Where a write made now must go (one outbox row each)."""
        return sorted(
            url
            for url, candidate in self._candidates.items()
            if candidate.identity in (None, "peer")
        )

    def is_stale_target(self, target: str) -> bool:
        """Whether outbox rows for ``target`` can never be delivered usefully.

        A target is stale when it is neither a seed nor a current discovered
        address, or when its status showed it is this node, an alias of
        another target, or another tenant's. Before the first round nothing is
        stale: after a restart discovered peers are not known yet.
        """
        if not self._initial:
            return False
        candidate = self._candidates.get(target)
        if candidate is None:
            return True
        return candidate.identity not in (None, "peer")

    # -- catch-up bookkeeping -------------------------------------------------------

    def epoch(self, peer: str) -> int:
        """Changes every time ``peer`` joins; catch-ups record it when they start."""
        return self._epochs.get(peer, 0)

    def is_known(self, peer: str) -> bool:
        return peer in self._known

    def node_url_of(self, peer: str) -> str:
        """The node URL ``peer`` reports (stable across its address changes), else ``peer``.

        Catch-up watermarks are kept under it: a pod discovered through DNS
        comes back on a new IP, and must not cost a full pass.
        """
        candidate = self._candidates.get(peer)
        if candidate is None or candidate.reported_url is None:
            return wire.normalize_url(peer)
        return candidate.reported_url

    def bootstrap_started(self, peer: str) -> None:
        self._inflight.add(peer)

    def bootstrap_progressed(self, peer: str, done: int, total: int | None) -> None:
        """Record how far the catch-up with ``peer`` is (the readiness reason shows it)."""
        self._progress[peer] = (done, total)

    def bootstrap_finished(self, peer: str, epoch: int, ok: bool) -> bool:
        """Record the end of a catch-up; returns whether it counted.

        A success is discarded when the peer left (or left and rejoined)
        meanwhile: what it pulled may predate the peer's latest state.
        """
        self._inflight.discard(peer)
        self._progress.pop(peer, None)
        if not ok:
            return True
        if peer not in self._known or self.epoch(peer) != epoch:
            self._metrics.bootstrap_completions_discarded.inc()
            return False
        self._bootstrapped.add(peer)
        return True

    # -- discovery rounds -------------------------------------------------------------

    async def poll(self) -> None:
        """Run one round: discover, check every candidate, update the view."""
        if self._discovery is not None:
            try:
                found = await self._discovery.resolve()
            except Exception:
                log.failure("peer discovery failed; keeping the candidates we have")
                found = []
            for url in found:
                if wire.normalize_url(url) != self._self_url:
                    self._candidates.setdefault(url, _Candidate()).absent = 0
            self._forget_vanished(set(found))
        self._metrics.discovered_peer_nodes.set(len(self._candidates))
        urls = sorted(self._candidates)
        answers = await DeferredList(
            [Deferred.fromCoroutine(self._check(url)) for url in urls], consumeErrors=True
        )
        statuses: dict[str, wire.PeerStatus] = {}
        for url, (ok, result) in zip(urls, answers, strict=True):
            candidate = self._candidates[url]
            if ok and isinstance(result, wire.PeerStatus):
                candidate.failures = 0
                statuses[url] = result
            else:
                candidate.failures += 1
                if isinstance(result, Failure):
                    log.debug(
                        "status of {peer} failed: {error}",
                        peer=url,
                        error=result.getErrorMessage(),
                    )
        self._classify(statuses)
        changed = self._update_view()
        first = not self._initial
        self._initial = True
        self._metrics.initial_discovery_completed.set(1.0)
        if changed or first:
            self._notify()

    def _forget_vanished(self, found: set[str]) -> None:
        """Drop discovered addresses gone from DNS for good (a pod that moved IP)."""
        for url in [u for u in self._candidates if u not in found and u not in self._seeds]:
            candidate = self._candidates[url]
            if url in self._known:
                continue
            candidate.absent += 1
            if candidate.absent >= self._forget_after:
                del self._candidates[url]
                log.info(PEER_FORGOTTEN, peer=url, rounds=candidate.absent)

    async def _check(self, url: str) -> wire.PeerStatus:
        d = Deferred.fromCoroutine(self._client.status(url, self._status_timeout))
        d.addTimeout(self._status_timeout, self._clock)
        return await d

    def _classify(self, statuses: dict[str, wire.PeerStatus]) -> None:
        same_node: dict[str, list[str]] = {}
        for url, status in statuses.items():
            candidate = self._candidates[url]
            candidate.reported_url = wire.normalize_url(status.node_url)
            if candidate.reported_url == self._self_url:
                candidate.identity = "self"
            elif status.tenant_id != self._tenant:
                if candidate.identity != "foreign":
                    log.warn(PEER_FOREIGN, peer=url, tenant=status.tenant_id)
                candidate.identity = "foreign"
            else:
                candidate.identity = "peer"
                same_node.setdefault(candidate.reported_url, []).append(url)
        for reported, urls in same_node.items():
            chosen = self._representative(reported, urls)
            for url in urls:
                if url != chosen:
                    self._candidates[url].identity = "alias"

    def _representative(self, reported: str, urls: list[str]) -> str:
        """One URL per node: the one it reports, else a seed, else the first."""
        for url in urls:
            if wire.normalize_url(url) == reported:
                return url
        seeds = [url for url in urls if url in self._seeds]
        return sorted(seeds or urls)[0]

    def _update_view(self) -> bool:
        joined, left = [], []
        for url, candidate in self._candidates.items():
            if url in self._known:
                if candidate.identity != "peer":
                    left.append((url, f"it is {candidate.identity}"))
                elif candidate.failures >= self._leave_after:
                    left.append((url, f"{candidate.failures} status checks failed"))
            elif candidate.identity == "peer" and candidate.failures == 0:
                joined.append(url)
        if not joined and not left:
            return False
        self._generation += 1
        self._last_change = self._clock.seconds()
        for url in joined:
            self._known.add(url)
            self._epochs[url] = self._epochs.get(url, 0) + 1
            self._metrics.membership_peer_changes.labels("join").inc()
            log.info(PEER_JOINED, peer=url, generation=self._generation)
        for url, reason in left:
            self._known.discard(url)
            # Whatever happened while it was away is caught up again on return.
            self._bootstrapped.discard(url)
            self._metrics.membership_peer_changes.labels("leave").inc()
            log.info(PEER_LEFT, peer=url, reason=reason, generation=self._generation)
        self._metrics.membership_generation.set(self._generation)
        return True

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

"""Membership: discovery, admission, generations, the settle window, catch-up bookkeeping."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from repl_support import MeshResolver
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kura.lifecycle import IMembershipView, NodeState, SingleNode
from kura.replication.membership import DnsDiscovery, Membership
from kura.replication.wire import PeerStatus
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic
from kura.testing import succeeded
from kura.testing import test_config as config_for

SELF = "http://10.0.0.1:7443"
B = "http://10.0.0.2:7443"
C = "http://10.0.0.3:7443"


class FakeStatuses:
    """Answers status checks from a table; anything missing is refused."""

    def __init__(self) -> None:
        self.answers: dict[str, PeerStatus | None] = {}
        self.hanging: set[str] = set()
        self.asked: list[str] = []

    def peer(self, url: str, tenant: str = "default", node_url: str | None = None) -> None:
        self.answers[url] = PeerStatus(tenant, node_url or url, "local")

    async def status(self, target: str, timeout: float) -> PeerStatus:
        self.asked.append(target)
        if target in self.hanging:
            await Deferred()
        answer = self.answers.get(target)
        if answer is None:
            raise ConnectionRefusedError()
        return answer


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(100)
    return clock


@pytest.fixture
def statuses() -> FakeStatuses:
    return FakeStatuses()


@pytest.fixture
def metrics() -> KuraMetrics:
    return KuraMetrics(CollectorRegistry())


def membership(
    clock: Clock,
    statuses: FakeStatuses,
    metrics: KuraMetrics,
    seeds: tuple[str, ...] = (B, C),
    discovery: Any = None,
) -> Membership:
    return Membership(
        clock=clock,
        client=statuses,
        node_url=SELF,
        tenant_id="default",
        seeds=seeds,
        discovery=discovery,
        metrics=metrics,
    )


def poll(view: Membership) -> None:
    succeeded(Deferred.fromCoroutine(view.poll()))


def test_it_is_a_membership_view(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """Membership provides the view readiness renders from (as a lone node's stand-in does)."""
    assert verifyObject(IMembershipView, membership(clock, statuses, metrics))
    assert verifyObject(IMembershipView, SingleNode())


def test_no_candidates_means_discovery_is_complete_at_once(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A node without seeds or discovery is never waiting for anyone."""
    view = membership(clock, statuses, metrics, seeds=())
    assert view.initial_discovery_completed
    assert not view.settling()
    assert view.targets() == []


def test_first_round_completes_discovery_even_when_nobody_answers(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """Discovery completes after the first round; unreachable seeds stay targets."""
    view = membership(clock, statuses, metrics)
    assert not view.initial_discovery_completed
    poll(view)
    assert view.initial_discovery_completed
    assert view.known_peers == []
    assert view.generation == 1
    assert view.targets() == [B, C]


def test_peers_of_our_tenant_join_and_open_a_settle_window(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A join bumps the generation and makes the node settle for 5 s."""
    statuses.peer(B)
    view = membership(clock, statuses, metrics)
    changes: list[int] = []
    view.listeners.append(lambda: changes.append(view.generation))
    poll(view)
    assert view.known_peers == [B]
    assert view.generation == 2
    assert changes == [2]
    assert view.settling()
    clock.advance(4.9)
    assert view.settling()
    clock.advance(0.2)
    assert not view.settling()
    poll(view)
    assert view.generation == 2  # nothing changed
    assert metrics.registry.get_sample_value("kura_membership_generation") == 2


def test_a_peer_of_another_tenant_is_never_admitted(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A candidate reporting another tenant is neither known nor a target."""
    statuses.peer(B, tenant="other")
    statuses.peer(C)
    view = membership(clock, statuses, metrics)
    poll(view)
    poll(view)
    assert view.known_peers == [C]
    assert view.targets() == [C]
    assert view.is_stale_target(B)


def test_a_candidate_that_is_this_node_is_dropped(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A seed whose status reports our own node URL is recognised as ourselves."""
    statuses.peer(B, node_url=SELF)
    view = membership(clock, statuses, metrics)
    poll(view)
    assert view.known_peers == []
    assert B not in view.targets()
    assert view.is_stale_target(B)


def test_our_own_url_is_never_a_candidate(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A seed equal to KURA_NODE_URL is not even asked."""
    view = membership(clock, statuses, metrics, seeds=(SELF + "/", B))
    poll(view)
    assert SELF not in statuses.asked and SELF + "/" not in statuses.asked


def test_two_urls_of_one_node_count_once(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """Candidates reporting the same node URL are one peer (the one it reports)."""
    alias = "http://peer-b.example:7443"
    statuses.peer(B)
    statuses.peer(alias, node_url=B)
    view = membership(clock, statuses, metrics, seeds=(alias, B))
    poll(view)
    assert view.known_peers == [B]
    assert view.targets() == [B]


def test_a_peer_leaves_only_after_three_failed_checks(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """One lost status answer does not churn the view; three in a row do."""
    statuses.peer(B)
    view = membership(clock, statuses, metrics)
    poll(view)
    del statuses.answers[B]
    poll(view)
    poll(view)
    assert view.known_peers == [B]
    poll(view)
    assert view.known_peers == []
    assert view.generation == 3
    assert view.targets() == [B, C]  # still a seed: it gets every write when it returns


def test_hanging_status_checks_time_out(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A stopped peer that accepts connections but never answers counts as failed."""
    statuses.peer(B)
    statuses.hanging.add(C)
    view = membership(clock, statuses, metrics)
    round_done = Deferred.fromCoroutine(view.poll())
    assert not round_done.called
    clock.advance(3)
    succeeded(round_done)
    assert view.known_peers == [B]


def test_catch_up_bookkeeping_follows_membership_epochs(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A catch-up only counts for the epoch it started in; leaving clears it."""
    statuses.peer(B)
    view = membership(clock, statuses, metrics, seeds=(B,))
    poll(view)
    epoch = view.epoch(B)
    view.bootstrap_started(B)
    assert view.bootstrap_inflight_peers == [B]
    assert view.bootstrap_finished(B, epoch, ok=True)
    assert view.bootstrapped_peers == [B]
    assert view.bootstrap_inflight_peers == []
    del statuses.answers[B]
    for _ in range(3):
        poll(view)
    assert view.bootstrapped_peers == []
    statuses.peer(B)
    poll(view)
    assert view.epoch(B) == epoch + 1
    view.bootstrap_started(B)
    assert not view.bootstrap_finished(B, epoch, ok=True)  # started before it rejoined
    assert view.bootstrapped_peers == []
    assert metrics.registry.get_sample_value("kura_bootstrap_completions_discarded_total") == 1


def test_readiness_waits_for_discovery_settle_and_catch_up(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics, tmp_path: Any
) -> None:
    """/ready reasons follow the view: discovery, settling, then catch-up per peer."""
    statuses.peer(B)
    view = membership(clock, statuses, metrics, seeds=(B,))
    state = NodeState(
        config=config_for(f"{tmp_path}/d"),
        clock=clock,
        metrics=metrics,
        traffic=PublicTraffic(clock, metrics),
        outbox_depth=lambda: 0,
        membership=view,
    )
    state.writer_lock_owned = True
    assert state.readiness() == (False, ["initial discovery incomplete"])
    poll(view)
    ready, reasons = state.readiness()
    assert not ready
    assert reasons == ["discovery settling", f"bootstrap incomplete for {B}"]
    view.bootstrap_started(B)
    clock.advance(6)
    assert state.readiness() == (False, ["bootstrap in progress", f"bootstrap incomplete for {B}"])
    view.bootstrap_finished(B, view.epoch(B), ok=True)
    assert state.readiness() == (True, [])
    assert state.rollout_report()["ring_members"] == 2


def test_unknown_targets_are_stale_only_after_the_first_round(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """After a restart, rows for not-yet-rediscovered peers are kept until a round ran."""
    view = membership(clock, statuses, metrics)
    assert not view.is_stale_target("http://10.0.0.9:7443")
    poll(view)
    assert view.is_stale_target("http://10.0.0.9:7443")
    assert not view.is_stale_target(B)


def test_dns_discovery_turns_records_into_candidates(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A and AAAA records become http://IP:port candidates (IPv6 bracketed)."""
    resolver = MeshResolver({"kura-headless": ["10.0.0.2", "fd00::3", "10.0.0.1"]})
    discovery = DnsDiscovery(resolver, "kura-headless", "http", 7443)
    assert succeeded(discovery.resolve()) == [B, "http://[fd00::3]:7443", SELF]
    statuses.peer(B)
    statuses.peer("http://[fd00::3]:7443")
    view = membership(clock, statuses, metrics, seeds=(), discovery=discovery)
    assert not view.initial_discovery_completed
    poll(view)
    assert view.known_peers == [B, "http://[fd00::3]:7443"]
    assert SELF not in statuses.asked
    resolver.names["kura-headless"] = ["10.0.0.2"]
    poll(view)
    # Discovered peers stay targets (a pod missing from DNS for a moment keeps its rows).
    assert "http://[fd00::3]:7443" in view.targets()


def test_https_discovery_uses_the_name_itself(clock: Clock) -> None:
    """Over https the candidate is the discovery name, which certificates can name."""
    discovery = DnsDiscovery(MeshResolver({}), "kura.svc", "https", 7443)
    assert succeeded(discovery.resolve()) == ["https://kura.svc:7443"]


def test_addresses_gone_from_dns_are_forgotten_eventually(
    clock: Clock, statuses: FakeStatuses, metrics: KuraMetrics
) -> None:
    """A discovered address absent from DNS (a pod that moved) stops being a target."""
    resolver = MeshResolver({"kura-headless": ["10.0.0.2", "10.0.0.3"]})
    statuses.peer(B)
    view = Membership(
        clock=clock,
        client=statuses,
        node_url=SELF,
        tenant_id="default",
        seeds=(),
        discovery=DnsDiscovery(resolver, "kura-headless", "http", 7443),
        metrics=metrics,
        forget_after_rounds=3,
    )
    poll(view)
    assert view.targets() == [B, C]
    resolver.names["kura-headless"] = ["10.0.0.2"]
    poll(view)
    poll(view)
    assert C in view.targets()  # a pod missing from DNS for a moment keeps its rows
    poll(view)
    assert view.targets() == [B]
    assert view.is_stale_target(C)
    del statuses.answers[B]
    resolver.names["kura-headless"] = []
    for _ in range(4):
        poll(view)
    assert B in view.targets()  # known peers are never forgotten while known

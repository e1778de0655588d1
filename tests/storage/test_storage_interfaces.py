"""The storage layer's seams: every implementer is checked with verifyObject."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from kura.service import KuraNode
from kura.storage.interfaces import IArtifactStore, IBlockingRunner, IReplicationTargets
from kura.storage.runner import ImmediateRunner, ThreadPoolRunner
from kura.storage.store import NO_TARGETS, StaticTargets
from kura.testing import ControlledRunner


def test_the_store_provides_iartifactstore(node: KuraNode) -> None:
    """The node's store provides IArtifactStore, as replication and the sites expect of it."""
    assert verifyObject(IArtifactStore, node.store)


def test_every_runner_provides_iblockingrunner() -> None:
    """The thread-pool runner and both inline test runners provide IBlockingRunner."""
    assert verifyObject(IBlockingRunner, ThreadPoolRunner(MemoryReactorClock(), ThreadPool()))
    assert verifyObject(IBlockingRunner, ImmediateRunner())
    assert verifyObject(IBlockingRunner, ControlledRunner())


def test_replication_targets_are_the_membership_or_static(node: KuraNode) -> None:
    """A node's store asks its mesh membership; a store without peers has static targets."""
    assert verifyObject(IReplicationTargets, node.peers.membership)
    assert verifyObject(IReplicationTargets, NO_TARGETS)
    assert StaticTargets(("http://b:7443",)).targets() == ("http://b:7443",)
    assert NO_TARGETS.targets() == ()

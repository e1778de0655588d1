"""Shared fixtures: in-memory nodes (fresh or re-opened on the same data dir), and
in-process nodes on the real reactor for the tests where real sockets are the point."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred

from kura.service import KuraNode
from kura.testing import Exchange, memory_node, succeeded, test_config

StartNode = Callable[..., Deferred[KuraNode]]


class Nodes:
    """Starts in-memory nodes and re-opens them on their data directory.

    Every node still running at the end of the test is stopped.
    """

    def __init__(self, base: Path) -> None:
        self._base = base
        self._running: list[KuraNode] = []

    def start(self, name: str = "data", *, runner: Any = None, **environ: str) -> KuraNode:
        """A started node on ``<tmp>/<name>`` with ``environ`` overrides."""
        node = memory_node(str(self._base / name), runner=runner, **environ)
        self._running.append(node)
        return node

    def stop(self, node: KuraNode) -> None:
        """Stop ``node`` (flushes storage and releases the writer lock)."""
        succeeded(node.stopService())
        self._running.remove(node)

    def restart(self, node: KuraNode, **environ: str) -> KuraNode:
        """Stop ``node`` and open a new one on the same data dir, as after a crash."""
        self.stop(node)
        return self.start(os.path.basename(node.config.data_dir), **environ)

    def stop_all(self) -> None:
        for node in list(self._running):
            self.stop(node)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """A factory of in-memory nodes under the test's temporary directory."""
    factory = Nodes(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def node(nodes: Nodes, request: pytest.FixtureRequest) -> KuraNode:
    """A started in-memory node with a fresh data directory.

    ``@pytest.mark.node_environ(KURA_...="...")`` sets variables for it.
    """
    marker = request.node.get_closest_marker("node_environ")
    return nodes.start(**(marker.kwargs if marker else {}))


#: For tests about what cleans and deletes do (not who may ask): open mode
#: refuses them to anonymous callers unless this switch is on.
anonymous_deletes = pytest.mark.node_environ(KURA_ALLOW_ANONYMOUS_DELETE="true")


@pytest.fixture
def client(node: KuraNode) -> Exchange:
    """One client connection to ``node``'s public channel."""
    return Exchange(node)


@pytest.fixture
def start_node(tmp_path: Any) -> Iterator[StartNode]:
    """Start in-process nodes on loopback (real sockets, threads, reactor).

    In an async test: ``node = await start_node(data_dir=None, **KURA_env)``.
    Nodes still running at the end are stopped.
    """
    from twisted.internet import reactor

    running: list[KuraNode] = []

    def start(data_dir: str | None = None, **environ: str) -> Deferred[KuraNode]:
        directory = data_dir or f"{tmp_path}/data"
        config = test_config(directory, KURA_BIND_HOST="127.0.0.1", **environ)
        node = KuraNode(config, reactor, registry=CollectorRegistry())
        running.append(node)
        node.startService()
        return node.started.addCallback(lambda _: node)

    yield start
    for node in running:
        if node.running:
            pytest_twisted.blockon(node.stopService())

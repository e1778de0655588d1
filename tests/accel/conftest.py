"""Fixtures for accelerator tests: in-process nodes on the real reactor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred

from kura.service import KuraNode
from kura.testing import test_config

StartNode = Callable[..., KuraNode]


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

"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kura.service import KuraNode
from kura.testing import Exchange, memory_node


@pytest.fixture
def node(tmp_path: object) -> Iterator[KuraNode]:
    """A started in-memory node with a fresh data directory."""
    started = memory_node(str(tmp_path) + "/data")
    yield started
    started.stopService()


@pytest.fixture
def client(node: KuraNode) -> Exchange:
    """One client connection to ``node``'s public channel."""
    return Exchange(node)

"""The public route table as a node builds it, for tests that walk every route."""

from __future__ import annotations

import functools
import os
import tempfile

from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock

from kura.api.app import PublicAPI
from kura.service import KuraNode
from kura.storage.runner import ImmediateRunner
from kura.testing import test_config


@functools.cache
def public_api() -> PublicAPI:
    """The public API of a node that is constructed but never started (nothing is opened)."""
    with tempfile.TemporaryDirectory() as base:
        node = KuraNode(
            test_config(os.path.join(base, "data")),
            MemoryReactorClock(),
            registry=CollectorRegistry(),
            runner=ImmediateRunner(),
        )
    return node.api

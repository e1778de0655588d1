"""Fixtures for the authorization-extension tests."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.telemetry.metrics import KuraMetrics


@pytest.fixture
def clock() -> Clock:
    """A fake clock starting at t=1000."""
    fake = Clock()
    fake.advance(1000)
    return fake


@pytest.fixture
def metrics() -> KuraMetrics:
    """Metrics on a fresh registry."""
    return KuraMetrics(CollectorRegistry())

"""kura's lock-free metrics expose exactly what prometheus_client would."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kura.telemetry import metering

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = [0.0005, 0.001, 0.002, 0.05, 0.1, 0.5, 3.0, 3.0]


def _exposition(counter_type: type, histogram_type: type) -> bytes:
    registry = CollectorRegistry()
    counter = counter_type("jobs", "Jobs done.", ["kind"], registry=registry)
    histogram = histogram_type(
        "wait_seconds", "Waits.", ["kind"], buckets=BUCKETS, registry=registry
    )
    plain = histogram_type("plain_seconds", "Unlabelled.", buckets=BUCKETS, registry=registry)
    counter.labels("a").inc()
    counter.labels("a").inc(2.5)
    counter.labels("b").inc()
    for value in VALUES:
        histogram.labels("a").observe(value)
    del plain
    lines = generate_latest(registry).splitlines()
    return b"\n".join(line for line in lines if b"_created" not in line)


def test_exposition_matches_prometheus_client() -> None:
    """Counters, labelled and unlabelled histograms render the same series and values."""
    ours = _exposition(metering.Counter, metering.Histogram)
    theirs = _exposition(prometheus_client.Counter, prometheus_client.Histogram)
    assert ours == theirs


def test_counters_only_go_up() -> None:
    """A negative increment is refused, as prometheus_client refuses it."""
    counter = metering.Counter("c", "C.", registry=CollectorRegistry())
    with pytest.raises(ValueError):
        counter.inc(-1)


def test_wrong_label_count_is_refused() -> None:
    """Labels must match the declared label names."""
    counter = metering.Counter("c", "C.", ["a", "b"], registry=CollectorRegistry())
    with pytest.raises(ValueError):
        counter.labels("only-one")

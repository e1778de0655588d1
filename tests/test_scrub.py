"""The scrub: paced re-reads of every stored body, on a clock the tests drive."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.scrub import MIN_CHARGE, ScrubService, state_path
from kura.service import KuraNode
from kura.telemetry.metrics import KuraMetrics
from kura.testing import ControlledRunner, request, sample
from tests.conftest import Nodes
from tests.support.corruption import flip_byte

GRADLE = "/api/cache/gradle/{}?tenant_id=default"
KV = json.dumps({"cas_id": "c1", "entries": [{"value": "v"}]}).encode()
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}
#: The scrub reads small bodies wherever they are kept: in the database, or in files.
LAYOUTS = pytest.mark.parametrize("node", [{}, FILES], ids=["database", "files"], indirect=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_of(node: KuraNode, key: str) -> Any:
    address = ArtifactAddress(Producer.GRADLE, "", key)
    return node.store.metadata.get_manifest(node.store.artifact_id(address))


class Scrub:
    """A ScrubService over a node's store, with its own clock, runner and metrics."""

    def __init__(
        self, node: KuraNode, rate: int, *, interval: float = 100.0, page_size: int = 256
    ) -> None:
        self.node = node
        self.clock = Clock()
        self.runner = ControlledRunner()
        self.metrics = KuraMetrics(CollectorRegistry())
        self.service = ScrubService(
            store=node.store,
            runner=self.runner,
            clock=self.clock,
            metrics=self.metrics,
            bytes_per_second=rate,
            interval_seconds=interval,
            state_path=state_path(node.config.data_dir),
            wall=lambda: time.time() + 3600,  # nothing written "just now"
            page_size=page_size,
        )

    def start(self) -> Scrub:
        self.service.startService()
        self.service.begin()
        return self

    def stop(self) -> None:
        self.service.stopService()

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    @property
    def artifacts(self) -> float:
        return self.value("kura_scrub_checked_artifacts_total")

    @property
    def bytes(self) -> float:
        return self.value("kura_scrub_checked_bytes_total")

    @property
    def passes(self) -> float:
        return self.value("kura_scrub_passes_total")

    def reads(self) -> int:
        """Storage-thread hops that read bodies so far."""
        return sum(call in ("_scan_smalls", "_hash_range") for call in self.runner.calls)


@pytest.fixture
def node(nodes: Nodes, request: pytest.FixtureRequest) -> KuraNode:
    """A node whose own scrub is off: the tests run theirs on their clock.

    ``@pytest.mark.node_environ(...)`` or an indirect parameter (:data:`LAYOUTS`)
    adds to its environment.
    """
    marker = request.node.get_closest_marker("node_environ")
    environ = {**(marker.kwargs if marker else {}), **getattr(request, "param", {})}
    return nodes.start(KURA_SCRUB_BYTES_PER_SECOND="0", **environ)


@pytest.fixture
def scrubs() -> Iterator[list[Scrub]]:
    started: list[Scrub] = []
    yield started
    for scrub in started:
        scrub.stop()


@LAYOUTS
def test_small_bodies_are_read_together_at_the_configured_rate(
    node: KuraNode, scrubs: list[Scrub]
) -> None:
    """12 bodies of 20 kB at 100 kB/s: five per read, then a second's pause, and so on."""
    for n in range(12):
        request(node, "PUT", GRADLE.format(n), os.urandom(20_000))
    scrub = Scrub(node, rate=100_000).start()
    scrubs.append(scrub)
    assert (scrub.reads(), scrub.artifacts) == (1, 5)
    scrub.clock.advance(0.99)
    assert scrub.artifacts == 5
    scrub.clock.advance(0.01)
    assert scrub.artifacts == 10
    scrub.clock.advance(1.0)
    assert (scrub.artifacts, scrub.bytes, scrub.passes) == (12, 240_000, 0)
    scrub.clock.advance(0.4)  # the last two bodies' share
    assert scrub.passes == 1 and scrub.reads() == 3


def test_a_large_body_is_read_a_unit_at_a_time(node: KuraNode, scrubs: list[Scrub]) -> None:
    """250 kB at 100 kB/s: three reads a second apart; checked once the last byte is in."""
    body = os.urandom(250_000)
    request(node, "PUT", GRADLE.format("big"), body)
    scrub = Scrub(node, rate=100_000).start()
    scrubs.append(scrub)
    assert scrub.runner.calls.count("_hash_range") == 1
    scrub.clock.advance(1.0)
    assert scrub.runner.calls.count("_hash_range") == 2 and scrub.artifacts == 0
    scrub.clock.advance(1.0)
    assert scrub.runner.calls.count("_hash_range") == 3
    assert (scrub.artifacts, scrub.bytes) == (1, 250_000)
    scrub.clock.advance(0.5)
    assert scrub.passes == 1
    # Found intact, remembered: serving it needs no hashing.
    assert len(node.store.verifier) == 1


def test_every_body_costs_the_pace_something_even_an_empty_one(
    node: KuraNode, scrubs: list[Scrub]
) -> None:
    """A store of empty artifacts is not read at full speed: each counts MIN_CHARGE bytes."""
    for n in range(4):
        request(node, "PUT", GRADLE.format(n), b"")
    scrub = Scrub(node, rate=MIN_CHARGE * 2).start()
    scrubs.append(scrub)
    assert scrub.artifacts == 2
    scrub.clock.advance(1.0)
    assert scrub.artifacts == 4 and scrub.passes == 0
    scrub.clock.advance(1.0)
    assert scrub.passes == 1


def test_passes_repeat_after_the_interval(node: KuraNode, scrubs: list[Scrub]) -> None:
    """The next pass starts KURA_SCRUB_INTERVAL_MS after the last one ended."""
    request(node, "PUT", GRADLE.format("a"), b"a" * 100)
    scrub = Scrub(node, rate=1_000_000, interval=60).start()
    scrubs.append(scrub)
    scrub.clock.advance(1)
    assert (scrub.passes, scrub.artifacts) == (1, 1)
    scrub.clock.advance(58)
    assert scrub.artifacts == 1
    scrub.clock.advance(2)
    assert scrub.artifacts == 2


@pytest.mark.node_environ(**FILES)
def test_a_corrupted_body_is_found_forgotten_and_asked_for_again(
    node: KuraNode, scrubs: list[Scrub]
) -> None:
    """Bit rot no read has seen: the scrub finds it, the node forgets it and asks its peers."""
    intact = os.urandom(30_000)
    request(node, "PUT", GRADLE.format("intact"), intact)
    request(node, "PUT", GRADLE.format("rotten"), os.urandom(300_000))
    path = node.store.layout.absolute(manifest_of(node, "rotten").blob_path)
    flip_byte(path, offset=299_999)
    scrub = Scrub(node, rate=10_000_000).start()
    scrubs.append(scrub)
    scrub.clock.advance(10)
    assert scrub.passes == 1 and scrub.artifacts == 2
    assert scrub.value("kura_scrub_damaged_artifacts_total", reason="corrupt") == 1
    assert sample(node, "kura_corrupt_artifacts_total") == 1
    assert sample(node, "kura_artifact_repairs_total", result="unavailable") == 1
    assert manifest_of(node, "rotten") is None and not os.path.exists(path)
    assert request(node, "GET", GRADLE.format("rotten")).status == 404
    assert request(node, "GET", GRADLE.format("intact")).body == intact


def test_a_rotten_body_in_the_database_is_found_and_forgotten_without_being_held(
    node: KuraNode, scrubs: list[Scrub]
) -> None:
    """A small body kept in the database is checked too (SQLite does not
    checksum its pages): a changed row is damage, a missing one too, and the
    scrub's reads never fill the serving paths' body cache."""
    intact, rotten, gone = os.urandom(3000), os.urandom(3000), os.urandom(3000)
    for key, body in (("intact", intact), ("rotten", rotten), ("gone", gone)):
        request(node, "PUT", GRADLE.format(key), body)
    node.store.bodies.clear()
    conn = sqlite3.connect(node.store.layout.database)
    with conn:
        conn.execute(
            "UPDATE key_values SET value = ? WHERE artifact_id = ?",
            (bytes(3000), manifest_of(node, "rotten").artifact_id),
        )
        conn.execute(
            "DELETE FROM key_values WHERE artifact_id = ?", (manifest_of(node, "gone").artifact_id,)
        )
    conn.close()
    scrub = Scrub(node, rate=10_000_000).start()
    scrubs.append(scrub)
    scrub.clock.advance(10)
    assert scrub.passes == 1 and scrub.artifacts == 3
    assert scrub.value("kura_scrub_damaged_artifacts_total", reason="corrupt") == 1
    assert scrub.value("kura_scrub_damaged_artifacts_total", reason="missing") == 1
    assert manifest_of(node, "rotten") is None and manifest_of(node, "gone") is None
    assert len(node.store.bodies) == 0
    assert request(node, "GET", GRADLE.format("rotten")).status == 404
    assert request(node, "GET", GRADLE.format("intact")).body == intact


@pytest.mark.node_environ(**FILES)
def test_missing_and_truncated_bodies_are_damage_too(node: KuraNode, scrubs: list[Scrub]) -> None:
    """The scrub forgets what is gone or short, counted by reason."""
    request(node, "PUT", GRADLE.format("gone"), b"g" * 1000)
    request(node, "PUT", GRADLE.format("short"), b"s" * 300_000)
    os.unlink(node.store.layout.absolute(manifest_of(node, "gone").blob_path))
    os.truncate(node.store.layout.absolute(manifest_of(node, "short").blob_path), 10)
    scrub = Scrub(node, rate=10_000_000).start()
    scrubs.append(scrub)
    scrub.clock.advance(10)
    assert scrub.value("kura_scrub_damaged_artifacts_total", reason="missing") == 1
    assert scrub.value("kura_scrub_damaged_artifacts_total", reason="wrong_size") == 1
    assert manifest_of(node, "gone") is None and manifest_of(node, "short") is None
    assert sample(node, "kura_damaged_artifacts_total") == 2


@pytest.mark.node_environ(**FILES)
def test_digests_missing_from_older_stores_are_filled_in(
    node: KuraNode, scrubs: list[Scrub]
) -> None:
    """The upgrade path: bodies stored before metadata schema 2 get their digest."""
    bodies = {f"old{n}": os.urandom(1000 * (n + 1)) for n in range(3)}
    for key, body in bodies.items():
        request(node, "PUT", GRADLE.format(key), body)
    request(node, "PUT", "/api/cache/keyvalue?tenant_id=default", KV)
    metadata = node.store.metadata
    metadata.commit([lambda conn: conn.execute("UPDATE manifests SET digest = NULL")])
    node.store.drop_manifest_cache()
    scrub = Scrub(node, rate=10_000_000).start()
    scrubs.append(scrub)
    scrub.clock.advance(10)
    assert scrub.value("kura_scrub_filled_digests_total") == 3
    for key, body in bodies.items():
        assert manifest_of(node, key).digest == sha(body)
    # From now on they are verified like every other body.
    flip_byte(node.store.layout.absolute(manifest_of(node, "old0").blob_path))
    assert request(node, "GET", GRADLE.format("old0")).status == 404


def test_a_restarted_scrub_resumes_where_it_stopped(node: KuraNode, scrubs: list[Scrub]) -> None:
    """The cursor is kept after every page: a restart goes on from it, not from the start."""
    for n in range(6):
        request(node, "PUT", GRADLE.format(n), b"x" * 1000)
    order = [m.artifact_id for m in node.store.metadata.blobs_page(None, 10)]
    first = Scrub(node, rate=MIN_CHARGE, page_size=2).start()  # a body a second
    for _ in range(3):  # page 1 done, page 2 half done
        first.clock.advance(1.0)
    assert first.artifacts == 4
    first.stop()
    saved = json.loads(Path(state_path(node.config.data_dir)).read_text())
    assert saved == {"after": order[1], "next_pass_at": None}
    second = Scrub(node, rate=MIN_CHARGE, page_size=2).start()
    scrubs.append(second)
    for _ in range(4):
        second.clock.advance(1.0)
    # Page 2 again (its end was never recorded), page 3; never page 1.
    assert second.passes == 1 and second.artifacts == 4


def test_the_node_runs_its_scrub_when_configured(nodes: Nodes) -> None:
    """KURA_SCRUB_BYTES_PER_SECOND above 0 starts it with the node (0 leaves it off)."""
    node = nodes.start(KURA_SCRUB_BYTES_PER_SECOND="1000000", KURA_SCRUB_INTERVAL_MS="60000")
    request(node, "PUT", GRADLE.format("a"), b"a" * 100)
    node.reactor.advance(60)  # the first pass found nothing; the second starts
    node.reactor.advance(1)
    assert sample(node, "kura_scrub_checked_artifacts_total") == 1
    assert sample(node, "kura_scrub_passes_total") == 2
    off = nodes.start("off", KURA_SCRUB_BYTES_PER_SECOND="0")
    request(off, "PUT", GRADLE.format("a"), b"a" * 100)
    off.reactor.advance(3600)
    assert sample(off, "kura_scrub_passes_total") == 0

"""Start-up does not scale with the store: /up first, orphans swept in the background."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from kura.service import STORE_SCAN, KuraNode
from kura.storage import sweep as sweep_module
from kura.storage.sweep import StartupSweep
from kura.testing import ControlledRunner, memory_node, request, succeeded
from tests.support.mesh import wait_for
from tests.support.real import RealNode

CAS = "/api/cache/cas/{id}?tenant_id=default"
#: A modification time long before any start-up.
LONG_AGO = 1_000_000


def plant(path: str, mtime: float | None = LONG_AGO) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"junk")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def stop(node: KuraNode) -> None:
    succeeded(node.stopService())


def test_up_answers_before_the_sweep_ends_and_a_concurrent_publish_keeps_its_file(
    tmp_path: Path,
) -> None:
    """/up is 200 and /ready says why not while the sweep is held; then only orphans go."""
    data_dir = str(tmp_path / "data")
    first = memory_node(data_dir)
    assert request(first, "POST", CAS.format(id="live"), b"live").status == 204
    layout = first.store.layout
    stop(first)
    orphans = [
        plant(os.path.join(layout.blobs, "ab", "ab" * 32 + f"-00000000000{n}")) for n in range(3)
    ]
    stray = plant(os.path.join(layout.blobs, "stray-file"))
    staged = plant(os.path.join(layout.uploads, "0" * 32))

    runner = ControlledRunner()
    # Held where it lists blobs/: everything below is on disk when it looks.
    runner.hold = lambda f: f is sweep_module._listdir
    node = memory_node(data_dir, runner=runner)
    try:
        assert runner.held, "the sweep should be waiting on a storage thread"
        assert request(node, "GET", "/up").status == 200
        ready = request(node, "GET", "/ready")
        assert ready.status == 503 and STORE_SCAN in ready.json()["reasons"]
        assert all(os.path.exists(p) for p in orphans)
        # Staging was set aside at once: new uploads never see the stale files.
        assert os.listdir(layout.uploads) == [] and not os.path.exists(staged)
        # A publish racing the sweep: its file is placed before its manifest
        # commits (the batch writer's order), so no manifest names it yet.
        in_flight = plant(os.path.join(layout.blobs, "ab", "ab" * 32 + "-ffffffffffff"), None)
        assert request(node, "POST", CAS.format(id="during"), b"during").status == 204
        while runner.held:
            runner.release()
        assert node.swept.called
        # Newer than the start, unreferenced: possibly a publish in flight, kept.
        assert not any(os.path.exists(p) for p in [*orphans, stray])
        assert os.path.exists(in_flight)
        assert node.sweep is not None and node.sweep.result.orphans == 4
        assert node.sweep.result.kept_recent == 1
        assert request(node, "GET", CAS.format(id="live")).body == b"live"
        assert request(node, "GET", CAS.format(id="during")).body == b"during"
        assert STORE_SCAN not in node.state.readiness()[1]
        assert [d for d in os.listdir(layout.tmp_dir) if "stale" in d] == []
    finally:
        while runner.held:
            runner.release()
        stop(node)


def test_stopping_mid_sweep_ends_it_before_the_store_closes(tmp_path: Path) -> None:
    """A node stopped while its sweep waits stops the sweep first; the next start finishes."""
    data_dir = str(tmp_path / "data")
    stop(memory_node(data_dir))
    blobs = os.path.join(data_dir, "blobs")
    first = plant(os.path.join(blobs, "cd", "cd" * 32 + "-000000000000"))
    second = plant(os.path.join(blobs, "ce", "ce" * 32 + "-000000000000"))
    runner = ControlledRunner()
    runner.hold = lambda f: getattr(f, "__name__", "") == "_remove_unreferenced"
    node = memory_node(data_dir, runner=runner)
    done = node.stopService()
    assert not done.called  # waiting for the hop under way (shard cd)
    runner.release()
    succeeded(done)
    assert not runner.held  # no hop after the stop
    assert not os.path.exists(first) and os.path.exists(second)
    stop(memory_node(data_dir))
    assert not os.path.exists(second)


def test_the_sweep_works_in_batches(tmp_path: Path) -> None:
    """A shard of many files costs one storage hop per batch, not one per file or one in all."""
    data_dir = str(tmp_path / "data")
    node = memory_node(data_dir)
    layout = node.store.layout
    for n in range(25):
        plant(os.path.join(layout.blobs, "ef", f"{n:064x}-000000000000"))
    runner = ControlledRunner()
    sweep = StartupSweep(
        layout=layout,
        metadata=node.store.metadata,
        runner=runner,
        clock=node.reactor,
        cutoff=node.store.started_wall,
        batch=10,
        pause=0,
    )
    result = succeeded(Deferred.fromCoroutine(sweep.run()))
    assert result.orphans == 25
    assert runner.calls.count("StartupSweep._remove_unreferenced") == 3
    stop(node)


@pytest.mark.realnode
def test_a_real_node_is_up_at_once_and_sweeps_old_orphans_away(tmp_path: Path) -> None:
    """twistd kura on a store with thousands of orphans: /up, then /ready once they are gone."""
    data_dir = str(tmp_path / "data")
    blobs = os.path.join(data_dir, "blobs")
    planted = 0
    for shard in range(16):
        directory = os.path.join(blobs, f"{shard:02x}")
        os.makedirs(directory)
        for n in range(250):
            plant(os.path.join(directory, f"{shard:02x}{n:062x}-000000000000"))
            planted += 1
    node = RealNode(data_dir).start()
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(node.url + "/ready", timeout=5) as response:
                    return bool(json.loads(response.read())["ready"])
            except OSError:
                return False

        wait_for("the sweep to end", ready, timeout=60)
        left = sum(len(files) for _, _, files in os.walk(blobs))
        assert left == 0, f"{left} of {planted} orphans left"
        assert "start-up sweep done" in node.log()
    finally:
        assert node.stop() == 0

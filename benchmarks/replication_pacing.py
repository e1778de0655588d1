"""Does replication cost the receiver's public traffic? Peered vs unpeered, one run.

Node A (the receiver) runs alone on core 0 (``taskset``) and serves 4 KiB
Xcode CAS GETs to ``wrk`` at ``--concurrency`` (8) for ``--duration`` seconds.
Meanwhile this script uploads ``--large-mib`` (32) MiB Gradle artifacts into
node B, back to back, with ``--uploaders`` (2) threads. Everything but A —
B, wrk, the uploaders — shares core 1.

* **peered**: A and B are a signed two-node mesh (as by default: a peer
  secret), so every upload into B replicates into A while A serves;
* **unpeered**: the same two processes without peers; B takes the same
  uploads and A the same GETs, but nothing replicates.

Each repetition runs both, in alternating order. Reported per pair: A's GET
rate and p99 (peered / unpeered: the targets are >= 0.85x and <= 1.2x),
the replication rate A reached under load and the lowest effective limit
its limiter published (the floor), how long A took to hold every artifact
uploaded to B once the uploads stopped (convergence), and A's CPU seconds
per GB ingested in a phase without public load.

Run (from the repository root)::

    PYTHONPATH=. .venv/bin/python benchmarks/replication_pacing.py --repetitions 3
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from benchmarks import _common as common
from benchmarks.replication_stress import cas_path, exists, gradle_path
from tests.support.mesh import HOSTS, MeshNode, is_ready, metrics, request, shared_port, wait_for

KiB = 1024
MiB = 1024 * KiB
#: The receiver's core; everything else runs on the other one.
RECEIVER_CORE = 0
OTHER_CORE = 1
EFFECTIVE = "kura_replication_bandwidth_effective_limit_bytes_per_second"


def has(node: MeshNode, key: str, size: int) -> bool:
    """Whether Gradle artifact ``key`` is stored on ``node`` with ``size`` bytes."""
    return exists(node, gradle_path(key), size)


@contextlib.contextmanager
def pair(
    root: str, *, peered: bool, environ: dict[str, str]
) -> Iterator[tuple[MeshNode, MeshNode]]:
    """Nodes A (pinned to the receiver core) and B, peered with each other or not."""
    os.makedirs(root)
    hosts = list(HOSTS[:2])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]

    def node(name: str, index: int) -> MeshNode:
        return MeshNode(
            os.path.join(root, name),
            hosts[index],
            port,
            KURA_PEERS=urls[1 - index] if peered else "",
            KURA_INTERNAL_BIND_HOST=hosts[index],
            **environ,
        )

    a, b = node("a", 0), node("b", 1)
    a.launcher = ["taskset", "-c", str(RECEIVER_CORE)]
    a.start()
    b.start()
    try:
        if peered:
            wait_for("peers see each other", lambda: is_ready(a, 1) and is_ready(b, 1), 30)
        yield a, b
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)


class Uploader:
    """Threads PUTting fresh large Gradle artifacts into ``node`` until stopped."""

    def __init__(self, node: MeshNode, size: int, threads: int) -> None:
        self.node = node
        self.size = size
        self.body = os.urandom(size)
        self.keys: list[str] = []
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.failures = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            key = f"large-{time.monotonic_ns()}-{next(self._ids)}"
            status, _, _ = request("PUT", self.node.url + gradle_path(key), self.body, timeout=120)
            if status in (200, 201, 204):
                self.keys.append(key)
            else:
                self.failures += 1


class GaugeSampler:
    """Polls one metric of ``node`` every 0.25 s; keeps the values seen."""

    def __init__(self, node: MeshNode, name: str) -> None:
        self.node = node
        self.name = name
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(OSError, ValueError):
                value = metrics(self.node).get(self.name)
                if value is not None:
                    self.values.append(value)


def seed_reads(node: MeshNode, count: int) -> list[str]:
    """Store ``count`` 4 KiB CAS artifacts on ``node``; return their paths."""
    body = os.urandom(4 * KiB)
    paths = [cas_path(f"small{n:04d}") for n in range(count)]
    for path in paths:
        status, _, _ = request("POST", node.url + path, body)
        if status not in (200, 201, 204):
            raise common.BenchmarkError(f"seeding {path} answered {status}")
    return paths


def one_side(root: str, *, peered: bool, args: argparse.Namespace) -> dict[str, Any]:
    environ = {"KURA_ACCESS_LOG": "false"} if common.kura_knows("KURA_ACCESS_LOG") else {}
    with pair(root, peered=peered, environ=environ) as (a, b):
        paths = seed_reads(a, 64)
        script = common.lua_get_script(root, "gets", paths)
        url = a.url + paths[0]
        common.run_wrk(url, args.concurrency, 2, script, a.process.pid)  # warm-up
        uploader = Uploader(b, args.large_mib * MiB, args.uploaders)
        cpu_before = common.tree_cpu_seconds(a.process.pid)
        with GaugeSampler(a, EFFECTIVE) as limits:
            uploader.start()
            result = common.run_wrk(url, args.concurrency, args.duration, script, a.process.pid)
            stopped = time.monotonic()
            uploader.stop()
        held = sum(1 for key in uploader.keys if has(a, key, uploader.size)) if peered else 0
        converged_s = float("nan")
        if peered:
            wait_for(
                "every upload reached A",
                lambda: all(has(a, key, uploader.size) for key in uploader.keys),
                args.converge_timeout,
            )
            converged_s = time.monotonic() - stopped
        side: dict[str, Any] = {
            "rps": result.rps,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "errors": result.error_count,
            "a_cpu_s": common.tree_cpu_seconds(a.process.pid) - cpu_before,
            "uploads": len(uploader.keys),
            "upload_failures": uploader.failures,
            "replicated_during_load_mb_s": held * uploader.size / result.duration_s / 1e6,
            "converged_s": converged_s,
            "lowest_limit_mb_s": min(limits.values) / 1e6 if limits.values else float("nan"),
        }
        if peered:
            side["ingest_cpu_s_per_gb"] = ingest_cost(a, b, args)
        return side


def ingest_cost(a: MeshNode, b: MeshNode, args: argparse.Namespace) -> float:
    """A's CPU seconds per GB replicated into it, with no public load."""
    uploader = Uploader(b, args.large_mib * MiB, args.uploaders)
    cpu_before = common.tree_cpu_seconds(a.process.pid)
    uploader.start()
    time.sleep(args.ingest_seconds)  # the phase's length, not a synchronization
    uploader.stop()
    wait_for(
        "every ingest-phase upload reached A",
        lambda: all(has(a, key, uploader.size) for key in uploader.keys),
        args.converge_timeout,
    )
    cpu = common.tree_cpu_seconds(a.process.pid) - cpu_before
    return cpu / (len(uploader.keys) * uploader.size / 1e9) if uploader.keys else float("nan")


def report(pairs: list[dict[str, dict[str, Any]]]) -> str:
    spread = common.fmt_spread

    def peered(name: str) -> list[float]:
        return [p["peered"][name] for p in pairs]

    def unpeered(name: str) -> list[float]:
        return [p["unpeered"][name] for p in pairs]

    def ratio(name: str) -> list[float]:
        return [p["peered"][name] / p["unpeered"][name] for p in pairs]

    rows = [
        ("A GET/s peered", peered("rps")),
        ("A GET/s unpeered", unpeered("rps")),
        ("throughput ratio (>= 0.85)", ratio("rps")),
        ("A p99 ms peered", peered("p99_ms")),
        ("A p99 ms unpeered", unpeered("p99_ms")),
        ("p99 ratio (<= 1.2)", ratio("p99_ms")),
        ("replicated into A under load, MB/s", peered("replicated_during_load_mb_s")),
        ("lowest effective limit, MB/s", peered("lowest_limit_mb_s")),
        ("convergence after uploads stop, s", peered("converged_s")),
        ("uploads into B, peered", peered("uploads")),
        ("uploads into B, unpeered", unpeered("uploads")),
        ("A CPU s per GB ingested (no public load)", peered("ingest_cpu_s_per_gb")),
    ]
    lines = ["| figure | median [range] |", "|---|---|"]
    lines += [f"| {name} | {spread(values)} |" for name, values in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--duration", type=int, default=15, help="seconds of wrk load per side")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--large-mib", type=int, default=32)
    parser.add_argument("--uploaders", type=int, default=2)
    parser.add_argument("--ingest-seconds", type=float, default=5.0)
    parser.add_argument("--converge-timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="also print the raw figures")
    args = parser.parse_args()
    common.require_tools("wrk", "taskset")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores: the receiver on one, everything else on the other")
    os.sched_setaffinity(0, {OTHER_CORE})  # wrk, B and the uploaders inherit it
    common.exit_cleanly_on_sigterm()
    pairs: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="kura-pacing-") as work:
        for n in range(args.repetitions):
            order = (True, False) if n % 2 == 0 else (False, True)
            run: dict[str, dict[str, Any]] = {}
            for peered in order:
                name = "peered" if peered else "unpeered"
                run[name] = one_side(os.path.join(work, f"{n}-{name}"), peered=peered, args=args)
                print(f"repetition {n + 1} {name}: {json.dumps(run[name])}", file=sys.stderr)
            pairs.append(run)
    print(report(pairs))
    if args.json:
        print(json.dumps(pairs, indent=2))


if __name__ == "__main__":
    main()

"""Replication stress: a local three-node mesh under mixed read/write load.

Reproduces the local stress of the seed (upstream PR #11124, "Replication
stress"), scaled to this machine. Three ``twistd kura`` processes with static
peers run on loopback (127.0.0.2-4, one shared internal port). Each run, from
a pool of client threads:

* many small reads (4 KiB Xcode CAS) and several large reads (Gradle) spread
  over all three nodes;
* new small writes (4 KiB CAS) and new large writes (Gradle) into node A;

and the run ends only when every write of the run is readable from both
peers. After each run the script records the outbox depth on every node and
how long the outboxes take to drain to 0; at the end it reports node RSS,
``fd_timeout_count``, ``memory_pressure_state`` and whether every node
answered ``/ready`` 200 throughout (a monitor polls every 0.25 s).

Upstream's workload per run was 120 small reads, 45 x 64 MiB reads, 40 x 4 KiB
writes and 4 x 64 MiB writes, and those are the defaults here: this 2-core VM
carries them. What is scaled down is the harness: Docker containers become
three processes on loopback addresses of one VM (they share its two cores
and disk with the client), and hyperfine+curl become one Python process with
``--concurrency`` client threads (default 8). ``--large-mib`` and the counts
shrink the workload further for a quick look.

Run (from the repository root)::

    PYTHONPATH=. .venv/bin/python benchmarks/replication_stress.py --runs 3

It prints a markdown table (and, with ``--json``, the raw numbers).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from tests.support.mesh import MeshNode, get_json, mesh, request, start_all, wait_for

KiB = 1024
MiB = 1024 * KiB
TENANT = "tenant_id=default"


def cas_path(key: str) -> str:
    return f"/api/cache/cas/{key}?{TENANT}"


def gradle_path(key: str) -> str:
    return f"/api/cache/gradle/{key}?{TENANT}"


def exists(node: MeshNode, path: str, size: int) -> bool:
    """Whether ``path`` is stored on ``node`` with ``size`` bytes (one-byte range read)."""
    status, headers, _ = request("GET", node.url + path, headers={"Range": "bytes=-1"})
    return status == 206 and headers.get("content-range", "").endswith(f"/{size}")


class ReadyMonitor(threading.Thread):
    """Polls ``/ready`` of every node; remembers any answer that was not 200."""

    def __init__(self, nodes: list[MeshNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.failures: list[tuple[float, str, int]] = []
        self.polls = 0
        #: The deepest outbox seen on any node since the last :meth:`take_peak`.
        self.peak_outbox = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.25):
            for node in self.nodes:
                try:
                    status, _, _ = request("GET", node.url + "/ready", timeout=5)
                except OSError:
                    status = 0
                self.polls += 1
                if status != 200:
                    self.failures.append((time.time(), node.host, status))
            with contextlib.suppress(OSError):
                self.peak_outbox = max(self.peak_outbox, *outbox_depths(self.nodes))

    def take_peak(self) -> int:
        peak, self.peak_outbox = self.peak_outbox, 0
        return peak

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def outbox_depths(nodes: list[MeshNode]) -> list[int]:
    return [int(get_json(n.url + "/status/rollout")["outbox_messages"]) for n in nodes]


def one_run(
    run: int,
    monitor: ReadyMonitor,
    nodes: list[MeshNode],
    args: argparse.Namespace,
    small_keys: list[str],
    large_keys: list[str],
) -> dict[str, Any]:
    a = nodes[0]
    large = args.large_mib * MiB
    jobs: list[Callable[[], None]] = []

    def read(node: MeshNode, path: str, size: int) -> Callable[[], None]:
        def job() -> None:
            status, _, body = request("GET", node.url + path, timeout=120)
            assert status == 200 and len(body) == size, (node.host, path, status, len(body))

        return job

    def write(path: str, body: bytes, ok: int) -> Callable[[], None]:
        def job() -> None:
            status, _, _ = request("PUT" if "gradle" in path else "POST", a.url + path, body)
            assert status == ok, (path, status)

        return job

    for n in range(args.small_reads):
        jobs.append(read(nodes[n % 3], cas_path(small_keys[n % len(small_keys)]), 4 * KiB))
    for n in range(args.large_reads):
        jobs.append(read(nodes[n % 3], gradle_path(large_keys[n % len(large_keys)]), large))
    new_small = [f"run{run}-small{n}" for n in range(args.small_writes)]
    new_large = [f"run{run}-large{n}" for n in range(args.large_writes)]
    for key in new_small:
        jobs.append(write(cas_path(key), os.urandom(4 * KiB), 204))
    for key in new_large:
        jobs.append(write(gradle_path(key), os.urandom(large), 201))
    # Interleave reads and writes so writes land while reads are in flight.
    jobs = jobs[::2] + jobs[1::2]

    monitor.take_peak()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        for future in concurrent.futures.as_completed([pool.submit(j) for j in jobs]):
            future.result()
    load_done = time.perf_counter()
    for node in nodes[1:]:
        for key in new_small:
            wait_for(
                "small write replicated",
                lambda n=node, k=key: exists(n, cas_path(k), 4 * KiB),
                120,
                0.02,
            )
        for key in new_large:
            wait_for(
                "large write replicated",
                lambda n=node, k=key: exists(n, gradle_path(k), large),
                300,
                0.02,
            )
    ended = time.perf_counter()
    depths = outbox_depths(nodes)
    wait_for("outboxes drained", lambda: sum(outbox_depths(nodes)) == 0, 300, 0.05)
    drained = time.perf_counter()
    return {
        "run": run,
        "seconds": ended - started,
        "load_seconds": load_done - started,
        "outbox_after_run": depths,
        "drain_seconds": drained - ended,
        "peak_outbox": monitor.take_peak(),
    }


def rss_mib(node: MeshNode) -> float:
    return float(psutil.Process(node.process.pid).memory_info().rss) / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small-reads", type=int, default=120)
    parser.add_argument("--large-reads", type=int, default=45)
    parser.add_argument("--small-writes", type=int, default=40)
    parser.add_argument("--large-writes", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bandwidth", type=int, default=536870912, help="bytes/s ceiling")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    parser.add_argument("--json", action="store_true", help="also print raw results as JSON")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="kura-replication-stress-")
    nodes = mesh(
        root,
        3,
        KURA_LOG_FORMAT="text",
        KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND=str(args.bandwidth),
        KURA_CAS_CAPACITY_BYTES=str(64 * 1024 * MiB),
    )
    results: list[dict[str, Any]] = []
    monitor = ReadyMonitor(nodes)
    try:
        start_all(nodes, timeout=60)
        a, b, c = nodes
        large = args.large_mib * MiB
        # Precheck: one small and one large artifact written to A reach B and C.
        small_keys = [f"seed-small{n}" for n in range(40)]
        large_keys = [f"seed-large{n}" for n in range(3)]
        for key in small_keys:
            assert request("POST", a.url + cas_path(key), os.urandom(4 * KiB))[0] == 204
        for key in large_keys:
            assert request("PUT", a.url + gradle_path(key), os.urandom(large))[0] == 201
        for node in (b, c):
            for key in small_keys:
                wait_for("seed", lambda n=node, k=key: exists(n, cas_path(k), 4 * KiB), 120, 0.05)
            for key in large_keys:
                wait_for("seed", lambda n=node, k=key: exists(n, gradle_path(k), large), 300, 0.05)
        wait_for("outboxes drained", lambda: sum(outbox_depths(nodes)) == 0, 300, 0.05)
        monitor.start()
        for run in range(args.runs):
            results.append(one_run(run, monitor, nodes, args, small_keys, large_keys))
        monitor.stop()
        rollouts = [get_json(n.url + "/status/rollout") for n in nodes]
        rss = [rss_mib(n) for n in nodes]
    finally:
        if monitor.is_alive():
            monitor.stop()
        for node in nodes:
            node.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    seconds = [r["seconds"] for r in results]
    mean = statistics.mean(seconds)
    spread = statistics.stdev(seconds) if len(seconds) > 1 else 0.0
    print("## Replication stress (3 nodes, static peers, loopback)\n")
    print(
        f"Per run: {args.small_reads} small (4 KiB) reads and {args.large_reads} large "
        f"({args.large_mib} MiB) reads over all nodes, {args.small_writes} small and "
        f"{args.large_writes} large new writes into node A; concurrency {args.concurrency}; "
        f"replication ceiling {args.bandwidth} B/s.\n"
    )
    print(
        "| run | duration (s) | load phase (s) | peak outbox during run | "
        "outbox after run (A/B/C) | drain to 0 (s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        depths = "/".join(str(d) for d in r["outbox_after_run"])
        print(
            f"| {r['run'] + 1} | {r['seconds']:.2f} | {r['load_seconds']:.2f} "
            f"| {r['peak_outbox']} | {depths} | {r['drain_seconds']:.2f} |"
        )
    print()
    print("| metric | value |")
    print("|---|---|")
    print(f"| run duration mean ± stdev | {mean:.2f} s ± {spread:.2f} s |")
    print(f"| run duration min - max | {min(seconds):.2f} - {max(seconds):.2f} s |")
    print(f"| node RSS after the runs (A/B/C) | {' / '.join(f'{m:.0f} MiB' for m in rss)} |")
    stayed = not monitor.failures
    print(
        f"| all nodes stayed ready | {'yes' if stayed else 'no'} "
        f"({monitor.polls} polls, {len(monitor.failures)} not 200) |"
    )
    print(
        f"| fd_timeout_count (A/B/C) | {' / '.join(str(r['fd_timeout_count']) for r in rollouts)} |"
    )
    print(
        "| memory_pressure_state (A/B/C) | "
        f"{' / '.join(str(r['memory_pressure_state']) for r in rollouts)} |"
    )
    if args.json:
        print()
        print(json.dumps({"runs": results, "rss_mib": rss, "ready_failures": monitor.failures}))


if __name__ == "__main__":
    main()

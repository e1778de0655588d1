"""The object-store tier (issue 18): read-through against local hits, and upload drain rate.

Against moto's S3 server (``moto[server]``, in this process, on loopback) and
real ``twistd kura`` nodes:

* **read-through**: a writer node uploads ``--small-keys`` 4 KiB artifacts
  and one 64 MiB artifact per repetition; a fresh reader node (empty disk)
  then GETs each once (every GET a read-through: fetch, verify, publish,
  serve) and once more (a local hit). Reported: 4 KiB latency (median of
  the keys) and 64 MiB throughput, read-through against local.
* **drain**: a node writes ``--drain-count`` 4 KiB artifacts while its store
  is unreachable (all queued), is stopped, and is started again against the
  live store; the rate is the queue length over the time from ``/up`` to an
  empty queue (``/status/rollout``'s ``object_store_uploads``).

Each figure is the median [min-max] of ``--repeat`` repetitions. Usage (from
the repository root)::

    flock -x /tmp/kura-bench.lock .venv/bin/python benchmarks/object_store.py \\
        [--repeat 3] [--small-keys 50] [--drain-count 500]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable

from _common import (
    KuraServer,
    MiB,
    command_line,
    fmt_spread,
    http_call,
    kura_environment,
    machine_summary,
    markdown_table,
    running,
    upload_many,
    work_directory,
)

from tests.support.s3 import MotoS3, tier_environ

NS = "?tenant_id=default&namespace_id=bench"


def cas(key: str) -> str:
    return f"/api/cache/cas/{key}{NS}"


def queued(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status/rollout", timeout=10) as answer:
        return int(json.loads(answer.read())["object_store_uploads"])


def wait_until(what: str, done: Callable[[], bool], timeout: float = 300.0) -> float:
    """Poll ``done`` every 5 ms; returns the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return time.monotonic()
        time.sleep(0.005)
    raise TimeoutError(what)


def timed_get(port: int, key: str, size: int) -> float:
    started = time.perf_counter()
    status, body = http_call("127.0.0.1", port, "GET", cas(key))
    elapsed = time.perf_counter() - started
    if status != 200 or len(body) != size:
        raise RuntimeError(f"GET {key}: {status}, {len(body)} bytes")
    return elapsed


def read_through_round(
    s3: MotoS3, work: str, small_keys: int, big: bytes, run: int
) -> dict[str, float]:
    """One repetition: a writer fills a fresh bucket, a fresh reader reads it twice."""
    bucket = f"kura-bench-{uuid.uuid4().hex[:10]}"
    s3.client.create_bucket(Bucket=bucket)
    env = kura_environment(tier_environ(s3.endpoint, bucket))
    small = [(f"s{run}-{n}", os.urandom(4096)) for n in range(small_keys)]
    with running(KuraServer(f"writer{run}", work, env)) as writer:
        upload_many(writer.port, [("POST", cas(k), body) for k, body in small])
        upload_many(writer.port, [("POST", cas(f"big{run}"), big)], workers=1)
        wait_until("the writer's uploads", lambda: queued(writer.port) == 0)
    with running(KuraServer(f"reader{run}", work, env)) as reader:
        through = [timed_get(reader.port, key, 4096) for key, _ in small]
        local = [timed_get(reader.port, key, 4096) for key, _ in small]
        big_through = timed_get(reader.port, f"big{run}", len(big))
        big_local = timed_get(reader.port, f"big{run}", len(big))
    return {
        "small_through_ms": statistics.median(through) * 1000,
        "small_local_ms": statistics.median(local) * 1000,
        "big_through_mb_s": len(big) / big_through / 1e6,
        "big_local_mb_s": len(big) / big_local / 1e6,
    }


def drain_round(s3: MotoS3, work: str, count: int, run: int) -> float:
    """One repetition: ``count`` writes queued against a dead store, then drained."""
    bucket = f"kura-bench-{uuid.uuid4().hex[:10]}"
    s3.client.create_bucket(Bucket=bucket)
    down = MotoS3()  # never started: connections are refused
    name = f"drain{run}"
    queued_env = kura_environment(tier_environ(down.endpoint, bucket))
    writes = [("POST", cas(f"d{run}-{n}"), os.urandom(4096)) for n in range(count)]
    with running(KuraServer(name, work, queued_env)) as node:
        upload_many(node.port, writes)
        if queued(node.port) != count:
            raise RuntimeError("writes were not all queued")
    live = KuraServer(name, work, kura_environment(tier_environ(s3.endpoint, bucket)))
    with running(live) as node:  # start() returns once /up answers
        up = time.monotonic()
        drained = wait_until("the drain", lambda: queued(node.port) == 0)
    return count / (drained - up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small-keys", type=int, default=50)
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--drain-count", type=int, default=500)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    big = hashlib.sha256(b"kura").digest() * (args.big_mib * MiB // 32)
    s3 = MotoS3().start()
    rounds: list[dict[str, float]] = []
    try:
        with work_directory(args.keep) as work:
            for run in range(args.repeat):
                figures = read_through_round(s3, work, args.small_keys, big, run)
                figures["drain_per_s"] = drain_round(s3, work, args.drain_count, run)
                rounds.append(figures)
                print(f"repetition {run + 1}: {figures}", file=sys.stderr)
    finally:
        s3.stop()

    def spread(name: str) -> str:
        return fmt_spread([r[name] for r in rounds])

    rows = [
        [
            "4 KiB GET, ms (median of the keys)",
            spread("small_through_ms"),
            spread("small_local_ms"),
        ],
        [f"{args.big_mib} MiB GET, MB/s", spread("big_through_mb_s"), spread("big_local_mb_s")],
    ]
    print("\n".join(machine_summary()))
    print(f"\n    {command_line(sys.argv, {})}\n")
    print(markdown_table(["", "read-through (empty disk)", "local hit"], rows))
    print(f"\nupload backlog drain, 4 KiB artifacts per second: {spread('drain_per_s')}")


if __name__ == "__main__":
    main()

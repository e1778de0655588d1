"""Start-up to ``/up`` of a real ``twistd kura`` on a store of a million artifacts.

Issue 15: start-up must not scale with the store. The script builds (once,
cached under ``--cache``, never in the repository) a synthetic data directory:
a schema-2 SQLite store with ``--count`` file-backed manifests, inserted with
``executemany`` in one transaction, and one small blob file per manifest in
the usual ``blobs/<shard>/<id>-<suffix>`` layout, plus a few orphans older
than any start. It then starts ``twistd kura`` on it ``--repeat`` times and
measures, from ``Popen`` to the first 200:

* ``/up`` (listeners open: the figure the target is about, < 5 s), and
* ``/ready`` (the background sweep of orphans and stale staging ended;
  a node without peers is ready then),

printing the median and the range of each. Polling is every 10 ms.

Usage (from the repository root)::

    flock -x /tmp/kura-bench.lock .venv/bin/python benchmarks/startup.py \\
        [--count 1000000] [--repeat 3] [--cache /tmp/kura-startup-store] [--rebuild] \\
        [--source OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
if sys.path[0:1] != [REPO_ROOT]:
    sys.path.insert(0, REPO_ROOT)

from kura.storage.metadata import MetadataStore  # noqa: E402
from tests.support.real import free_ports  # noqa: E402

#: Bytes per synthetic blob (the size does not matter to start-up; files do).
BLOB_BYTES = 16
#: Orphans planted (older than any start): the sweep must find and remove them.
ORPHANS = 100
#: Rows per executemany chunk (all in one transaction).
CHUNK = 50_000
#: A fixed modification time long before any start.
LONG_AGO = 1_000_000_000


def artifact_id(n: int) -> str:
    return hashlib.sha256(b"kura-startup-bench\0%d" % n).hexdigest()


def blob_path(identifier: str) -> str:
    return f"blobs/{identifier[:2]}/{identifier}-000000000000"


def build(data_dir: str, count: int) -> None:
    """The synthetic store: SQLite rows in one transaction, then the files."""
    if os.path.exists(data_dir):
        shutil.rmtree(data_dir)
    os.makedirs(os.path.join(data_dir, "blobs"))
    started = time.monotonic()
    store = MetadataStore(os.path.join(data_dir, "kura.sqlite3"), data_dir)
    store.open()  # the current schema, created fresh
    store.close()
    db = sqlite3.connect(os.path.join(data_dir, "kura.sqlite3"), isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")  # building a fixture, not serving
    db.execute("BEGIN")
    base = 1_700_000_000_000
    for start in range(0, count, CHUNK):
        rows = []
        for n in range(start, min(count, start + CHUNK)):
            identifier = artifact_id(n)
            rows.append(
                (
                    identifier,
                    "gradle",
                    "",
                    f"k{n}",
                    "application/octet-stream",
                    0,
                    blob_path(identifier),
                    BLOB_BYTES,
                    base + n,
                    base + n,
                    base + n,
                )
            )
        db.executemany(
            "INSERT INTO manifests (artifact_id, producer, namespace_id, key, content_type, "
            "inline, blob_path, size, version_ms, created_at_ms, last_access_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    rows_done = time.monotonic()
    print(f"  {count} rows in {rows_done - started:.1f}s", flush=True)
    shards: dict[str, list[str]] = {}
    for n in range(count):
        identifier = artifact_id(n)
        shards.setdefault(identifier[:2], []).append(blob_path(identifier))
    body = b"x" * BLOB_BYTES

    def write_shard(paths: list[str]) -> None:
        directory = os.path.join(data_dir, os.path.dirname(paths[0]))
        os.makedirs(directory, exist_ok=True)
        for relative in paths:
            fd = os.open(os.path.join(data_dir, relative), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, body)
            os.close(fd)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write_shard, shards.values()))
    print(f"  {count} files in {time.monotonic() - rows_done:.1f}s", flush=True)


def plant_orphans(data_dir: str, count: int) -> None:
    """Orphans (no manifest, older than any start) for every run's sweep to remove."""
    for n in range(ORPHANS):
        path = os.path.join(data_dir, blob_path(artifact_id(count + n)))
        with open(path, "wb") as handle:
            handle.write(b"orphan")
        os.utime(path, (LONG_AGO, LONG_AGO))


def status(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def measure(data_dir: str, source: str = REPO_ROOT) -> tuple[float, float]:
    """One start: seconds to the first ``/up`` 200 and to the first ``/ready`` 200."""
    port, internal = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KURA_")}
    env.update(
        KURA_DATA_DIR=data_dir,
        KURA_PORT=str(port),
        KURA_INTERNAL_PORT=str(internal),
        KURA_NODE_URL=f"http://127.0.0.1:{internal}",
        KURA_BIND_HOST="127.0.0.1",
        KURA_CAS_CAPACITY_BYTES=str(1 << 40),
        KURA_LOG_FORMAT="text",
        PYTHONPATH=source + os.pathsep + env.get("PYTHONPATH", ""),
    )
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = open(data_dir.rstrip("/") + ".log", "ab")  # noqa: SIM115 - the child's
    started = time.monotonic()
    process = subprocess.Popen(
        [twistd, "--nodaemon", "--pidfile=", "kura"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=os.path.dirname(data_dir.rstrip("/")),
    )
    log.close()
    up = ready = None
    try:
        deadline = started + 600
        while time.monotonic() < deadline and ready is None:
            if process.poll() is not None:
                raise RuntimeError(f"kura exited with {process.returncode}")
            try:
                if up is None:
                    code, _ = status(f"http://127.0.0.1:{port}/up")
                    if code == 200:
                        up = time.monotonic() - started
                        continue
                else:
                    code, _ = status(f"http://127.0.0.1:{port}/ready")
                    if code == 200:
                        ready = time.monotonic() - started
                        continue
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.01)
    finally:
        process.terminate()
        process.wait(60)
    if up is None or ready is None:
        raise RuntimeError("the node never came up and ready")
    return up, ready


def spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} s "
        f"(range {min(values):.2f}-{max(values):.2f} s, n={len(values)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", default="/tmp/kura-startup-store")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument(
        "--source",
        default=REPO_ROOT,
        help="the tree whose kura runs (another checkout, e.g. a release before issue 15)",
    )
    args = parser.parse_args()
    root = os.path.join(args.cache, str(args.count))
    data_dir = os.path.join(root, "data")
    marker = os.path.join(root, "built")
    if args.rebuild or not os.path.exists(marker):
        print(f"building a store of {args.count} artifacts under {root} (cached)", flush=True)
        build(data_dir, args.count)
        with open(marker, "w") as handle:
            handle.write("ok\n")
    ups, readies = [], []
    for run in range(args.repeat):
        plant_orphans(data_dir, args.count)
        up, ready = measure(data_dir, args.source)
        left = sum(
            os.path.exists(os.path.join(data_dir, blob_path(artifact_id(args.count + n))))
            for n in range(ORPHANS)
        )
        print(f"run {run + 1}: /up {up:.2f} s, /ready {ready:.2f} s, orphans left {left}")
        ups.append(up)
        readies.append(ready)
    if not ups:
        return
    print(f"start-up to /up with {args.count} artifacts: {spread(ups)}")
    print(f"start-up to /ready (background sweep done): {spread(readies)}")


if __name__ == "__main__":
    main()

"""Crash consistency with real processes: a kill -9 loop, the durable-publish order, junk at start.

A Jepsen-style history under a SIGKILL nemesis, the fsync/rename/metadata/ack
order seen by ``strace``, and a data directory full of junk at start-up.
Failpoints per publish step are covered by
``tests/storage/test_store_publish.py`` and ``tests/test_real_node.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.support import (
    CAS,
    GRADLE,
    MiB,
    Strace,
    blob_files,
    call,
    metric,
    node_log,
    staged_files,
)
from tests.support.real import RawClient, RealNode

pytestmark = pytest.mark.faults

#: Fixed by default so a failing history can be replayed; override to explore.
SEED = int(os.environ.get("KURA_FAULTS_SEED", "20261127"))
#: The kill loop's length; raise it for a soak (1800 s).
SOAK_SECONDS = float(os.environ.get("KURA_FAULTS_SOAK_SECONDS", "60"))
SIZES = (0, 1, 64 * 1024, 4 * MiB)
WRITERS = 4
#: The node's artifact budget in the kill loop. Beyond it the node evicts the
#: least recently used artifacts, acknowledged or not, which is right for a
#: cache but not what this test checks: the writers stay well below it.
CAPACITY = 4 * 1024 * MiB
#: Bytes of 4 MiB bodies each writer may send; after that it writes small ones.
LARGE_BYTES_PER_WRITER = CAPACITY // 2 // WRITERS
RECOVERY_LIMIT = 5.0
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


class History:
    """Every operation of a run, appended from many threads, dumpable as JSONL."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.anomalies: list[str] = []
        self.acked: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, op: dict[str, Any]) -> None:
        with self._lock:
            self.ops.append(op)
            if op["type"] == "write" and op["outcome"] == "ok":
                self.acked.append(op)

    def anomaly(self, text: str) -> None:
        with self._lock:
            self.anomalies.append(text)

    def random_acked(self, rng: random.Random) -> dict[str, Any] | None:
        with self._lock:
            return rng.choice(self.acked) if self.acked else None

    def dump(self, path: Path) -> str:
        with open(path, "w") as handle:
            for op in self.ops:
                handle.write(json.dumps(op, sort_keys=True) + "\n")
        return str(path)


def _body(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _write_once(node: RealNode, op: dict[str, Any], body: bytes) -> None:
    """Run one write and fill in its outcome: ok, fail (definitely not done) or unknown."""
    method, template = ("POST", CAS) if op["route"] == "cas" else ("PUT", GRADLE)
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=15)
    try:
        try:
            conn.connect()
        except OSError as error:
            op.update(outcome="fail", error=f"connect: {error!r}")
            return
        try:
            conn.request(method, template.format(op["key"]), body=body)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            op.update(outcome="unknown", error=repr(error))
            return
        op["status"] = response.status
        op["outcome"] = "ok" if 200 <= response.status < 300 else "fail"
    finally:
        conn.close()


def _writer(
    node: RealNode, index: int, history: History, stop: threading.Event, up: threading.Event
) -> None:
    rng = random.Random(SEED * 100 + index)
    sequence = 0
    large_bytes = 0  # attempted, acknowledged or not: an unknown outcome may be stored
    while not stop.is_set():
        if not up.wait(10):
            continue
        size = rng.choice(SIZES)
        if size == max(SIZES):
            if large_bytes + size > LARGE_BYTES_PER_WRITER:
                size = rng.choice(SIZES[:-1])
            else:
                large_bytes += size
        body = _body(rng, size)
        op: dict[str, Any] = {
            "type": "write",
            "writer": index,
            "key": f"w{index}-{sequence}",
            "route": rng.choice(("cas", "gradle")),
            "size": size,
            "sha256": hashlib.sha256(body).hexdigest(),
            "start": time.monotonic(),
        }
        sequence += 1
        _write_once(node, op, body)
        op["end"] = time.monotonic()
        if op.get("status", 0) >= 500 and op["status"] != 507:
            history.anomaly(f"write answered {op['status']}: {op}")
        history.record(op)


def _reader(node: RealNode, history: History, stop: threading.Event, up: threading.Event) -> None:
    rng = random.Random(SEED * 100 + 99)
    while not stop.is_set():
        if not up.wait(10):
            continue
        acked = history.random_acked(rng)
        if acked is None:
            stop.wait(0.05)
            continue
        template = CAS if acked["route"] == "cas" else GRADLE
        op: dict[str, Any] = {"type": "read", "key": acked["key"], "start": time.monotonic()}
        try:
            status, _, body = call(node, "GET", template.format(acked["key"]), timeout=15)
        except (OSError, http.client.HTTPException) as error:
            # Killed mid-response: Content-Length framing shows the cut.
            op.update(outcome="unknown", error=repr(error))
        else:
            op.update(status=status, outcome="ok" if status == 200 else "fail")
            if status != 200:
                history.anomaly(f"an acknowledged write read as {status}: {acked}")
            elif hashlib.sha256(body).hexdigest() != acked["sha256"]:
                history.anomaly(f"a complete read returned other bytes ({len(body)}): {acked}")
        op["end"] = time.monotonic()
        history.record(op)


def _nemesis(
    node: RealNode,
    history: History,
    stop: threading.Event,
    up: threading.Event,
    recoveries: list[float],
) -> None:
    rng = random.Random(SEED)
    while not stop.wait(rng.uniform(0.5, 3.0)):
        up.clear()
        node.kill()
        killed = time.monotonic()
        history.record({"type": "kill", "at": killed})
        node.start(timeout=30)
        recoveries.append(time.monotonic() - killed)
        history.record({"type": "restarted", "at": time.monotonic()})
        up.set()


def _stored_keys(data_dir: str) -> dict[str, tuple[str, int, str | None]]:
    """``{client key: (route, size, blob path)}`` of every manifest on disk."""
    db = sqlite3.connect(f"file:{data_dir}/kura.sqlite3?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT producer, key, size, blob_path FROM manifests").fetchall()
    finally:
        db.close()
    stored = {}
    for producer, key, size, blob_path in rows:
        route, client_key = (
            ("cas", key.removeprefix("blob/"))
            if producer == "xcode"
            else (
                "gradle",
                key,
            )
        )
        stored[client_key] = (route, size, blob_path)
    return stored


@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_kill_loop_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """Under SIGKILL every 0.5-3 s, acked writes stay byte-exact; nothing else appears."""
    print(f"kill loop: seed={SEED} duration={SOAK_SECONDS}s writers={WRITERS}")
    data_dir = str(tmp_path / "data")
    node = RealNode(data_dir, KURA_CAS_CAPACITY_BYTES=str(CAPACITY)).start()
    history = History()
    stop, up = threading.Event(), threading.Event()
    up.set()
    recoveries: list[float] = []
    threads = [
        threading.Thread(target=_writer, args=(node, i, history, stop, up), daemon=True)
        for i in range(WRITERS)
    ]
    threads.append(threading.Thread(target=_reader, args=(node, history, stop, up), daemon=True))
    nemesis = threading.Thread(
        target=_nemesis, args=(node, history, stop, up, recoveries), daemon=True
    )
    try:
        for thread in [*threads, nemesis]:
            thread.start()
        stop.wait(SOAK_SECONDS)
        stop.set()
        nemesis.join(60)
        for thread in threads:
            thread.join(60)
        # The final crash: verify what a restarted node finds on disk.
        node.kill()
        started = time.monotonic()
        node.start(timeout=30)
        recoveries.append(time.monotonic() - started)
        node.wait_until_swept()  # orphans of the last kill go in the background
        problems = list(history.anomalies)
        problems += _check_final_state(node, data_dir, history)
        if "to make room" in node_log(node):
            problems.append("the node evicted artifacts: the workload outgrew CAPACITY")
        if max(recoveries) >= RECOVERY_LIMIT:
            problems.append(f"recovery took {max(recoveries):.2f}s")
        writes = [op for op in history.ops if op["type"] == "write"]
        outcomes = {o: sum(op["outcome"] == o for op in writes) for o in ("ok", "fail", "unknown")}
        print(
            f"kill loop: kills={len(recoveries)} writes={outcomes} "
            f"max recovery={max(recoveries):.2f}s"
        )
        if problems:
            dumped = history.dump(tmp_path / "history.jsonl")
            pytest.fail(
                f"seed {SEED}: {len(problems)} problems, history in {dumped}:\n"
                + "\n".join(problems[:20])
            )
        assert outcomes["ok"] > 0 and len(recoveries) >= 2
    finally:
        stop.set()
        up.set()
        node.kill()


def _check_final_state(node: RealNode, data_dir: str, history: History) -> list[str]:
    problems = []
    if staged_files(data_dir):
        problems.append(f"staging not wiped: {staged_files(data_dir)}")
    writes = {op["key"]: op for op in history.ops if op["type"] == "write"}
    stored = _stored_keys(data_dir)
    for key in set(stored) - set(writes):
        problems.append(f"a key nobody wrote is stored: {key}")
    for key, op in writes.items():
        template = CAS if op["route"] == "cas" else GRADLE
        status, _, body = call(node, "GET", template.format(key))
        whole = status == 200 and hashlib.sha256(body).hexdigest() == op["sha256"]
        if op["outcome"] == "ok" and not whole:
            problems.append(f"acknowledged write lost or damaged ({status}, {len(body)}): {op}")
        elif op["outcome"] == "fail" and status != 404:
            problems.append(f"a refused write is visible ({status}): {op}")
        elif op["outcome"] == "unknown" and status != 404 and not whole:
            problems.append(f"an unacknowledged write is half there ({status}): {op}")
    on_disk = {os.path.relpath(path, data_dir) for path in blob_files(data_dir)}
    referenced = {blob for _, _, blob in stored.values() if blob}
    if on_disk != referenced:
        problems.append(
            f"blob files and manifests differ: orphans={sorted(on_disk - referenced)[:5]} "
            f"missing={sorted(referenced - on_disk)[:5]}"
        )
    return problems


# -- A4: the durable-publish order, as the kernel sees it ----------------------------------

_SYSCALL = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*)$")
_PATH_ARG = re.compile(r'"([^"]*)"')
_FD_PATH = re.compile(r"^\d+<([^>]*)>")


def _events(lines: list[str]) -> list[tuple[int, str, str]]:
    """``(index, syscall, args)`` for every syscall start in an ``strace -f`` log."""
    found = []
    for index, line in enumerate(lines):
        match = _SYSCALL.match(line)
        if match and not line.startswith("<...", len(match["pid"]) + 1):
            found.append((index, match["name"], match["args"]))
    return found


def _first(events: list[tuple[int, str, str]], after: int, predicate: Any, what: str) -> int:
    for index, name, args in events:
        if index > after and predicate(name, args):
            return index
    raise AssertionError(f"no {what} after line {after}")


def _paths(events: list[tuple[int, str, str]], index: int) -> list[str]:
    """The quoted path arguments of the syscall that starts at log line ``index``."""
    (args,) = [a for i, _, a in events if i == index]
    return _PATH_ARG.findall(args)


def _fd_path(args: str) -> str:
    match = _FD_PATH.match(args)
    return match[1] if match else ""


def test_publish_order_is_fsync_rename_dirsync_metadata_then_ack(tmp_path: Path) -> None:
    """strace of one PUT shows fsync(staged) < rename < fsync(dirs) < WAL sync < the 2xx send."""
    data_dir = str(tmp_path / "data")
    node = RealNode(data_dir).start()
    try:
        trace = str(tmp_path / "publish.strace")
        syscalls = (
            "openat,mkdir,mkdirat,fsync,fdatasync,rename,renameat,renameat2,"
            "sendto,sendmsg,write,writev"
        )
        with Strace(node.process.pid, trace, syscalls, ("-y",)) as strace:
            # The node's first write also creates its blob shard directory.
            assert call(node, "PUT", GRADLE.format("ordered"), os.urandom(200_000))[0] == 201
        events = _events(strace.lines())
    finally:
        node.kill()
    uploads = os.path.join(data_dir, "tmp", "uploads") + "/"
    blobs = os.path.join(data_dir, "blobs")

    created = _first(
        events, -1, lambda n, a: n == "openat" and uploads in a and "O_CREAT" in a, "staging open"
    )
    staged = _paths(events, created)[0]
    synced = _first(
        events,
        created,
        lambda n, a: n in ("fsync", "fdatasync") and _fd_path(a) == staged,
        "fsync of the staged file",
    )
    renamed = _first(
        events, synced, lambda n, a: n.startswith("rename") and staged in a, "rename into blobs/"
    )
    target = _paths(events, renamed)[1]
    shard = os.path.dirname(target)
    dir_synced = _first(
        events,
        renamed,
        lambda n, a: n == "fsync" and _fd_path(a) == shard,
        "fsync of the shard directory",
    )
    wal_synced = _first(
        events,
        dir_synced,
        lambda n, a: n in ("fsync", "fdatasync") and _fd_path(a).endswith("kura.sqlite3-wal"),
        "metadata (WAL) sync",
    )
    acked = _first(
        events,
        wal_synced,
        lambda n, a: n in ("sendto", "sendmsg", "write", "writev") and "HTTP/1.1 201" in a,
        "the 201 on the socket",
    )
    # A shard directory made for this write must itself be durable before the commit.
    made = [i for i, n, a in events if n.startswith("mkdir") and shard in a]
    assert made, "the node's first write did not create its shard directory"
    blobs_synced = _first(
        events,
        made[0],
        lambda n, a: n == "fsync" and _fd_path(a) == blobs,
        "fsync of blobs/ after creating the shard",
    )
    assert blobs_synced < wal_synced
    assert created < synced < renamed < dir_synced < wal_synced < acked


def test_small_publish_order_is_one_metadata_commit_then_ack(tmp_path: Path) -> None:
    """strace of a small PUT: its bytes written to the WAL < WAL sync < the 2xx send.

    No file at all: a body received in memory is stored in the metadata
    database by the transaction that records its manifest, so one WAL sync
    makes the bytes and the manifest durable together.
    """
    data_dir = str(tmp_path / "data")
    node = RealNode(data_dir).start()
    marker = "kura-small-body:"
    try:
        trace = str(tmp_path / "small.strace")
        syscalls = (
            "openat,fsync,fdatasync,rename,renameat,renameat2,"
            "pwrite64,pwritev,sendto,sendmsg,write,writev"
        )
        # Whole WAL pages in the log (-s), to find the body's bytes in them.
        with Strace(node.process.pid, trace, syscalls, ("-y", "-s", "8192")) as strace:
            body = marker.encode() * 256  # 4 KiB: received in memory
            assert call(node, "PUT", GRADLE.format("small"), body)[0] == 201
        events = _events(strace.lines())
    finally:
        node.kill()
    uploads = os.path.join(data_dir, "tmp", "uploads") + "/"
    blobs = os.path.join(data_dir, "blobs") + "/"
    assert not [a for _, n, a in events if n == "openat" and "O_CREAT" in a and uploads in a]
    assert not [a for _, n, a in events if n == "openat" and "O_CREAT" in a and blobs in a]
    assert not [a for _, n, a in events if n.startswith("rename") and blobs in a]
    assert not [a for _, n, a in events if n.startswith("fsync") and blobs in _fd_path(a)]

    def to_wal(name: str, args: str) -> bool:
        return _fd_path(args).endswith("kura.sqlite3-wal")

    written = _first(
        events,
        -1,
        lambda n, a: n in ("pwrite64", "pwritev", "write") and to_wal(n, a) and marker in a,
        "the body written to the WAL",
    )
    wal_synced = _first(
        events,
        written,
        lambda n, a: n in ("fsync", "fdatasync") and to_wal(n, a),
        "metadata (WAL) sync",
    )
    acked = _first(
        events,
        wal_synced,
        lambda n, a: n in ("sendto", "sendmsg", "write", "writev") and "HTTP/1.1 201" in a,
        "the 201 on the socket",
    )
    assert written < wal_synced < acked


# -- A5: junk in the data directory at start-up ----------------------------------------------


def test_junk_in_the_data_dir_is_survived_and_never_served(tmp_path: Path) -> None:
    """Stray staging and blob files, damaged bodies, lost+found: the node starts, serves none."""
    data_dir = str(tmp_path / "data")
    node = RealNode(data_dir, **FILES).start()
    bodies = {key: os.urandom(4096) for key in ("empty", "short", "grown", "intact")}
    for key, body in bodies.items():
        assert call(node, "PUT", GRADLE.format(key), body)[0] == 201
    assert node.stop() == 0
    paths = {
        key: os.path.join(data_dir, blob) for key, (_, _, blob) in _stored_keys(data_dir).items()
    }
    # Bodies that no longer match their manifests.
    open(paths["empty"], "wb").close()
    os.truncate(paths["short"], 100)
    with open(paths["grown"], "ab") as handle:
        handle.write(b"appended")
    # Files and directories kura never wrote.
    junk = {
        "tmp/uploads/stray-upload": b"partial",
        "blobs/stray-file": b"j",
        "blobs/ab/not-an-artifact-name": b"j",
        "blobs/cd/" + "cd" * 32 + "-000000000000": b"unreferenced",
    }
    kept = {"lost+found/#1234": b"fsck", "blobs/lost+found/#77": b"fsck"}
    for relative, content in {**junk, **kept}.items():
        os.makedirs(os.path.dirname(os.path.join(data_dir, relative)), exist_ok=True)
        with open(os.path.join(data_dir, relative), "wb") as handle:
            handle.write(content)
        # Left by an earlier process: older than the next start (kura/storage/sweep.py).
        os.utime(os.path.join(data_dir, relative), (1_000_000, 1_000_000))

    node.start()
    try:
        node.wait_until_swept()  # orphans go in the background, after /up
        assert staged_files(data_dir) == []
        for relative in junk:
            assert not os.path.exists(os.path.join(data_dir, relative)), relative
        for relative in kept:
            assert os.path.exists(os.path.join(data_dir, relative)), relative
        # Accelerated path first, then HTTP/1.0 (always twisted.web) for the same key.
        for key in ("empty", "short", "grown"):
            assert call(node, "GET", GRADLE.format(key))[0] == 404, key
            client = RawClient(node.port)
            client.send(f"GET {GRADLE.format(key)} HTTP/1.0\r\n\r\n".encode(), heads=[False])
            assert client.read_responses(1)[0].status == 404
            client.close()
        assert call(node, "GET", GRADLE.format("intact"))[2] == bodies["intact"]
        assert metric(node, "kura_damaged_artifacts_total") == 3
        # The damaged keys can be written again, and then read whole.
        for key in ("empty", "short", "grown"):
            assert call(node, "PUT", GRADLE.format(key), bodies[key])[0] == 201
            assert call(node, "GET", GRADLE.format(key))[2] == bodies[key]
    finally:
        node.kill()

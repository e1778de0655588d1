"""Shared tools of the fault-injection suite: real nodes, metrics, strace, mounts.

Everything here drives real ``twistd kura`` processes (:class:`kura.testing.RealNode`)
over loopback and observes them from outside: HTTP, ``/metrics``, ``/proc``
(through psutil), ``strace`` and the node's own log file. Waiting is always
a bounded poll of an observable condition, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.real import RealNode

MiB = 1024 * 1024
CAS = "/api/cache/cas/{}?tenant_id=default"
GRADLE = "/api/cache/gradle/{}?tenant_id=default"


def call(
    node: RealNode,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; returns status, lower-cased headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy (bounded); return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"condition never became true: {what} ({result!r})"
        time.sleep(0.02)


def metrics(node: RealNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the node's ``/metrics``, keyed by ``(name, sorted labels)``."""
    status, _, body = call(node, "GET", "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(node: RealNode, name: str, **labels: str) -> float:
    """One sample of the node's metrics (0.0 when absent)."""
    return metrics(node).get((name, tuple(sorted(labels.items()))), 0.0)


def metric_sum(node: RealNode, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value
        for (sample, sample_labels), value in metrics(node).items()
        if sample == name and wanted <= set(sample_labels)
    )


def process(node: RealNode) -> psutil.Process:
    """The node's server process (``twistd --nodaemon`` serves in the spawned pid)."""
    return psutil.Process(node.process.pid)


def cpu_seconds(node: RealNode) -> float:
    """User plus system CPU time the node has used so far."""
    times = process(node).cpu_times()
    return float(times.user + times.system)


def node_log(node: RealNode) -> str:
    """The node's whole log file (stdout and stderr)."""
    with open(node.log_path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def assert_alive(node: RealNode) -> None:
    """The node process is still running and answers ``/up`` (invariant I5)."""
    assert node.process.poll() is None, f"node died: {node.log_tail()}"
    assert call(node, "GET", "/up", timeout=5)[0] == 200


def control_round_trip(node: RealNode) -> float:
    """A control PUT and GET on a fresh key (invariant I1); returns the seconds taken."""
    body = os.urandom(1024)
    key = f"control-{uuid.uuid4().hex}"
    started = time.monotonic()
    assert call(node, "PUT", GRADLE.format(key), body, timeout=5)[0] == 201
    status, _, got = call(node, "GET", GRADLE.format(key), timeout=5)
    assert (status, got) == (200, body)
    return time.monotonic() - started


def staged_files(data_dir: str) -> list[str]:
    """Files left in the node's upload staging area."""
    uploads = os.path.join(data_dir, "tmp", "uploads")
    return sorted(os.listdir(uploads)) if os.path.isdir(uploads) else []


def blob_files(data_dir: str) -> list[str]:
    """Every file under ``blobs/``, relative to it."""
    found = []
    for directory, _, names in os.walk(os.path.join(data_dir, "blobs")):
        found += [os.path.join(directory, name) for name in names]
    return sorted(found)


class Strace:
    """``strace -f`` attached to a running process, writing to ``output``.

    Attaching to a live pid (rather than starting the node under strace)
    keeps start-up untraced; ``-f`` with ``-p`` traces every thread.
    """

    def __init__(self, pid: int, output: str, syscalls: str, extra: tuple[str, ...] = ()) -> None:
        self.pid = pid
        self.output = output
        self.syscalls = syscalls
        self.extra = extra
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Strace:
        if shutil.which("strace") is None:
            pytest.skip("SKIPPED LOUDLY: strace is not installed")
        threads = [str(t.id) for t in psutil.Process(self.pid).threads()]
        args = ["strace", "-f", "-qq", "-s", "128", "-e", f"trace={self.syscalls}"]
        args += [*self.extra, "-o", self.output]
        for tid in threads:
            args += ["-p", tid]
        proc = self._proc = subprocess.Popen(args, stderr=subprocess.PIPE)

        def attached() -> bool:
            if proc.poll() is not None:
                error = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.skip(f"SKIPPED LOUDLY: strace cannot attach here: {error.strip()}")
            # Attached once the kernel reports a tracer on every thread.
            return all(_traced(self.pid, int(tid)) for tid in threads)

        wait_for(attached, timeout=10, what="strace attached")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)
        self._proc.wait(10)

    def lines(self) -> list[str]:
        with open(self.output, encoding="latin-1") as handle:
            return handle.read().splitlines()


def _traced(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as handle:
            for line in handle:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1]) != 0
    except FileNotFoundError:
        return True  # the thread is gone: nothing left to attach to
    return False


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[str]:
    """A tmpfs of ``size`` mounted on ``path`` for the duration (root only).

    Raises:
        MountUnavailable: mounting is not possible here (not root, no tmpfs).
    """
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise MountUnavailable(f"mount -t tmpfs on {path} failed: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


class MountUnavailable(RuntimeError):
    """A filesystem the scenario needs cannot be mounted on this machine."""


def fill(path: str, leave: int = 0) -> int:
    """Write a filler file at ``path`` until its filesystem has ``leave`` bytes free.

    Returns the bytes written.
    """
    written = 0
    block = b"\0" * (256 * 1024)
    with open(path, "wb") as handle:
        while True:
            free = shutil.disk_usage(os.path.dirname(path)).free
            if free <= leave:
                break
            chunk = block[: min(len(block), max(4096, free - leave))]
            try:
                handle.write(chunk)
                handle.flush()
            except OSError:
                break
            written += len(chunk)
    return written


def fd_count(node: RealNode) -> int:
    """Open descriptors of the node process."""
    return int(process(node).num_fds())


def held_fds(node: RealNode) -> int:
    """Open descriptors beyond the small-artifact files the accelerator keeps open.

    Those are a bounded cache, not a leak (``kura_accelerator_cached_descriptors``).
    """
    count = fd_count(node)  # first: the metrics request below opens a connection
    return count - int(metric(node, "kura_accelerator_cached_descriptors"))


def warm_up(node: RealNode, concurrency: int = 16) -> None:
    """Start every storage thread of the node (each opens its own SQLite reader).

    Descriptor baselines are taken after this, so a thread that starts later
    is not mistaken for a leak.
    """
    threads = [
        threading.Thread(target=call, args=(node, "GET", GRADLE.format(f"warm-{i}")))
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def verified(node: RealNode, target: str, timeout: float = 10.0) -> None:
    """Have ``node`` verify the artifact at ``target`` and remember it (HEAD until it does).

    A body is hashed against its digest before it is first served, and the
    check is remembered only once the file has been unchanged for
    ``kura.storage.verify.RACY_SECONDS`` (its stamp could hide a change made
    in the same timestamp tick): until then every read hashes it again. A
    test that measures what a read costs takes its baseline after this.
    """
    before = metric(node, "kura_verified_files")
    wait_for(
        lambda: (
            call(node, "HEAD", target)[0] == 200 and metric(node, "kura_verified_files") > before
        ),
        timeout=timeout,
        what=f"{target} verified and remembered",
    )

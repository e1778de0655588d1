"""The reactor thread never waits for fsync, commits or file I/O: the runner does them."""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
from twisted.python.threadpool import ThreadPool

from kura.storage.metadata import MetadataStore
from kura.storage.runner import ThreadPoolRunner
from kura.testing import ControlledRunner, Exchange, failed, request, succeeded
from kura.web.download import SMALL_BODY_BYTES

#: Blocking calls that must only ever run inside the storage runner.
OS_CALLS = ["fsync", "fdatasync", "rename", "replace", "pread", "write", "copy_file_range"]
METADATA_CALLS = ["open", "commit", "get_manifest", "get_inline", "get_upload", "outbox_depth"]
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


class Watch:
    """Records every watched call and whether it ran inside the runner."""

    def __init__(self, runner: ControlledRunner) -> None:
        self.runner = runner
        self.calls: list[str] = []
        self.outside: list[str] = []

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def watched(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.runner.inside == 0 and not _small_read(name, args):
                self.outside.append(name)
            return original(*args, **kwargs)

        return watched


def _small_read(name: str, args: tuple[Any, ...]) -> bool:
    """A read of a small body, which the fallback does on the reactor thread
    (kura.web.download.SmallFileBody: cheaper than a thread round trip)."""
    return name == "os.pread" and args[1] <= SMALL_BODY_BYTES


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    runner = ControlledRunner()
    watching = Watch(runner)
    for name in OS_CALLS:
        monkeypatch.setattr(os, name, watching.wrap(f"os.{name}", getattr(os, name)))
    for name in METADATA_CALLS:
        original = getattr(MetadataStore, name)
        monkeypatch.setattr(MetadataStore, name, watching.wrap(f"metadata.{name}", original))
    return watching


@pytest.mark.parametrize("environ", [{}, FILES], ids=["database", "files"])
def test_storage_work_never_runs_on_the_reactor_thread(
    nodes: Any, watch: Watch, environ: dict[str, str]
) -> None:
    """Every fsync, rename, body read/write and SQLite call of every route runs in the runner
    (but the one read of a small download body)."""
    node = nodes.start(
        runner=watch.runner,
        KURA_CAS_CAPACITY_BYTES="3000",
        KURA_ALLOW_ANONYMOUS_DELETE="true",
        **environ,
    )
    cas = "/api/cache/cas/{id}?tenant_id=default"
    for index in range(4):  # the fourth one evicts
        node.reactor.advance(1)
        assert request(node, "POST", cas.format(id=f"c{index}"), b"x" * 1000).status == 204
    node.store.bodies.clear()  # bodies kept in the database are read back from SQLite
    assert request(node, "GET", cas.format(id="c3")).status == 200
    assert request(node, "GET", cas.format(id="c3"), headers={"Range": "bytes=1-2"}).status == 206
    kv = b'{"cas_id":"k","entries":[{"value":"v"}]}'
    assert request(node, "PUT", "/api/cache/keyvalue?tenant_id=default", kv).status == 204
    node.store.bodies.clear()
    assert request(node, "GET", "/api/cache/keyvalue/k?tenant_id=default").status == 200
    query = "tenant_id=default&hash=h&name=n"
    upload_id = request(node, "POST", f"/api/cache/module/start?{query}").json()["upload_id"]
    part = f"/api/cache/module/part?upload_id={upload_id}&part_number=1"
    assert request(node, "POST", part, b"part").status == 204
    done = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts":[1]}',
        {"Content-Type": "application/json"},
    )
    assert done.status == 204
    chunked = Exchange(node)
    chunked.send(
        b"PUT /api/metro/cache/m HTTP/1.1\r\nHost: kura\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    assert chunked.responses()[0].status == 200
    assert request(node, "GET", "/api/metro/cache/m").body == b"abc"  # a file, in both layouts
    assert request(node, "DELETE", "/api/cache/clean?tenant_id=default").status == 204
    nodes.stop(node)
    assert watch.outside == []
    for expected in (
        "os.fsync",
        "os.rename",
        "os.pread",
        "os.write",
        "metadata.commit",
        "metadata.get_inline",
    ):
        assert expected in watch.calls, expected
    assert "ArtifactStore._place" in watch.runner.calls
    assert "_Writer.seal" in watch.runner.calls
    assert "MetadataStore.commit" in watch.runner.calls


def test_a_download_body_too_large_to_read_at_once_is_read_in_the_runner(
    nodes: Any, watch: Watch
) -> None:
    node = nodes.start(runner=watch.runner)
    large = b"l" * (SMALL_BODY_BYTES + 1)
    gradle = "/api/cache/gradle/g?tenant_id=default"
    assert request(node, "PUT", gradle, large).status < 300
    assert request(node, "GET", gradle).body == large
    nodes.stop(node)
    assert watch.outside == []
    assert "pread" in watch.runner.calls


class ThreadHop:
    """A reactor stand-in whose ``callFromThread`` queues calls for the test thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Any, tuple[Any, ...], dict[str, Any]]] = queue.Queue()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.put((f, args, kwargs))

    def deliver(self) -> None:
        f, args, kwargs = self.calls.get(timeout=10)
        f(*args, **kwargs)


def test_production_runner_uses_its_own_pool_threads() -> None:
    """ThreadPoolRunner runs work on its bounded pool and reports back via callFromThread."""
    hop = ThreadHop()
    pool = ThreadPool(minthreads=1, maxthreads=2, name="kura-storage-test")
    pool.start()
    try:
        runner = ThreadPoolRunner(hop, pool)  # type: ignore[arg-type]
        ran_on = runner.run(lambda: threading.current_thread().name)
        failing = runner.run(os.fsync, 987654)  # not an open descriptor: EBADF
        hop.deliver()
        hop.deliver()
    finally:
        pool.stop()
    assert "kura-storage-test" in succeeded(ran_on)
    assert isinstance(failed(failing), OSError)

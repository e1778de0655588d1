"""Capacity: least-recently-used artifacts are evicted; downloads in progress finish."""

from __future__ import annotations

import os
from typing import Any

import pytest

from kura.service import KuraNode
from kura.testing import ControlledRunner, Exchange, files_under, request, sample
from tests.support.stored import stored_bodies

SIZE = 1000
GRADLE = "/api/cache/gradle/{key}?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


def put(node: KuraNode, key: str, size: int = SIZE) -> int:
    node.reactor.advance(1)  # every step at a distinct time, so recency is unambiguous
    return request(node, "PUT", GRADLE.format(key=key), (key.encode() * size)[:size]).status


def present(node: KuraNode, key: str) -> bool:
    node.reactor.advance(1)
    return request(node, "HEAD", GRADLE.format(key=key)).status == 200


@pytest.mark.parametrize("environ", [{}, FILES], ids=["database", "files"])
def test_least_recently_written_artifact_is_evicted(nodes: Any, environ: dict[str, str]) -> None:
    """With room for three artifacts, a fourth evicts the oldest one, body and all."""
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(3 * SIZE), **environ)
    for key in ("aa", "bb", "cc", "dd"):
        assert put(node, key) == 201
    assert request(node, "GET", GRADLE.format(key="aa")).status == 404
    for key in ("bb", "cc", "dd"):
        assert request(node, "GET", GRADLE.format(key=key)).status == 200
    assert node.store.metadata.used_bytes == 3 * SIZE
    stored = stored_bodies(node.config.data_dir)
    assert stored == ((3, 0) if environ else (0, 3))
    assert sample(node, "kura_evicted_artifacts_total", producer="gradle") == 1
    assert sample(node, "kura_evicted_bytes_total") == SIZE
    assert sample(node, "kura_cas_used_bytes") == 3 * SIZE


def test_a_read_makes_an_artifact_recent(nodes: Any) -> None:
    """Reading the oldest artifact protects it: the next-oldest is evicted instead."""
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(3 * SIZE))
    for key in ("aa", "bb", "cc"):
        put(node, key)
    node.reactor.advance(1)
    assert request(node, "GET", GRADLE.format(key="aa")).status == 200
    put(node, "dd")
    node.reactor.advance(1)
    assert request(node, "GET", GRADLE.format(key="bb")).status == 404
    for key in ("aa", "cc", "dd"):
        assert request(node, "GET", GRADLE.format(key=key)).status == 200, key


def test_read_recency_survives_a_restart(nodes: Any) -> None:
    """Access times are persisted, so LRU order holds across restarts."""
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(3 * SIZE))
    for key in ("aa", "bb", "cc"):
        put(node, key)
    node.reactor.advance(1)
    request(node, "GET", GRADLE.format(key="aa"))
    reopened = nodes.restart(node, KURA_CAS_CAPACITY_BYTES=str(3 * SIZE))
    reopened.reactor.advance(node.reactor.seconds() + 10)
    put(reopened, "dd")
    assert request(reopened, "GET", GRADLE.format(key="bb")).status == 404
    assert request(reopened, "GET", GRADLE.format(key="aa")).status == 200


def test_eviction_frees_as_many_as_needed(nodes: Any) -> None:
    """A big artifact evicts several small ones, oldest first, and only as many as needed."""
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(4 * SIZE))
    for key in ("aa", "bb", "cc", "dd"):
        put(node, key)
    assert put(node, "big", 2 * SIZE + 1) == 201
    assert not present(node, "aa")
    assert not present(node, "bb")
    assert not present(node, "cc")
    assert present(node, "dd")
    assert present(node, "big")
    assert sample(node, "kura_evicted_artifacts_total", producer="gradle") == 3


def test_key_value_entries_are_not_evicted(nodes: Any) -> None:
    """Inline key-value entries do not count against the blob capacity."""
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(SIZE))
    body = b'{"cas_id":"k","entries":[{"value":"v"}]}'
    request(node, "PUT", "/api/cache/keyvalue?tenant_id=default", body)
    put(node, "aa")
    put(node, "bb")
    assert request(node, "GET", "/api/cache/keyvalue/k?tenant_id=default").status == 200


def test_artifact_larger_than_the_capacity_is_refused(nodes: Any) -> None:
    """An artifact that can never fit is refused (507), evicting nothing."""
    node = nodes.start(KURA_CAS_CAPACITY_BYTES=str(3 * SIZE))
    put(node, "aa")
    assert put(node, "huge", 3 * SIZE + 1) == 507
    assert present(node, "aa")
    assert files_under(node.store.layout.uploads) == []
    assert node.store.tmp_budget.used == 0


def test_an_open_download_of_an_evicted_artifact_completes(nodes: Any) -> None:
    """Eviction unlinks the file, but a transfer already reading it sends every byte."""
    runner = ControlledRunner()
    size = 600 * 1024  # more than one fallback read chunk
    node = nodes.start(runner=runner, KURA_CAS_CAPACITY_BYTES=str(3 * size))
    for key in ("aa", "bb", "cc"):
        put(node, key, size)
    expected = b"aa" * (size // 2)
    runner.hold = lambda f: f is os.pread
    download = Exchange(node)
    download.send(f"GET {GRADLE.format(key='aa')} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    runner.release()  # the first chunk goes out
    assert download.transport.value().startswith(b"HTTP/1.1 200 ")
    assert len(runner.held) == 1
    for key in ("dd", "ee", "ff"):  # each evicts the oldest; "aa" (read first) goes last
        assert put(node, key, size) == 201
    assert sample(node, "kura_evicted_artifacts_total", producer="gradle") == 3
    assert len(files_under(node.store.layout.blobs)) == 3
    while runner.held:
        runner.release()
    (response,) = download.responses()
    assert response.status == 200
    assert response.body == expected
    assert (
        sample(node, "kura_artifact_egress_completions_total", producer="gradle", result="ok") == 1
    )
    runner.hold = lambda f: False
    assert request(node, "GET", GRADLE.format(key="aa")).status == 404

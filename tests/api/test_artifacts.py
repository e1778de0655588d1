"""The shared artifact steps (kura.api.artifacts) where the HTTP tests do not reach them alone."""

from __future__ import annotations

from kura.testing import ControlledRunner, Exchange, request, sample
from tests.conftest import Nodes

GRADLE = "/api/cache/gradle/g1?tenant_id=default&namespace_id=p"
CCACHE = "/ccache/" + "a" * 40


def _put(client: Exchange, target: str, body: bytes) -> None:
    head = f"PUT {target} HTTP/1.1\r\nHost: k\r\nContent-Length: {len(body)}\r\n\r\n"
    client.send(head.encode() + body)


def _race(nodes: Nodes, target: str) -> tuple[int, int, bytes]:
    """Two uploads of ``target`` admitted before either is stored; their statuses, what is kept."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    # Held at the metadata commit, which stores a small body with its manifest.
    runner.hold = lambda f: getattr(f, "__qualname__", "") == "MetadataStore.commit"
    first, second = Exchange(node), Exchange(node)
    _put(first, target, b"first")
    _put(second, target, b"second")
    # Both bodies received, neither published: the first's commit is held, the
    # second waits for the next commit.
    assert len(runner.held) == 1
    assert first.responses() == [] and second.responses() == []
    runner.hold = lambda f: False
    while runner.held:
        runner.release()
    (one,), (two,) = first.responses(), second.responses()
    assert sample(node, "kura_artifact_writes_total", producer=_producer(target), result="ok") == 2
    return one.status, two.status, request(node, "GET", target).body


def _producer(target: str) -> str:
    return "gradle" if target.startswith("/api/cache/gradle") else "ccache"


def test_a_write_once_upload_that_loses_the_race_is_answered_as_existing(nodes: Nodes) -> None:
    """Admitted before the first was stored, the second upload stores nothing and gets 200."""
    assert _race(nodes, GRADLE) == (201, 200, b"first")


def test_a_last_writer_wins_upload_replaces_what_was_stored(nodes: Nodes) -> None:
    """ccache (RouteSpec.overwrites) keeps the last upload; both are answered 200."""
    assert _race(nodes, CCACHE) == (200, 200, b"second")

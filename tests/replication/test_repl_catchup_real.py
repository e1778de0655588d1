"""Catch-up at scale between real ``twistd kura`` processes (marker ``realnode``).

A three-node mesh: a node killed in the middle of a catch-up resumes from its
durable watermarks (the walked counters show no second full walk), a node
down for a while gets everything once back and walks only what changed, and
readiness turns on only when the catch-up is done. Then a rolling upgrade:
this release catches up from the previous one and the other way round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.mesh import (
    HOSTS,
    MeshNode,
    metrics,
    request,
    shared_port,
    wait_for,
)
from tests.support.release import previous_release

pytestmark = pytest.mark.realnode

TENANT = "tenant_id=default"
#: Versions written a few seconds before a pass are below its watermark.
SKEW_MS = "2000"
#: Three manifest pages (256 each) per peer.
COUNT = 640
SIZE = 1024


def cas(n: int) -> str:
    return f"/api/cache/cas/item{n}?{TENANT}"


def body(n: int) -> bytes:
    return n.to_bytes(4, "big") * (SIZE // 4)


def nodes_of(
    root: Path,
    count: int,
    *,
    sources: list[str] | None = None,
    seeds: list[list[int]] | None = None,
    **environ: str,
) -> list[MeshNode]:
    """``count`` unstarted nodes; node ``i`` seeds ``seeds[i]`` (default: all others)."""
    hosts = list(HOSTS[:count])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]
    built = []
    for index, host in enumerate(hosts):
        chosen = seeds[index] if seeds else [i for i in range(count) if i != index]
        extra = {"source": sources[index]} if sources else {}
        built.append(
            MeshNode(
                str(root / f"node{index}"),
                host,
                port,
                KURA_PEERS=",".join(urls[i] for i in chosen),
                KURA_MAX_CLOCK_SKEW_MS=SKEW_MS,
                KURA_LOG_FORMAT="text",
                **extra,
                **environ,
            )
        )
    return built


def walked(node: MeshNode) -> float:
    samples = metrics(node)
    return sum(v for k, v in samples.items() if k.startswith("kura_bootstrap_walked_items_total"))


def ready_report(node: MeshNode) -> dict[str, object]:
    _, _, raw = request("GET", node.url + "/ready", timeout=5)
    report: dict[str, object] = json.loads(raw)
    return report


def holds_all(node: MeshNode, count: int = COUNT) -> bool:
    return all(request("GET", node.url + cas(n))[2] == body(n) for n in range(count))


def write(node: MeshNode, numbers: range) -> None:
    for n in numbers:
        assert request("POST", node.url + cas(n), body(n))[0] == 204


def test_a_killed_catch_up_resumes_and_a_returning_peer_walks_only_what_changed(
    tmp_path: Path,
) -> None:
    # A and B do not know C, so nothing reaches C through their outboxes:
    # everything C holds, it caught up.
    a, b, c = nodes_of(
        tmp_path,
        3,
        seeds=[[1], [0], [0, 1]],
        KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND="40000",
    )
    try:
        a.start()
        b.start()
        write(a, range(COUNT))
        wait_for("B to hold every write", lambda: holds_all(b), timeout=120)
        # C joins late: one pass of COUNT manifests per peer, paced.
        c.start()
        wait_for("C to walk a page", lambda: walked(c) >= 256, timeout=60)
        report = ready_report(c)
        assert not report["ready"]
        reasons = [str(r) for r in report["reasons"]]  # type: ignore[attr-defined]
        assert any(r.startswith("bootstrap in progress: peer ") for r in reasons), reasons
        first = walked(c)
        assert first < 2 * COUNT
        c.kill()
        c.start()
        assert not ready_report(c)["ready"]
        wait_for("C ready", lambda: ready_report(c)["ready"], timeout=120)
        # Ready means caught up: every artifact is here the moment /ready is 200.
        assert holds_all(c)
        second = walked(c)
        # No second full walk: only what the killed process had not resolved.
        assert 0 < second <= 2 * COUNT - first, (first, second)

        # C is down for a while; A and B take new writes.
        c.stop()
        write(a, range(COUNT, COUNT + 20))
        write(b, range(COUNT + 20, COUNT + 40))
        wait_for("A and B to exchange them", lambda: holds_all(a, COUNT + 40), timeout=60)
        c.start()
        wait_for("C ready again", lambda: ready_report(c)["ready"], timeout=120)
        assert holds_all(c, COUNT + 40)
        # Each peer's pass only listed what changed since its watermark.
        assert 20 <= walked(c) <= 2 * 40, walked(c)
    finally:
        for node in (a, b, c):
            node.stop()


@pytest.mark.parametrize("old_side", ["serving", "joining"])
def test_rolling_upgrade_catch_up_between_releases(tmp_path: Path, old_side: str) -> None:
    """This release catches up from the previous one, and the previous one from this one."""
    old = previous_release(str(tmp_path))
    new = str(Path(__file__).resolve().parents[2])
    sources = [old, new] if old_side == "serving" else [new, old]
    a, c = nodes_of(tmp_path, 2, sources=sources)
    count = 300
    try:
        a.start()
        write(a, range(count))
        c.start()
        wait_for("the joiner ready", lambda: ready_report(c)["ready"], timeout=120)
        assert holds_all(c, count)
        if old_side == "serving":
            # The previous release answered id-ordered pages: the fallback walked them.
            samples = metrics(c)
            assert samples['kura_bootstrap_walked_items_total{order="id"}'] == count
            with open(c.log_path, encoding="utf-8", errors="replace") as handle:
                assert "artifact-id order (an earlier release)" in handle.read()
        assert os.path.exists(os.path.join(c.data_dir, "kura.sqlite3"))
    finally:
        for node in (a, c):
            node.stop()

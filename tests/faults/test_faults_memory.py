"""Memory pressure: a node inside a 256 MiB memory cgroup under load.

The node is started inside a cgroup v1 memory group (the kernel enforces the
limit; page cache from the downloads counts against it too). It must derive
its watermarks from that limit, serve six parallel download loops of a 4 MiB
artifact plus concurrent uploads with no 5xx, and never be OOM-killed.
Skipped, loudly, where the memory controller cannot be written.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.support import MiB, assert_alive, call, metric, process
from tests.support.real import RealNode

pytestmark = pytest.mark.faults

MEMORY_CONTROLLER = "/sys/fs/cgroup/memory"
LIMIT = 256 * MiB
#: Starts the node in the group: the shell joins it, then execs twistd.
JOIN_AND_EXEC = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
#: 2 x 32 x 4 MiB of uploads: their page cache alone pushes the group to its
#: limit, so the kernel has to reclaim while the node serves.
UPLOADS_PER_WORKER = 32


@pytest.fixture
def memory_group() -> Iterator[Path]:
    """A fresh cgroup v1 memory group limited to :data:`LIMIT`, removed afterwards."""
    group = Path(MEMORY_CONTROLLER) / f"kura-test-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(LIMIT))
    except OSError as error:
        pytest.skip(f"SKIPPED LOUDLY: no writable cgroup v1 memory controller: {error}")
    yield group
    # Its processes are gone by now (the node fixture stopped them).
    group.rmdir()


@pytest.fixture
def node_in_group(memory_group: Path, tmp_path: Path) -> Iterator[RealNode]:
    node = RealNode(str(tmp_path / "data"), launcher=["sh", "-c", JOIN_AND_EXEC, str(memory_group)])
    node.start()
    yield node
    node.kill()


def oom_kills(group: Path) -> int:
    """OOM kills in the group (``oom_kill`` of ``memory.oom_control``)."""
    fields = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return int(fields.get("oom_kill", 0))


def test_node_derives_its_watermarks_from_the_cgroup_limit(
    node_in_group: RealNode, memory_group: Path
) -> None:
    assert str(node_in_group.process.pid) in (memory_group / "cgroup.procs").read_text().split()
    assert metric(node_in_group, "kura_memory_soft_limit_bytes") == LIMIT * 70 // 100
    # 85 % of 256 MiB would sit closer than 64 MiB to the soft watermark.
    assert metric(node_in_group, "kura_memory_hard_limit_bytes") == LIMIT * 70 // 100 + 64 * MiB
    assert metric(node_in_group, "kura_memory_pressure_state") == 0


def test_downloads_and_uploads_under_a_256_mib_limit_never_5xx_or_oom(
    node_in_group: RealNode, memory_group: Path
) -> None:
    node = node_in_group
    artifact = os.urandom(4 * MiB)
    digest = hashlib.sha256(artifact).hexdigest()
    target = f"/api/cache/cas/{digest}?tenant_id=default"
    assert call(node, "POST", target, artifact)[0] == 204
    pid = node.process.pid

    def download_loop() -> list[int]:
        statuses = []
        for _ in range(40):
            status, _, body = call(node, "GET", target)
            statuses.append(status)
            assert status != 200 or hashlib.sha256(body).hexdigest() == digest
        return statuses

    def upload_loop(worker: int) -> list[int]:
        statuses = []
        for index in range(UPLOADS_PER_WORKER):
            body = os.urandom(4 * MiB)
            key = f"mem-{worker}-{index}-{uuid.uuid4().hex}"
            statuses.append(
                call(node, "PUT", f"/api/cache/gradle/{key}?tenant_id=default", body)[0]
            )
        return statuses

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        downloads = [pool.submit(download_loop) for _ in range(6)]
        uploads = [pool.submit(upload_loop, worker) for worker in range(2)]
        statuses = [s for f in downloads + uploads for s in f.result()]

    assert len(statuses) == 6 * 40 + 2 * UPLOADS_PER_WORKER
    # Shedding would be a retryable 503/429; none is expected at this load.
    assert set(statuses) <= {200, 201}, sorted(set(statuses))
    assert oom_kills(memory_group) == 0
    # The limit was really reached (and enforced by reclaim, not by a kill).
    assert int((memory_group / "memory.failcnt").read_text()) > 0
    assert node.process.pid == pid
    assert_alive(node)
    resident = process(node).memory_info().rss
    assert resident < LIMIT * 70 // 100, f"resident {resident} bytes under load"
    assert metric(node, "kura_memory_pressure_state") == 0

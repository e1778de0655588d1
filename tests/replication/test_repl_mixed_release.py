"""A mesh of this release and the previous one (stores without digests, a wire without them).

The previous release itself runs beside this one (:mod:`tests.support.release`).
Both directions must keep working during a rolling upgrade: replicated writes
(signed, where the digest travels in the signed ``X-Kura-Content-Sha256``; and
unsigned, where only this release declares it and a previous-release sender
declares nothing) and catch-up (manifest pages and bodies: this release adds
an optional ``digest`` to each page item, which the previous release ignores).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from tests.support.corruption import default_artifact_id
from tests.support.mesh import HOSTS, MeshNode, metrics, request, shared_port, wait_for
from tests.support.release import previous_release

pytestmark = pytest.mark.realnode

GRADLE = "/api/cache/gradle/{}?tenant_id=default"
UNSIGNED = {"KURA_PEER_SECRET": "", "KURA_INTERNAL_INSECURE": "true"}


def has(node: MeshNode, key: str, body: bytes) -> bool:
    status, _, answer = request("GET", node.url + GRADLE.format(key))
    return status == 200 and answer == body


def stored_digest(node: MeshNode, key: str) -> str | None:
    """The digest stored with ``key`` (in a file or, small, in the database)."""
    database = sqlite3.connect(f"file:{node.data_dir}/kura.sqlite3?mode=ro", uri=True)
    try:
        row = database.execute(
            "SELECT digest FROM manifests WHERE artifact_id = ?", (default_artifact_id(key),)
        ).fetchone()
    finally:
        database.close()
    assert row is not None, f"{key} is not stored in {node.data_dir}"
    return row[0]


@pytest.mark.parametrize("environ", [{}, UNSIGNED], ids=["signed", "unsigned"])
def test_the_previous_release_and_this_one_replicate_and_catch_up_both_ways(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    """Old A and new B replicate to each other; a new node catches up from the old one and
    an old node from the new one; every body arrives intact and is stored with its digest
    on this release's nodes."""
    old_source = previous_release(str(tmp_path))
    hosts = list(HOSTS[:4])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]
    a = MeshNode(f"{tmp_path}/a", hosts[0], port, old_source, KURA_PEERS=urls[1], **environ)
    b = MeshNode(f"{tmp_path}/b", hosts[1], port, KURA_PEERS=urls[0], **environ)
    late_new = MeshNode(f"{tmp_path}/c", hosts[2], port, KURA_PEERS=urls[0], **environ)
    late_old = MeshNode(f"{tmp_path}/d", hosts[3], port, old_source, KURA_PEERS=urls[1], **environ)
    running: list[MeshNode] = []
    try:
        for node in (a, b):
            node.start()
            running.append(node)
        from_old, from_new = os.urandom(300_000), os.urandom(3000)
        assert request("PUT", a.url + GRADLE.format("from-old"), from_old)[0] == 201
        assert request("PUT", b.url + GRADLE.format("from-new"), from_new)[0] == 201
        wait_for("old -> new", lambda: has(b, "from-old", from_old), 30)
        wait_for("new -> old", lambda: has(a, "from-new", from_new), 30)
        assert stored_digest(b, "from-old") == hashlib.sha256(from_old).hexdigest()
        rejected = 'kura_replication_rejected_total{reason="digest_mismatch"}'
        assert metrics(b).get(rejected, 0) == 0

        # Catch-up: a new node from the old one, an old node from the new one.
        for node in (late_new, late_old):
            node.start()
            running.append(node)
        for node in (late_new, late_old):
            wait_for(f"{node.url} caught up", lambda n=node: has(n, "from-old", from_old), 60)
            wait_for(f"{node.url} caught up", lambda n=node: has(n, "from-new", from_new), 60)
        assert stored_digest(late_new, "from-old") == hashlib.sha256(from_old).hexdigest()
        assert stored_digest(late_new, "from-new") == hashlib.sha256(from_new).hexdigest()
        assert metrics(late_new).get(rejected, 0) == 0
    finally:
        for node in reversed(running):
            node.stop()

"""Corrupted bytes are never served nor replicated: real nodes, a byte flipped on disk.

Each test flips one byte of a stored blob in place (``open r+b``, one write,
as a stray process or a bad disk would) and watches what real ``twistd
kura`` processes do with it over loopback: on both serving paths (the
accelerator's sendfile/splice and twisted.web), to peers (outbox and
catch-up), and in the background scrub, which fetches the artifact again
from a peer that has an intact copy. A small body kept in the metadata
database (``key_values``) is changed there instead, while its node is down
(a running node answers from the copy it holds in memory, known good).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from tests.support.corruption import flip_byte, stored_blob
from tests.support.mesh import (
    HOSTS,
    MeshNode,
    get_json,
    metrics,
    request,
    shared_port,
    start_all,
    wait_for,
)
from tests.support.real import RealNode
from tests.support.release import previous_release

pytestmark = pytest.mark.realnode

GRADLE = "/api/cache/gradle/{}?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}


def blob_of(node: RealNode, key: str) -> str:
    return stored_blob(node.data_dir, key)[0]


def flip_byte_in_database(node: RealNode, key: str, offset: int) -> None:
    """Invert one byte of ``key``'s body kept in ``node``'s metadata database
    (a gradle artifact of the default namespace; the node is stopped)."""
    database = sqlite3.connect(f"{node.data_dir}/kura.sqlite3")
    try:
        with database:
            ((artifact_id, value),) = database.execute(
                "SELECT artifact_id, value FROM manifests JOIN key_values USING (artifact_id) "
                "WHERE producer = 'gradle' AND key = ? AND NOT inline AND blob_path IS NULL",
                (key,),
            ).fetchall()
            changed = bytearray(value)
            changed[offset] ^= 0xFF
            database.execute(
                "UPDATE key_values SET value = ? WHERE artifact_id = ?",
                (bytes(changed), artifact_id),
            )
    finally:
        database.close()


def sample(node: RealNode, name: str) -> float:
    return metrics(node).get(name, 0.0)


def verified(node: RealNode, key: str) -> None:
    """HEAD until the node has verified ``key`` and remembers it (past the racy second)."""
    before = sample(node, "kura_verified_files")
    wait_for(
        f"{key} verified",
        lambda: (
            request("HEAD", node.url + GRADLE.format(key))[0] == 200
            and sample(node, "kura_verified_files") > before
        ),
        timeout=10,
    )


@pytest.mark.parametrize("accelerated", [True, False], ids=["accelerator", "twisted.web"])
def test_a_flipped_byte_is_never_served(tmp_path: Path, accelerated: bool) -> None:
    """GET, ranged GET and HEAD of a changed blob all miss, on both serving paths, whether
    the file was served (and remembered as verified, its descriptor cached) before or not."""
    node = RealNode(
        str(tmp_path / "data"),
        KURA_ACCELERATED_FILE_SERVING_ENABLED="true" if accelerated else "false",
        KURA_SCRUB_BYTES_PER_SECOND="0",
        **FILES,
    ).start()
    try:
        bodies = {f"{kind}-{size}": os.urandom(size) for kind in "grh" for size in (4096, 300_000)}
        bodies["cold"] = os.urandom(4096)  # never read before it is damaged
        for key, body in bodies.items():
            assert request("PUT", node.url + GRADLE.format(key), body)[0] == 201
        for key, body in bodies.items():
            if key != "cold":
                verified(node, key)
                assert request("GET", node.url + GRADLE.format(key))[2] == body
        served = sample(node, 'kura_artifact_serving_paths_total{path="splice"}')
        assert (served > 0) == accelerated
        for key in bodies:
            flip_byte(blob_of(node, key), offset=1000)
        for key in bodies:
            url = node.url + GRADLE.format(key)
            if key.startswith("r-"):
                answer = request("GET", url, headers={"Range": "bytes=0-99"})
            elif key.startswith("h-"):
                answer = request("HEAD", url)
            else:
                answer = request("GET", url)
            assert answer[0] == 404, (key, answer[0])
        assert sample(node, "kura_corrupt_artifacts_total") == len(bodies)
        assert sample(node, 'kura_artifact_serving_paths_total{path="splice"}') == served
        for key in bodies:
            assert request("GET", node.url + GRADLE.format(key))[0] == 404
    finally:
        node.stop()


@pytest.mark.parametrize("accelerated", [True, False], ids=["accelerator", "twisted.web"])
def test_a_flipped_byte_in_a_database_body_is_never_served(
    tmp_path: Path, accelerated: bool
) -> None:
    """GET, ranged GET and HEAD of a small body changed in the metadata database all miss,
    on both serving paths, once the node no longer holds the intact copy it served."""
    node = RealNode(
        str(tmp_path / "data"),
        KURA_ACCELERATED_FILE_SERVING_ENABLED="true" if accelerated else "false",
        KURA_SCRUB_BYTES_PER_SECOND="0",
    ).start()
    try:
        bodies = {kind: os.urandom(4096) for kind in "grh"}
        for key, body in bodies.items():
            assert request("PUT", node.url + GRADLE.format(key), body)[0] == 201
            assert request("GET", node.url + GRADLE.format(key))[2] == body
        node.stop()
        for key in bodies:
            flip_byte_in_database(node, key, offset=1000)
        node.start()
        for key in bodies:
            url = node.url + GRADLE.format(key)
            if key == "r":
                answer = request("GET", url, headers={"Range": "bytes=0-99"})
            elif key == "h":
                answer = request("HEAD", url)
            else:
                answer = request("GET", url)
            assert answer[0] == 404, (key, answer[0])
        assert sample(node, "kura_corrupt_artifacts_total") == len(bodies)
        for key in bodies:
            assert request("GET", node.url + GRADLE.format(key))[0] == 404
    finally:
        node.stop()


@pytest.mark.parametrize("in_database", [False, True], ids=["file", "database"])
def test_a_corrupted_blob_is_neither_replicated_nor_handed_out_in_a_catch_up(
    tmp_path: Path, in_database: bool
) -> None:
    """A's copy rots while its peer is down: A's outbox does not send it, and B's catch-up
    from A does not get it; the intact artifact next to it arrives both ways."""
    hosts = list(HOSTS[:2])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]
    a = MeshNode(
        f"{tmp_path}/a", hosts[0], port, KURA_PEERS=urls[1], **({} if in_database else FILES)
    )
    b = MeshNode(f"{tmp_path}/b", hosts[1], port, KURA_PEERS=urls[0])
    a.start()
    try:
        good, bad = os.urandom(50_000), os.urandom(50_000)
        assert request("PUT", a.url + GRADLE.format("good"), good)[0] == 201
        assert request("PUT", a.url + GRADLE.format("bad"), bad)[0] == 201
        if in_database:
            a.stop()  # (a running node holds the intact bytes in memory)
            flip_byte_in_database(a, "bad", offset=25_000)
            a.start()
        else:
            flip_byte(blob_of(a, "bad"), offset=25_000)
        b.start()
        wait_for("good on B", lambda: request("GET", b.url + GRADLE.format("good"))[2] == good, 60)
        wait_for("A's outbox drained", lambda: _outbox(a) == 0, 60)
        assert request("GET", b.url + GRADLE.format("bad"))[0] == 404
        assert request("GET", a.url + GRADLE.format("bad"))[0] == 404
        assert sample(a, "kura_corrupt_artifacts_total") == 1
        assert sample(b, 'kura_replication_rejected_total{reason="digest_mismatch"}') == 0
    finally:
        b.stop()
        a.stop()


def _outbox(node: RealNode) -> int:
    return int(get_json(node.url + "/status/rollout")["outbox_messages"])


def test_the_scrub_finds_rot_and_fetches_the_artifact_again_from_a_peer(tmp_path: Path) -> None:
    """B's copy rots where no read sees it; B's scrub finds it, forgets it, and gets the
    intact bytes again from A."""
    hosts = list(HOSTS[:2])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]
    scrub = {"KURA_SCRUB_BYTES_PER_SECOND": "0"}
    a = MeshNode(f"{tmp_path}/a", hosts[0], port, KURA_PEERS=urls[1], **scrub)
    b = MeshNode(
        f"{tmp_path}/b",
        hosts[1],
        port,
        KURA_PEERS=urls[0],
        KURA_SCRUB_BYTES_PER_SECOND=str(64 * 1024 * 1024),
        KURA_SCRUB_INTERVAL_MS="200",
    )
    start_all([a, b])
    try:
        body = os.urandom(3_000_000)
        assert request("PUT", a.url + GRADLE.format("g1"), body)[0] == 201
        wait_for("g1 on B", lambda: request("GET", b.url + GRADLE.format("g1"))[2] == body, 60)
        flip_byte(blob_of(b, "g1"), offset=2_999_999)
        wait_for(
            "B's repair",
            lambda: sample(b, 'kura_artifact_repairs_total{result="fetched"}') == 1,
            60,
        )
        assert sample(b, 'kura_scrub_damaged_artifacts_total{reason="corrupt"}') == 1
        assert sample(b, "kura_scrub_checked_artifacts_total") >= 1
        assert request("GET", b.url + GRADLE.format("g1"))[2] == body
        assert sample(a, "kura_corrupt_artifacts_total") == 0
    finally:
        b.stop()
        a.stop()


def test_after_an_upgrade_the_scrub_fills_in_the_missing_digests(tmp_path: Path) -> None:
    """A store written by the previous release has no digests: served as before, filled in
    by the scrub, and from then on a changed byte is caught like on any other artifact."""
    data_dir = str(tmp_path / "data")
    old = RealNode(data_dir, source=previous_release(str(tmp_path))).start()
    bodies = {f"old{n}": os.urandom(1000 + 200_000 * n) for n in range(3)}
    try:
        for key, body in bodies.items():
            assert request("PUT", old.url + GRADLE.format(key), body)[0] == 201
    finally:
        old.stop()
    new = RealNode(
        data_dir, KURA_SCRUB_BYTES_PER_SECOND=str(64 * 1024 * 1024), KURA_SCRUB_INTERVAL_MS="200"
    ).start()
    try:
        wait_for(
            "digests filled in",
            lambda: sample(new, "kura_scrub_filled_digests_total") == len(bodies),
            30,
        )
        for key, body in bodies.items():
            assert stored_blob(new.data_dir, key)[1] == hashlib.sha256(body).hexdigest()
            assert request("GET", new.url + GRADLE.format(key))[2] == body
        flip_byte(blob_of(new, "old2"), offset=100)
        assert request("GET", new.url + GRADLE.format("old2"))[0] == 404
    finally:
        new.stop()

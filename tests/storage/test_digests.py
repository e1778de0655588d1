"""A digest per artifact, computed as its body arrives and stored with its manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.domain.errors import DigestMismatch
from kura.domain.failpoints import Failpoints
from kura.service import KuraNode
from kura.storage import store as store_module
from kura.storage.metadata import WritePolicy
from kura.storage.staging import StagingFile, TmpBudget
from kura.testing import ControlledRunner, failed, files_under, request, succeeded
from tests.conftest import Nodes
from tests.support.stored import stored_bodies

TENANT = "tenant_id=default"
GRADLE = f"/api/cache/gradle/{{key}}?{TENANT}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(node: KuraNode, producer: Producer, key: str, namespace: str = "") -> Any:
    address = ArtifactAddress(producer, namespace, key)
    return node.store.metadata.get_manifest(node.store.artifact_id(address))


def test_a_staged_body_is_hashed_as_its_chunks_are_written(tmp_path: Path) -> None:
    """The digest comes from the writes themselves: no call reads the staged file back."""
    runner = ControlledRunner()
    staging = StagingFile(
        path=str(tmp_path / "body"),
        runner=runner,
        budget=TmpBudget(1 << 30),
        failpoints=Failpoints(),
        limit=1 << 30,
    )
    chunks = [os.urandom(200_000) for _ in range(6)]
    for chunk in chunks:
        staging.write(chunk)
    staged = succeeded(Deferred.fromCoroutine(staging.finish()))
    assert staged.sha256 == sha(b"".join(chunks))
    assert set(runner.calls) == {"_Writer.append", "_Writer.seal"}
    assert runner.calls.count("_Writer.append") >= 2  # hashed chunk by chunk


def test_a_multipart_part_is_not_hashed(tmp_path: Path) -> None:
    """A part is staged without a digest: its upload's assembled body is hashed instead."""
    staging = StagingFile(
        path=str(tmp_path / "part"),
        runner=ControlledRunner(),
        budget=TmpBudget(1 << 30),
        failpoints=Failpoints(),
        limit=1 << 30,
        hashed=False,
    )
    staging.write(b"part")
    assert succeeded(Deferred.fromCoroutine(staging.finish())).sha256 is None


@pytest.mark.parametrize(
    ("size", "environ"),
    [
        (4096, {}),  # received in memory, stored in the database
        (300_000, {}),  # staged
        (4096, {"KURA_MEMORY_BODY_MAX_BYTES": "0"}),  # small, staged anyway
    ],
    ids=["memory", "staged", "small-staged"],
)
def test_every_uploaded_body_is_stored_with_its_digest(
    nodes: Nodes, size: int, environ: dict[str, str]
) -> None:
    """Gradle PUTs on both ingest paths store the SHA-256 of the body beside it."""
    node = nodes.start(**environ)
    body = os.urandom(size)
    assert request(node, "PUT", GRADLE.format(key="g"), body).status == 201
    assert stored(node, Producer.GRADLE, "g").digest == sha(body)


def test_a_multipart_upload_stores_the_digest_of_its_assembled_body(node: KuraNode) -> None:
    """Parts are hashed once, as they are assembled, in the order the completion lists."""
    start = request(node, "POST", f"/api/cache/module/start?{TENANT}&hash=h1&name=App")
    upload_id = start.json()["upload_id"]
    parts = {1: os.urandom(70_000), 2: b"second", 3: os.urandom(2_000_000)}
    for number, data in parts.items():
        target = f"/api/cache/module/part?upload_id={upload_id}&part_number={number}"
        assert request(node, "POST", target, data).status == 204
    completed = request(
        node,
        "POST",
        f"/api/cache/module/complete?upload_id={upload_id}",
        b'{"parts":[3,1,2]}',
        {"Content-Type": "application/json"},
    )
    assert completed.status == 204
    manifest = stored(node, Producer.MODULE, "builds/h1/App")
    assert manifest.digest == sha(parts[3] + parts[1] + parts[2])
    assert request(node, "GET", f"/api/cache/module/x?{TENANT}&hash=h1&name=App").body == (
        parts[3] + parts[1] + parts[2]
    )


def test_a_keyvalue_entry_is_stored_with_the_digest_of_its_value(node: KuraNode) -> None:
    """Inline entries carry the digest of the value kept in the metadata store."""
    entry = json.dumps({"cas_id": "c1", "entries": [{"value": "v"}]}).encode()
    assert request(node, "PUT", f"/api/cache/keyvalue?{TENANT}", entry).status == 204
    manifest = stored(node, Producer.XCODE, "action_cache/c1")
    value = node.store.metadata.get_inline(manifest.artifact_id)
    assert manifest.inline and manifest.digest == sha(value)


def test_small_bodies_are_hashed_on_a_storage_thread(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body received in memory is hashed inside the runner call of the transaction that
    stores it, not on the reactor."""
    runner = ControlledRunner()
    node = nodes.start(runner=runner)
    body = os.urandom(60_000)
    hashed: list[tuple[int, str]] = []  # (runner calls running, the innermost one)
    real = hashlib.sha256

    class Watched:
        @staticmethod
        def sha256(data: bytes = b"") -> Any:
            if data == body:
                hashed.append((runner.inside, runner.calls[-1] if runner.calls else ""))
            return real(data)

    monkeypatch.setattr(store_module, "hashlib", Watched)
    assert request(node, "PUT", GRADLE.format(key="g"), body).status == 201
    assert hashed == [(1, "MetadataStore.commit")]
    assert stored(node, Producer.GRADLE, "g").digest == sha(body)


@pytest.mark.parametrize("size", [10, 300_000], ids=["memory", "staged"])
def test_a_body_that_does_not_match_its_expected_digest_stores_nothing(
    node: KuraNode, size: int
) -> None:
    """publish_blob refuses the body, removes its file and gives its staging budget back."""
    store = node.store
    body = os.urandom(size)
    staging = store.stage(limit=1 << 30, expected_length=size)
    staging.write(body)
    staged = succeeded(Deferred.fromCoroutine(staging.finish()))
    address = ArtifactAddress(Producer.GRADLE, "", "g")
    publish = store.publish_blob(
        address,
        staged,
        content_type="application/octet-stream",
        policy=WritePolicy.LAST_WRITER_WINS,
        expected_digest=sha(b"something else"),
    )
    assert isinstance(failed(Deferred.fromCoroutine(publish)), DigestMismatch)
    assert files_under(store.layout.blobs) == []
    assert files_under(store.layout.uploads) == []
    assert store.tmp_budget.used == 0
    assert stored(node, Producer.GRADLE, "g") is None


def test_a_bazel_cas_body_must_hash_to_its_key_on_both_ingest_paths(node: KuraNode) -> None:
    """The content-addressed check is the store's: 400, nothing stored, small or staged."""
    for body in (b"small", os.urandom(300_000)):
        wrong = sha(body + b"!")
        response = request(node, "PUT", f"/bazel/cas/{wrong}", body)
        assert response.status == 400
        assert response.json() == {"message": "Body does not match its SHA-256 digest"}
        right = request(node, "PUT", f"/bazel/cas/{sha(body)}", body)
        assert right.status in (200, 201, 204)
    # The small body in the database, the staged one in a file; no refused body kept.
    assert stored_bodies(node.config.data_dir) == (1, 1)
    assert node.store.tmp_budget.used == 0


def test_fill_digest_only_fills_the_version_stored_without_one(node: KuraNode) -> None:
    """The scrub's upgrade path never overwrites a digest, nor touches another version."""
    request(node, "PUT", GRADLE.format(key="g"), b"body")
    manifest = stored(node, Producer.GRADLE, "g")
    metadata = node.store.metadata

    def fill(version: int, digest: str) -> bool:
        return bool(
            metadata.commit(
                [lambda conn: metadata.fill_digest(conn, manifest.artifact_id, version, digest)]
            )[0]
        )

    assert not fill(manifest.version_ms, "0" * 64)  # it has one
    metadata.commit(
        [
            lambda conn: conn.execute(
                "UPDATE manifests SET digest = NULL WHERE artifact_id = ?", (manifest.artifact_id,)
            )
        ]
    )
    assert not fill(manifest.version_ms + 1, sha(b"body"))  # not this version
    assert fill(manifest.version_ms, sha(b"body"))
    assert stored(node, Producer.GRADLE, "g").digest == sha(b"body")


def test_the_scrub_walks_blobs_in_files_and_in_the_database_in_id_order(node: KuraNode) -> None:
    """blobs_page skips inline (key-value) entries, not the blobs kept in the database;
    it pages by artifact id."""
    request(node, "PUT", GRADLE.format(key="a"), b"a" * 70_000)  # over the in-memory limit: a file
    for key in ("b", "c"):
        request(node, "PUT", GRADLE.format(key=key), key.encode())  # in the database
    entry = json.dumps({"cas_id": "c1", "entries": [{"value": "v"}]}).encode()
    request(node, "PUT", f"/api/cache/keyvalue?{TENANT}", entry)
    first = node.store.metadata.blobs_page(None, 2)
    rest = node.store.metadata.blobs_page(first[-1].artifact_id, 2)
    ids = [m.artifact_id for m in first + rest]
    assert len(ids) == 3 and ids == sorted(ids)
    assert {m.key for m in first + rest} == {"a", "b", "c"}
    assert not any(m.inline for m in first + rest)
    assert sorted(m.in_database for m in first + rest) == [False, True, True]

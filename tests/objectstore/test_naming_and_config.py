"""The bucket layout's codecs and the tier's configuration (pure functions)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kura.config import ConfigError, KuraConfig
from kura.config.objectstore import parse_store_url
from kura.domain.artifacts import Manifest
from kura.objectstore import naming

DIGEST = "ab" * 32


@given(
    namespace=st.text(min_size=0, max_size=40),
    version=st.integers(min_value=0, max_value=10**14),
    written=st.integers(min_value=0, max_value=10**14),
    artifact=st.one_of(st.none(), st.just("c0ffee" * 10)),
)
def test_a_tombstone_key_reads_back_as_written(
    namespace: str, version: int, written: int, artifact: str | None
) -> None:
    """Any namespace (slashes, empty, non-ASCII) survives the key, under its prefix only."""
    tombstone = naming.Tombstone(written, version, namespace, artifact)
    key = naming.tombstone_key("p/q", tombstone)
    assert naming.parse_tombstone_key("p/q", key) == tombstone
    assert naming.parse_tombstone_key("other", key) is None
    assert key > naming.written_floor("p/q", written - 1)


def test_namespaces_never_share_a_prefix() -> None:
    """The empty namespace and one named like an encoding get distinct prefixes."""
    prefixes = {naming.namespace_prefix("", ns) for ns in ("", "a", "a/b", "a%2Fb", "_")}
    assert len(prefixes) == 5
    assert naming.artifact_key("", "", "id") == "ns/_/id"


def test_manifest_metadata_round_trip() -> None:
    """What an object's metadata says is what the manifest said."""
    manifest = Manifest(
        artifact_id="id",
        producer="gradle",
        namespace_id="ns",
        key="a key/with slash",
        content_type="application/json; charset=utf-8",
        inline=True,
        blob_path=None,
        size=3,
        version_ms=1234,
        created_at_ms=1,
        digest=DIGEST,
    )
    stored = naming.parse_metadata(naming.manifest_metadata(manifest))
    assert stored == naming.StoredObject(
        1234, DIGEST, "gradle", manifest.key, manifest.content_type, True
    )
    assert all(value.isascii() for value in naming.manifest_metadata(manifest).values())


@pytest.mark.parametrize(
    "metadata", [{}, {naming.DIGEST: "zz", naming.VERSION: "1"}, {naming.DIGEST: DIGEST}]
)
def test_foreign_metadata_is_refused(metadata: dict[str, str]) -> None:
    """An object kura did not write (fields missing or malformed) is not read as an artifact."""
    with pytest.raises(ValueError):
        naming.parse_metadata(metadata)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://kura-cache", ("kura-cache", "")),
        ("s3://kura-cache/", ("kura-cache", "")),
        ("s3://kura.cache/team/a/", ("kura.cache", "team/a")),
    ],
)
def test_store_urls(url: str, expected: tuple[str, str]) -> None:
    """A store URL is a bucket and a prefix without slashes at its ends."""
    assert parse_store_url(url) == expected


def test_the_tier_is_off_by_default_and_on_with_a_url() -> None:
    """No URL, no tier; a URL gives bucket and prefix, with the documented defaults."""
    assert not KuraConfig.from_environ(
        {}, measure_filesystem=lambda p: 1 << 40
    ).object_store.enabled
    config = KuraConfig.from_environ(
        {
            "KURA_OBJECT_STORE_URL": "s3://kura-cache/ci",
            "KURA_OBJECT_STORE_ENDPOINT": "http://minio:9000",
        },
        measure_filesystem=lambda p: 1 << 40,
    ).object_store
    assert (config.bucket, config.prefix, config.endpoint) == (
        "kura-cache",
        "ci",
        "http://minio:9000",
    )
    assert config.read_deadline_ms == 5000 and config.upload_queue_max == 100_000


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"KURA_OBJECT_STORE_URL": "gs://bucket"}, "KURA_OBJECT_STORE_URL must be s3://"),
        (
            {"KURA_OBJECT_STORE_URL": "s3://Bad_Bucket"},
            "KURA_OBJECT_STORE_URL names no valid bucket",
        ),
        ({"KURA_OBJECT_STORE_URL": "s3://key:secret@bucket"}, "without credentials"),
        (
            {"KURA_OBJECT_STORE_ENDPOINT": "minio:9000"},
            "KURA_OBJECT_STORE_ENDPOINT must be an http",
        ),
        ({"KURA_OBJECT_STORE_MULTIPART_THRESHOLD_BYTES": "1MiB"}, "must be at least 5242880"),
    ],
)
def test_bad_settings_name_their_variable(environ: dict[str, str], named: str) -> None:
    """Each bad setting is refused at start with a message naming its variable."""
    with pytest.raises(ConfigError, match=named):
        KuraConfig.from_environ(environ, measure_filesystem=lambda p: 1 << 40)

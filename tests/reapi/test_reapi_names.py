"""The REAPI names: instance ↔ namespace mapping, digests, ByteStream resource names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kura.domain.artifacts import is_valid_namespace
from kura.reapi.names import (
    EMPTY_SHA256,
    MAX_ENCODED_INSTANCE,
    BlobResource,
    Digest,
    InvalidName,
    instance_of,
    namespace_of,
    parse_resource,
)

HASH = "a" * 64


@pytest.mark.parametrize(
    ("instance", "namespace"),
    [
        ("", "reapi"),
        ("main", "reapi:main"),
        ("ci/linux-x86", "reapi:ci+linux-x86"),
        ("team a", "reapi:team=20a"),
        ("a+b=c", "reapi:a=2Bb=3Dc"),
        ("é", "reapi:=C3=A9"),
    ],
)
def test_documented_mapping(instance: str, namespace: str) -> None:
    assert namespace_of(instance) == namespace
    assert instance_of(namespace) == instance


@given(st.text(max_size=80))
def test_mapping_is_reversible_and_always_a_valid_namespace(instance: str) -> None:
    try:
        namespace = namespace_of(instance)
    except InvalidName:
        return
    assert is_valid_namespace(namespace)
    assert instance_of(namespace) == instance


def test_long_instance_names_are_refused() -> None:
    assert namespace_of("x" * MAX_ENCODED_INSTANCE) == "reapi:" + "x" * MAX_ENCODED_INSTANCE
    assert len(namespace_of("x" * MAX_ENCODED_INSTANCE)) == 255
    with pytest.raises(InvalidName):
        namespace_of("x" * (MAX_ENCODED_INSTANCE + 1))
    with pytest.raises(InvalidName):
        namespace_of("é" * 50)  # 300 characters encoded


@pytest.mark.parametrize("namespace", ["bazel-ac", "reapi:", "reapi:=FF", "other:x"])
def test_foreign_namespaces_are_not_instances(namespace: str) -> None:
    with pytest.raises(InvalidName):
        instance_of(namespace)


def test_digests() -> None:
    assert Digest.of(EMPTY_SHA256, 0).empty
    assert str(Digest.of(HASH, 3)) == f"{HASH}/3"
    for hash, size in [("A" * 64, 1), ("a" * 63, 1), (HASH, -1)]:
        with pytest.raises(InvalidName):
            Digest.of(hash, size)


@pytest.mark.parametrize(
    ("name", "write", "parsed"),
    [
        (f"blobs/{HASH}/5", False, BlobResource("", Digest(HASH, 5))),
        (f"ci/x/blobs/{HASH}/5", False, BlobResource("ci/x", Digest(HASH, 5))),
        (f"i/blobs/sha256/{HASH}/5", False, BlobResource("i", Digest(HASH, 5))),
        (
            f"i/compressed-blobs/zstd/{HASH}/5",
            False,
            BlobResource("i", Digest(HASH, 5), "zstd"),
        ),
        (
            f"uploads/u-1/blobs/{HASH}/5",
            True,
            BlobResource("", Digest(HASH, 5), None, "u-1"),
        ),
        (
            f"a/b/uploads/u/compressed-blobs/zstd/{HASH}/5/some/metadata",
            True,
            BlobResource("a/b", Digest(HASH, 5), "zstd", "u"),
        ),
    ],
)
def test_resource_names(name: str, write: bool, parsed: BlobResource) -> None:
    assert parse_resource(name, write=write) == parsed


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("", False),
        (f"i/blobs/{HASH}", False),
        (f"i/blobs/{HASH}/x", False),
        (f"i/blobs/{HASH}/5/extra", False),
        (f"i/compressed-blobs/deflate/{HASH}/5", False),
        (f"i/blobs/{HASH}/5", True),
        (f"i/uploads/u/actions/{HASH}/5", True),
        (f"i/blobs/{'A' * 64}/5", False),
    ],
)
def test_bad_resource_names(name: str, write: bool) -> None:
    with pytest.raises(InvalidName):
        parse_resource(name, write=write)

"""How artifacts and tombstones are laid out in the bucket (pure functions).

Under the configured prefix:

``ns/<namespace>/<artifact id>``
    one object per artifact, its body as the object's body and its manifest
    in the object's user metadata (:func:`manifest_metadata`): the version
    (last writer wins across nodes), the content digest, producer, key,
    content type and whether it is a key-value entry. Grouping by namespace
    lets a clean find the objects it covers with one listing.
``tombstones/<written ms>/<kind>/<version ms>/<namespace>/<artifact id or ->``
    one empty object per clean or delete, everything in its key, so a
    follower learns every new tombstone from a listing alone. Keys sort by
    the time the tombstone was written (the writer's clock), so a listing
    that starts a little before the last one seen finds every newer one.

Namespaces are percent-encoded (``/`` included) behind a ``_``, so that
each, the empty one included, is one non-empty path segment.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

import attrs

from kura.domain.artifacts import Manifest

#: Metadata names (S3 stores them as ``x-amz-meta-<name>``, lowercased).
VERSION = "kura-version"
DIGEST = "kura-sha256"
PRODUCER = "kura-producer"
KEY = "kura-key"
CONTENT_TYPE = "kura-content-type"
INLINE = "kura-inline"

#: An empty body's SHA-256 (every tombstone object's).
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _join(prefix: str, *parts: str) -> str:
    return "/".join((prefix, *parts)) if prefix else "/".join(parts)


def _segment(namespace_id: str) -> str:
    return "_" + quote(namespace_id, safe="")


def namespace_prefix(prefix: str, namespace_id: str) -> str:
    """Where the objects of ``namespace_id`` live (ends with ``/``)."""
    return _join(prefix, "ns", _segment(namespace_id), "")


def artifact_key(prefix: str, namespace_id: str, artifact_id: str) -> str:
    return namespace_prefix(prefix, namespace_id) + artifact_id


def manifest_metadata(manifest: Manifest) -> dict[str, str]:
    """The object metadata that describes ``manifest`` (ASCII only, as S3 requires)."""
    assert manifest.digest is not None, "only digested bodies are uploaded"
    return {
        VERSION: str(manifest.version_ms),
        DIGEST: manifest.digest,
        PRODUCER: manifest.producer,
        KEY: quote(manifest.key, safe=""),
        CONTENT_TYPE: quote(manifest.content_type, safe="/;=+ "),
        INLINE: "1" if manifest.inline else "0",
    }


@attrs.frozen
class StoredObject:
    """What an artifact object's metadata says about it."""

    version_ms: int
    digest: str
    producer: str
    key: str
    content_type: str
    inline: bool


def parse_metadata(metadata: dict[str, str]) -> StoredObject:
    """Read an artifact object's metadata.

    Raises:
        ValueError: it is not an object kura wrote (a field missing or malformed).
    """
    try:
        digest = metadata[DIGEST].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"bad digest {digest!r}")
        return StoredObject(
            version_ms=int(metadata[VERSION]),
            digest=digest,
            producer=metadata[PRODUCER],
            key=unquote(metadata[KEY]),
            content_type=unquote(metadata[CONTENT_TYPE]),
            inline=metadata[INLINE] == "1",
        )
    except KeyError as missing:
        raise ValueError(f"object metadata lacks {missing}") from None


@attrs.frozen
class Tombstone:
    """A clean (``artifact_id`` ``None``) or one artifact's delete, as listed."""

    written_ms: int
    version_ms: int
    namespace_id: str
    artifact_id: str | None


def tombstones_prefix(prefix: str) -> str:
    return _join(prefix, "tombstones", "")


def written_floor(prefix: str, written_ms: int) -> str:
    """A key that sorts before every tombstone written at ``written_ms`` or later."""
    return tombstones_prefix(prefix) + f"{max(0, written_ms):015d}"


def tombstone_key(prefix: str, tombstone: Tombstone) -> str:
    kind = "namespace" if tombstone.artifact_id is None else "artifact"
    return tombstones_prefix(prefix) + "/".join(
        (
            f"{tombstone.written_ms:015d}",
            kind,
            str(tombstone.version_ms),
            _segment(tombstone.namespace_id),
            tombstone.artifact_id or "-",
        )
    )


def parse_tombstone_key(prefix: str, key: str) -> Tombstone | None:
    """The tombstone a listed key names; ``None`` for a key kura did not write."""
    rest = key.removeprefix(tombstones_prefix(prefix))
    parts = rest.split("/")
    if rest == key or len(parts) != 5 or parts[1] not in ("namespace", "artifact"):
        return None
    written, kind, version, namespace, artifact = parts
    if not (written.isdigit() and version.isdigit() and namespace.startswith("_")):
        return None
    return Tombstone(
        written_ms=int(written),
        version_ms=int(version),
        namespace_id=unquote(namespace[1:]),
        artifact_id=None if kind == "namespace" else artifact,
    )

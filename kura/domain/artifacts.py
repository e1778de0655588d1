"""Artifact identity and manifests: the domain vocabulary shared by every layer.

An artifact is addressed by ``(producer, namespace, key)``. Its id is the
lowercase hex SHA-256 of ``producer NUL node_tenant NUL namespace NUL key``
(the *node's* tenant, as upstream), and every on-disk name derives from that
id, so no request can ever name a path.
"""

from __future__ import annotations

import enum
import hashlib
import re

import attrs


class Producer(enum.StrEnum):
    """Which cache protocol wrote an artifact (also the metric label)."""

    XCODE = "xcode"
    GRADLE = "gradle"
    MODULE = "module"
    NX = "nx"
    METRO = "metro"
    BAZEL = "bazel"
    CCACHE = "ccache"
    SCCACHE = "sccache"
    TURBO = "turbo"
    #: REAPI v2 over gRPC (Bazel, Buck2): :mod:`kura.reapi`.
    REAPI = "reapi"


OCTET_STREAM = "application/octet-stream"
JSON = "application/json"

#: Keys are opaque to kura, but callers get a clear 400 for anything that
#: is not a plain token: no separators, no control bytes, bounded length.
MAX_KEY_LENGTH = 1024
_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~:@+=-]+")
_TOKEN_SEGMENT = re.compile(r"[A-Za-z0-9._~:@+=-]+")
_CONTENT_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+( *;[ -~]*)?")


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is acceptable as one artifact key segment."""
    return (
        0 < len(key) <= MAX_KEY_LENGTH
        and key not in (".", "..")
        and _KEY_PATTERN.fullmatch(key) is not None
    )


def is_valid_namespace(namespace: str) -> bool:
    """Whether ``namespace`` is acceptable (the empty, tenant-scoped one included)."""
    return namespace == "" or (
        len(namespace) <= 255
        and namespace not in (".", "..")
        and _TOKEN_SEGMENT.fullmatch(namespace) is not None
    )


_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(value: str) -> bool:
    """Whether ``value`` is a body digest as kura writes them (lowercase hex SHA-256)."""
    return _DIGEST.fullmatch(value) is not None


def safe_content_type(value: str | None) -> str:
    """Return ``value`` if it is a legal, harmless media type, else octet-stream.

    Stored content types are echoed into response heads, so anything with
    CR, LF, NUL or other control bytes must never reach the wire.
    """
    if value and len(value) <= 255 and _CONTENT_TYPE.fullmatch(value):
        return value
    return OCTET_STREAM


def artifact_id(producer: str, node_tenant: str, namespace: str, key: str) -> str:
    """The storage id of an artifact (see the module docstring)."""
    material = "\0".join((producer, node_tenant, namespace, key)).encode("utf-8")
    return hashlib.sha256(material).hexdigest()


@attrs.frozen
class ArtifactAddress:
    """What a request names: producer, namespace and key (tenant excluded)."""

    producer: Producer
    namespace: str
    key: str

    def artifact_id(self, node_tenant: str) -> str:
        return artifact_id(self.producer.value, node_tenant, self.namespace, self.key)


@attrs.frozen
class Manifest:
    """What the metadata store knows about one stored artifact.

    Attributes:
        artifact_id: see :func:`artifact_id`.
        inline: a key-value entry (never evicted; its body in the metadata
            store, like every body without a ``blob_path``).
        blob_path: the file (relative to the data dir) that holds the body;
            ``None`` when the body is in the metadata store
            (:attr:`in_database`: key-value entries, and since metadata
            schema 4 blobs small enough to be received in memory).
        version_ms: last-writer-wins version; replicas keep the sender's.
        digest: the lowercase hex SHA-256 of the body, computed as it was
            received (every artifact written since metadata schema 2);
            ``None`` for one written by an earlier release until the scrub
            (:mod:`kura.storage.scrub`) fills it in.
    """

    artifact_id: str
    producer: str
    namespace_id: str
    key: str
    content_type: str
    inline: bool
    blob_path: str | None
    size: int
    version_ms: int
    created_at_ms: int
    digest: str | None = None

    @property
    def in_database(self) -> bool:
        """The body is kept in the metadata store, not in a file."""
        return self.blob_path is None

    @property
    def etag(self) -> str:
        """The strong validator ``"VERSIONMS-SIZE"`` used by Range/If-Range."""
        return f'"{self.version_ms}-{self.size}"'

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Manifest:
        return cls(**data)  # type: ignore[arg-type]


@attrs.frozen
class Target:
    """What a request acts on, derived once (:func:`resolve_target`).

    The handler acts on exactly this and the extension hooks are shown
    exactly this, so they cannot disagree about tenant, namespace or key.

    Attributes:
        producer: the cache protocol, when the route has one.
        tenant: the tenant the request names (``default`` on protocols that
            carry none; ``None`` on routes that carry none at all).
        namespace: the namespace acted on (``""`` when tenant-scoped), or
            ``None`` when the request acts on no namespace.
        key: the storage key of the one artifact acted on, or ``None``.
        hash: the content hash the request names, when it names one.
    """

    producer: Producer | None = None
    tenant: str | None = None
    namespace: str | None = None
    key: str | None = None
    hash: str | None = None

    @property
    def address(self) -> ArtifactAddress | None:
        """The artifact acted on, when the request names one."""
        if self.producer is None or self.namespace is None or self.key is None:
            return None
        return ArtifactAddress(self.producer, self.namespace, self.key)

    @classmethod
    def of(cls, address: ArtifactAddress, tenant: str | None = None) -> Target:
        return cls(address.producer, tenant, address.namespace, address.key)


#: The target of requests that act on nothing (probes, unmatched paths).
NO_TARGET = Target()

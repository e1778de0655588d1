"""The peer protocol's paths, headers and message formats (both directions).

Everything a node sends to a peer or parses from one is defined here, so
the sender (outbox, catch-up, membership) and the receiver (internal plane)
cannot drift apart. Query values are percent-encoded except for RFC 3986
unreserved characters; parsing is strict and raises
:class:`~kura.domain.errors.BadRequest` with a message naming the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from kura.domain.artifacts import Manifest, Producer, is_digest, is_valid_namespace
from kura.domain.errors import BadRequest

STATUS_PATH = "/_internal/status"
REPLICATE_ARTIFACT_PATH = "/_internal/replicate/artifact"
REPLICATE_NAMESPACE_PATH = "/_internal/replicate/namespace"
TOMBSTONES_PATH = "/_internal/bootstrap/namespace_tombstones"
#: Deleted artifacts (``DELETE`` on :data:`REPLICATE_ARTIFACT_PATH` replicates
#: one); a release before them answers 404 on both.
ARTIFACT_TOMBSTONES_PATH = "/_internal/bootstrap/artifact_tombstones"
MANIFESTS_PATH = "/_internal/bootstrap/manifests"
ARTIFACTS_PATH = "/_internal/bootstrap/artifacts"

#: Every internal request names the tenant it belongs to; a node refuses
#: peer writes and catch-up reads for any other tenant (403), so a
#: misconfigured seed can never leak one tenant's artifacts into another.
TENANT_HEADER = b"X-Kura-Tenant-Id"
#: The version of the body served by the catch-up artifact route.
VERSION_HEADER = b"X-Kura-Version-Ms"

#: Catch-up page sizes: the default, and the most a peer will serve at once.
DEFAULT_PAGE_LIMIT = 256
MAX_PAGE_LIMIT = 2048
#: Versions and counters are SQLite integers: larger values cannot be stored.
MAX_INT64 = 2**63 - 1
#: Keys are opaque; anything printable up to this length is accepted.
MAX_REPLICATED_KEY_LENGTH = 4096

_ARTIFACT_ID = re.compile(r"[0-9a-f]{64}")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def encode_query(params: Sequence[tuple[str, str]]) -> str:
    """``a=1&b=2`` with everything but unreserved characters percent-encoded."""
    return "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in params)


def url(base: str, path: str, params: Sequence[tuple[str, str]] = ()) -> str:
    """``base`` + ``path`` (+ ``?query``) as a URL string."""
    query = encode_query(params)
    return f"{base.rstrip('/')}{path}" + (f"?{query}" if query else "")


def target_label(target: str) -> str:
    """The metric label of a peer URL: its host and port, scheme and path stripped."""
    parts = urlsplit(target)
    return parts.netloc or target


def is_artifact_id(value: str) -> bool:
    return _ARTIFACT_ID.fullmatch(value) is not None


class Params:
    """Strict access to decoded query parameters (each may be given once)."""

    def __init__(self, query: Mapping[str, list[str]]) -> None:
        self._query = query

    def optional(self, name: str) -> str | None:
        values = self._query.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise BadRequest(f"Ambiguous query parameter {name}: give it once")
        return values[0]

    def required(self, name: str) -> str:
        value = self.optional(name)
        if value is None:
            raise BadRequest(f"Missing {name}")
        return value

    def integer(self, name: str, *, minimum: int, default: int | None = None) -> int:
        text = self.optional(name) if default is not None else self.required(name)
        if text is None:
            assert default is not None
            return default
        if (
            not text.isascii()
            or not text.isdigit()
            or len(text) > 19
            or not minimum <= int(text) <= MAX_INT64
        ):
            raise BadRequest(f"Invalid {name}")
        return int(text)

    def boolean(self, name: str) -> bool:
        text = self.required(name)
        if text not in ("true", "false"):
            raise BadRequest(f"Invalid {name}: expected true or false")
        return text == "true"


def _namespace(params: Params) -> str:
    namespace = params.required("namespace_id")
    if not is_valid_namespace(namespace):
        raise BadRequest("Invalid namespace_id")
    return namespace


@attrs.frozen
class UpsertMessage:
    """``PUT /_internal/replicate/artifact``: one artifact version and its body."""

    producer: Producer
    namespace_id: str
    key: str
    content_type: str
    inline: bool
    version_ms: int

    def params(self) -> list[tuple[str, str]]:
        return [
            ("producer", self.producer.value),
            ("inline", "true" if self.inline else "false"),
            ("namespace_id", self.namespace_id),
            ("key", self.key),
            ("content_type", self.content_type),
            ("version_ms", str(self.version_ms)),
        ]

    @classmethod
    def from_manifest(cls, manifest: Manifest | PeerManifest) -> UpsertMessage:
        """The message that replicates ``manifest``'s version (local or a peer's)."""
        return cls(
            producer=Producer(manifest.producer),
            namespace_id=manifest.namespace_id,
            key=manifest.key,
            content_type=manifest.content_type,
            inline=manifest.inline,
            version_ms=manifest.version_ms,
        )

    @classmethod
    def parse(cls, query: Mapping[str, list[str]]) -> UpsertMessage:
        """Parse the receiver's query.

        Raises:
            BadRequest: a parameter is missing, repeated or invalid.
        """
        params = Params(query)
        try:
            producer = Producer(params.required("producer"))
        except ValueError:
            raise BadRequest("Invalid producer") from None
        key = params.required("key")
        if len(key) > MAX_REPLICATED_KEY_LENGTH or not _PRINTABLE.fullmatch(key):
            raise BadRequest("Invalid key")
        content_type = params.optional("content_type") or "application/octet-stream"
        return cls(
            producer=producer,
            namespace_id=_namespace(params),
            key=key,
            content_type=content_type,
            inline=params.boolean("inline"),
            version_ms=params.integer("version_ms", minimum=1),
        )


@attrs.frozen
class DeleteMessage:
    """``DELETE /_internal/replicate/namespace``: a namespace tombstone."""

    namespace_id: str
    version_ms: int

    def params(self) -> list[tuple[str, str]]:
        return [("namespace_id", self.namespace_id), ("version_ms", str(self.version_ms))]

    @classmethod
    def parse(cls, query: Mapping[str, list[str]]) -> DeleteMessage:
        params = Params(query)
        return cls(_namespace(params), params.integer("version_ms", minimum=1))


#: ``order=`` of a manifests page: newest version first (keyset cursor
#: ``<version_ms>:<artifact_id>``). A page answered in this order says so in
#: its ``order`` field; a node of an earlier release ignores the parameter and
#: answers an artifact-id-ordered page without the field.
ORDER_RECENT = "recent"


@attrs.frozen
class ArtifactDeleteMessage:
    """``DELETE /_internal/replicate/artifact``: one artifact's tombstone.

    The artifact is named by its id: every node of a mesh serves one tenant,
    so the sender's id is the receiver's (see :class:`UpsertMessage`).
    """

    artifact_id: str
    namespace_id: str
    version_ms: int

    def params(self) -> list[tuple[str, str]]:
        return [
            ("artifact_id", self.artifact_id),
            ("namespace_id", self.namespace_id),
            ("version_ms", str(self.version_ms)),
        ]

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def parse(cls, query: Mapping[str, list[str]]) -> ArtifactDeleteMessage:
        """Parse the receiver's query.

        Raises:
            BadRequest: a parameter is missing, repeated or invalid.
        """
        params = Params(query)
        artifact_id = params.required("artifact_id")
        if not is_artifact_id(artifact_id):
            raise BadRequest("Invalid artifact_id")
        return cls(artifact_id, _namespace(params), params.integer("version_ms", minimum=1))

    @classmethod
    def from_json(cls, data: Any) -> ArtifactDeleteMessage:
        """Parse one item of an artifact tombstone page.

        Raises:
            ValueError: a field is missing or invalid.
        """
        if not isinstance(data, dict):
            raise ValueError("artifact tombstone must be an object")
        artifact_id, namespace, version = (
            data.get(n) for n in ("artifact_id", "namespace_id", "version_ms")
        )
        if (
            not isinstance(artifact_id, str)
            or not is_artifact_id(artifact_id)
            or not isinstance(namespace, str)
            or not is_valid_namespace(namespace)
            or not isinstance(version, int)
            or isinstance(version, bool)
            or not 1 <= version <= MAX_INT64
        ):
            raise ValueError("artifact tombstone has no valid artifact_id, namespace_id or version")
        return cls(artifact_id, namespace, version)


@attrs.frozen
class PageRequest:
    """``limit``/``after`` of a catch-up page (``after`` is exclusive).

    Manifest pages also take ``order`` (absent: artifact-id order;
    :data:`ORDER_RECENT`: newest version first) and, in recency order,
    ``since`` (only versions strictly above it).
    """

    limit: int
    after: str | None
    order: str | None = None
    since: int | None = None

    @classmethod
    def parse(cls, query: Mapping[str, list[str]]) -> PageRequest:
        params = Params(query)
        limit = params.integer("limit", minimum=1, default=DEFAULT_PAGE_LIMIT)
        order = params.optional("order") or None
        if order not in (None, ORDER_RECENT):
            raise BadRequest("Invalid order: expected recent")
        since = None if params.optional("since") is None else params.integer("since", minimum=0)
        page = cls(min(limit, MAX_PAGE_LIMIT), params.optional("after") or None, order, since)
        if order == ORDER_RECENT:
            page.recent_cursor()  # refuse a malformed cursor before any work
        return page

    def params(self) -> list[tuple[str, str]]:
        base = [("limit", str(self.limit))]
        if self.order is not None:
            base.append(("order", self.order))
        if self.since is not None:
            base.append(("since", str(self.since)))
        return base if self.after is None else [*base, ("after", self.after)]

    def recent_cursor(self) -> tuple[int, str] | None:
        """``after`` of a recency page as ``(version_ms, artifact_id)``.

        Raises:
            BadRequest: ``after`` is not ``<version_ms>:<artifact_id>``.
        """
        if self.after is None:
            return None
        version, _, artifact_id = self.after.partition(":")
        if not (version.isascii() and version.isdigit() and len(version) <= 19):
            raise BadRequest("Invalid after")
        if not is_artifact_id(artifact_id):
            raise BadRequest("Invalid after")
        return int(version), artifact_id


def recent_cursor(version_ms: int, artifact_id: str) -> str:
    """The ``after`` that continues a recency walk below this manifest."""
    return f"{version_ms}:{artifact_id}"


@attrs.frozen
class PeerManifest:
    """A manifest as a peer describes it (its local file location left out).

    Attributes:
        digest: the body's SHA-256, when the peer knows it (absent from a
            previous release's pages, and for bodies stored without one).
    """

    artifact_id: str
    producer: str
    namespace_id: str
    key: str
    content_type: str
    inline: bool
    size: int
    version_ms: int
    digest: str | None = None

    @classmethod
    def of(cls, manifest: Manifest) -> PeerManifest:
        return cls(
            artifact_id=manifest.artifact_id,
            producer=manifest.producer,
            namespace_id=manifest.namespace_id,
            key=manifest.key,
            content_type=manifest.content_type,
            inline=manifest.inline,
            size=manifest.size,
            version_ms=manifest.version_ms,
            digest=manifest.digest,
        )

    def to_json(self) -> dict[str, object]:
        """The page item; ``digest`` only when known (a previous release ignores it)."""
        return attrs.asdict(self, filter=lambda field, value: value is not None)

    @classmethod
    def from_json(cls, data: Any) -> PeerManifest:
        """Parse one manifest of a page.

        Raises:
            ValueError: a field is missing or has the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError("manifest must be an object")
        fields = {
            "artifact_id": str,
            "producer": str,
            "namespace_id": str,
            "key": str,
            "content_type": str,
            "inline": bool,
            "size": int,
            "version_ms": int,
        }
        values: dict[str, Any] = {}
        for name, kind in fields.items():
            value = data.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"manifest field {name} is missing or invalid")
            values[name] = value
        if not is_artifact_id(values["artifact_id"]) or values["size"] < 0:
            raise ValueError("manifest has an invalid id or size")
        digest = data.get("digest")
        if digest is not None and not (isinstance(digest, str) and is_digest(digest)):
            raise ValueError("manifest field digest is invalid")
        return cls(**values, digest=digest)


def page_json(
    name: str, items: list[Any], limit: int, cursor: str | None, **extra: object
) -> dict[str, object]:
    """A page body: ``{name: items, "next_after": cursor, **extra}``.

    ``next_after`` is ``None`` on the last page (fewer items than asked for).
    ``extra`` fields are ignored by nodes that do not know them.
    """
    return {name: items, "next_after": cursor if len(items) >= limit else None, **extra}


@attrs.frozen
class PeerStatus:
    """What ``GET /_internal/status`` reports about a node."""

    tenant_id: str
    node_url: str
    region: str

    @classmethod
    def from_json(cls, data: Any) -> PeerStatus:
        if not isinstance(data, dict):
            raise ValueError("status must be an object")
        tenant, node_url, region = (data.get(n) for n in ("tenant_id", "node_url", "region"))
        if not (isinstance(tenant, str) and isinstance(node_url, str) and isinstance(region, str)):
            raise ValueError("status lacks tenant_id, node_url or region")
        return cls(tenant, node_url, region)


def normalize_url(value: str) -> str:
    """A base URL compared for identity: lower-case scheme and host, no slash."""
    parts = urlsplit(value.strip().rstrip("/"))
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"

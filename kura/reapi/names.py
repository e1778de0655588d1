"""REAPI names: instance names as namespaces, digests as keys, ByteStream resource names.

Every REAPI blob and action result is an ordinary artifact of producer
``reapi``; the namespace is the instance name, through one reversible
mapping (instance names may hold ``/`` and characters namespaces refuse):

* the empty instance name is the namespace ``reapi``;
* any other is ``reapi:`` followed by its UTF-8 bytes, where ``/`` becomes
  ``+``, the characters ``A-Z a-z 0-9 . _ -`` stay, and every other byte is
  ``=`` and two upper-case hex digits (``=2B`` for ``+``, ``=3D`` for ``=``).

So ``ci/linux-x86`` is ``reapi:ci+linux-x86`` and ``team a`` is
``reapi:team=20a``. A namespace is at most 255 characters, so an encoded
instance name is at most :data:`MAX_ENCODED_INSTANCE` (249): an instance
name that encodes longer is ``INVALID_ARGUMENT``. :func:`instance_of`
inverts the mapping.

Keys: ``cas-{sha256}`` for blobs, ``ac-{sha256}`` for action results; the
size is checked against the stored artifact, not part of the key.
"""

from __future__ import annotations

import re
import uuid

import attrs

from kura.domain.artifacts import ArtifactAddress, Producer

#: The one digest function served (the only one Bazel and Buck2 need).
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: SHA-256 of the empty blob: always present, never stored.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

NAMESPACE_PREFIX = "reapi"
MAX_NAMESPACE = 255
MAX_ENCODED_INSTANCE = MAX_NAMESPACE - len(NAMESPACE_PREFIX) - 1
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ESCAPE = re.compile(r"=([0-9A-F]{2})")
#: Path segments the REAPI reserves; an instance name never contains them.
_KEYWORDS = frozenset(
    {"blobs", "uploads", "actions", "actionResults", "operations", "capabilities"}
    | {"compressed-blobs"}
)


class InvalidName(ValueError):
    """A name or digest the REAPI does not allow (answered ``INVALID_ARGUMENT``)."""


def namespace_of(instance: str) -> str:
    """The namespace of ``instance`` (see the module docstring).

    Raises:
        InvalidName: the encoded name is longer than :data:`MAX_ENCODED_INSTANCE`.
    """
    if instance == "":
        return NAMESPACE_PREFIX
    encoded = []
    for byte in instance.encode("utf-8"):
        if byte in _PLAIN:
            encoded.append(chr(byte))
        elif byte == 0x2F:  # "/"
            encoded.append("+")
        else:
            encoded.append(f"={byte:02X}")
    text = "".join(encoded)
    if len(text) > MAX_ENCODED_INSTANCE:
        raise InvalidName(
            f"instance name too long: {len(text)} characters encoded, at most "
            f"{MAX_ENCODED_INSTANCE}"
        )
    return f"{NAMESPACE_PREFIX}:{text}"


def instance_of(namespace: str) -> str:
    """The instance name whose namespace is ``namespace`` (inverse of :func:`namespace_of`).

    Raises:
        InvalidName: ``namespace`` is not one :func:`namespace_of` makes.
    """
    if namespace == NAMESPACE_PREFIX:
        return ""
    prefix = NAMESPACE_PREFIX + ":"
    if not namespace.startswith(prefix) or len(namespace) == len(prefix):
        raise InvalidName(f"not a REAPI namespace: {namespace!r}")
    body = namespace[len(prefix) :].replace("+", "=2F")
    raw = bytearray()
    position = 0
    for match in _ESCAPE.finditer(body):
        raw += body[position : match.start()].encode("ascii")
        raw.append(int(match.group(1), 16))
        position = match.end()
    raw += body[position:].encode("ascii")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidName(f"not a REAPI namespace: {namespace!r}") from error


@attrs.frozen
class Digest:
    """A validated SHA-256 digest."""

    hash: str
    size: int

    @classmethod
    def of(cls, hash: str, size: int) -> Digest:
        """Validate ``hash`` and ``size``.

        Raises:
            InvalidName: not 64 lower-case hex digits, or a negative size.
        """
        if not SHA256_HEX.fullmatch(hash):
            raise InvalidName(f"invalid digest hash {hash!r}: expected SHA-256, 64 hex digits")
        if size < 0:
            raise InvalidName(f"invalid digest size {size}")
        return cls(hash, size)

    @property
    def empty(self) -> bool:
        return self.size == 0 and self.hash == EMPTY_SHA256

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


def blob_address(namespace: str, digest: Digest) -> ArtifactAddress:
    return ArtifactAddress(Producer.REAPI, namespace, f"cas-{digest.hash}")


def action_address(namespace: str, digest: Digest) -> ArtifactAddress:
    return ArtifactAddress(Producer.REAPI, namespace, f"ac-{digest.hash}")


@attrs.frozen
class BlobResource:
    """A parsed ByteStream resource name.

    Attributes:
        instance: the instance name (may be empty or hold ``/``).
        digest: the blob's (uncompressed) digest.
        compressor: ``None`` for ``blobs/``, ``"zstd"`` for ``compressed-blobs/zstd/``.
        upload: the client's upload id (``uploads/{uuid}/``), writes only.
    """

    instance: str
    digest: Digest
    compressor: str | None = None
    upload: str | None = None


def _split_digest(segments: list[str], at: int) -> tuple[Digest, int]:
    """The digest at ``segments[at:]`` (an optional ``sha256/`` first), and where it ends."""
    if at < len(segments) and segments[at] == "sha256":
        at += 1
    if at + 2 > len(segments):
        raise InvalidName("resource name ends before {hash}/{size}")
    hash, size = segments[at], segments[at + 1]
    if not size.isdigit() or len(size) > 19:
        raise InvalidName(f"invalid size {size!r} in resource name")
    return Digest.of(hash, int(size)), at + 2


def parse_resource(name: str, *, write: bool) -> BlobResource:
    """Parse a ByteStream ``resource_name`` (reads and writes; see the REAPI).

    Reads: ``{instance}/blobs/{hash}/{size}`` or
    ``{instance}/compressed-blobs/zstd/{hash}/{size}``. Writes:
    ``{instance}/uploads/{uuid}/blobs/...`` or ``.../compressed-blobs/zstd/...``,
    with optional trailing metadata. The instance name is everything before
    the first reserved keyword.

    Raises:
        InvalidName: anything else, including compressors other than zstd.
    """
    segments = name.split("/")
    keyword = "uploads" if write else None
    index = next((i for i, segment in enumerate(segments) if segment in _KEYWORDS), None)
    if index is None:
        raise InvalidName(f"resource name {name!r} has no blobs/ or uploads/ segment")
    instance = "/".join(segments[:index])
    rest = segments[index:]
    upload = None
    if write:
        if rest[0] != keyword or len(rest) < 3:
            raise InvalidName(f"write resource name {name!r} must be {{instance}}/uploads/...")
        upload = rest[1]
        try:
            uuid.UUID(upload)
        except ValueError:
            # Clients MUST send a UUID, but all kura needs is a token.
            if not upload or len(upload) > 128:
                raise InvalidName(f"invalid upload id in {name!r}") from None
        rest = rest[2:]
    compressor = None
    if rest[0] == "blobs":
        digest, end = _split_digest(rest, 1)
    elif rest[0] == "compressed-blobs":
        if len(rest) < 2:
            raise InvalidName(f"resource name {name!r} names no compressor")
        compressor = rest[1]
        if compressor != "zstd":
            raise InvalidName(f"unsupported compressor {compressor!r} (kura serves zstd)")
        digest, end = _split_digest(rest, 2)
    else:
        raise InvalidName(f"resource name {name!r} names no blob")
    if end != len(rest) and not write:
        raise InvalidName(f"unexpected trailing segments in {name!r}")
    if instance and instance.startswith("/"):
        raise InvalidName(f"instance name in {name!r} starts with /")
    return BlobResource(instance, digest, compressor, upload)

"""``KURA_OBJECT_STORE_*``: the object-store tier (an S3-compatible store behind the node).

:class:`ObjectStoreConfig` is the parsed, validated form; the tier itself
lives in :mod:`kura.objectstore`. Region and credentials are not kura
variables: the standard AWS ones (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_WEB_IDENTITY_TOKEN_FILE`` and
``AWS_ROLE_ARN``, shared credential files) are read by botocore's own chain
when the node starts (:func:`kura.objectstore.client.connect`).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import attrs

from kura.config.environ import Declarations, Reader

_var = Declarations()
_SECTION = "Object store"

MiB = 1024 * 1024

URL = _var(
    _SECTION,
    "KURA_OBJECT_STORE_URL",
    None,
    "`s3://BUCKET/PREFIX` turns the object-store tier on: writes are uploaded to the "
    "bucket under PREFIX by a durable queue, local misses are read through from it, and "
    "local eviction only drops what the store holds. Credentials and region come from the "
    "standard AWS variables and files (web identity included).",
)
ENDPOINT = _var(
    _SECTION,
    "KURA_OBJECT_STORE_ENDPOINT",
    None,
    "The S3 API endpoint for stores other than AWS S3 (MinIO, Ceph RGW, R2, GCS in "
    "interoperability mode), e.g. `https://minio.internal:9000`. Path-style addressing.",
)
TOMBSTONE_POLL_MS = _var(
    _SECTION,
    "KURA_OBJECT_STORE_TOMBSTONE_POLL_MS",
    10_000,
    "How often the node lists the store's tombstones (cleans and deletes made by any node "
    "sharing the store) and applies the new ones.",
)
READ_DEADLINE_MS = _var(
    _SECTION,
    "KURA_OBJECT_STORE_READ_DEADLINE_MS",
    5_000,
    "How long a local miss waits for the store; past it (or on any store error) the request "
    "is answered as a plain miss (404), never a 5xx.",
)
UPLOAD_QUEUE_MAX = _var(
    _SECTION,
    "KURA_OBJECT_STORE_UPLOAD_QUEUE_MAX",
    100_000,
    "Writes and deletes waiting to be put in the store; at the cap new writes are refused "
    "with 503 (nothing acknowledged is lost) until the queue drains.",
)
MULTIPART_THRESHOLD_BYTES = _var(
    _SECTION,
    "KURA_OBJECT_STORE_MULTIPART_THRESHOLD_BYTES",
    64 * MiB,
    "Bodies larger than this are uploaded as a multipart upload, in parts of 16 MiB.",
)
THREADS = _var(
    _SECTION,
    "KURA_OBJECT_STORE_THREADS",
    4,
    "Threads of the object-store client (its own pool: never the reactor nor the storage "
    "threads); bounds concurrent uploads plus read-through fetches.",
)

OBJECT_STORE_VARIABLES = tuple(_var.variables)

#: S3 bucket names (the rules common to AWS and the compatible stores).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_store_url(text: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` as ``(bucket, prefix)``; the prefix has no slashes at its ends.

    Raises:
        ValueError: the text is not such a URL (a clear reason why).
    """
    parts = urlsplit(text)
    if parts.scheme != "s3":
        raise ValueError(f"must be s3://BUCKET/PREFIX, got {text!r}")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"must be s3://BUCKET/PREFIX without credentials or query, got {text!r}")
    if not _BUCKET.match(parts.netloc):
        raise ValueError(f"names no valid bucket (3-63 of a-z 0-9 . -), got {text!r}")
    return parts.netloc, parts.path.strip("/")


def _endpoint_problem(text: str) -> str | None:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http(s):// URL, got {text!r}"
    return None


@attrs.frozen
class ObjectStoreConfig:
    """The object-store tier's settings (see the variables' meanings).

    Attributes:
        bucket: the bucket; ``None`` when the tier is off.
        prefix: the key prefix inside it ("" for the bucket's root).
    """

    bucket: str | None = None
    prefix: str = ""
    endpoint: str | None = None
    tombstone_poll_ms: int = TOMBSTONE_POLL_MS.default
    read_deadline_ms: int = READ_DEADLINE_MS.default
    upload_queue_max: int = UPLOAD_QUEUE_MAX.default
    multipart_threshold_bytes: int = MULTIPART_THRESHOLD_BYTES.default
    threads: int = THREADS.default

    @property
    def enabled(self) -> bool:
        return self.bucket is not None

    @classmethod
    def read(cls, read: Reader) -> ObjectStoreConfig:
        """Parse the object-store variables with ``read``, which collects problems."""
        url = read.optional_text(URL)
        bucket, prefix = None, ""
        if url is not None:
            try:
                bucket, prefix = parse_store_url(url)
            except ValueError as error:
                read.fail(URL, str(error))
        endpoint = read.optional_text(ENDPOINT)
        if endpoint is not None and (problem := _endpoint_problem(endpoint)) is not None:
            read.fail(ENDPOINT, problem)
        return cls(
            bucket=bucket,
            prefix=prefix,
            endpoint=endpoint,
            tombstone_poll_ms=read.integer(TOMBSTONE_POLL_MS, minimum=1),
            read_deadline_ms=read.integer(READ_DEADLINE_MS, minimum=1),
            upload_queue_max=read.integer(UPLOAD_QUEUE_MAX, minimum=1),
            # S3's smallest part is 5 MiB.
            multipart_threshold_bytes=read.integer(MULTIPART_THRESHOLD_BYTES, minimum=5 * MiB),
            threads=read.integer(THREADS, minimum=1, maximum=64),
        )

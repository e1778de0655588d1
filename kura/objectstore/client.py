"""The S3 API, through botocore: blocking calls, made only on the tier's own threads.

botocore is AWS's maintained client core: SigV4 signing, the standard
credential chain (environment, shared files, container and instance roles,
web identity tokens for IRSA pods), retries and checksum headers. kura uses
the low-level client without boto3's resource layer, and calls it only from
the object-store thread pool (:class:`kura.objectstore.tier.ObjectTier`):
never on the reactor, never on the storage threads, so a slow store can
neither stall serving nor queue disk work behind it.

Every object carries the SHA-256 of its body: as the ``ChecksumSHA256``
header of a single PUT (the store refuses a body that does not match), as
each part's checksum of a multipart upload, and always in the object's
metadata (:mod:`kura.objectstore.naming`), which reads verify against the
bytes they receive (:meth:`S3Store.get_to_file`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kura.config.objectstore import ObjectStoreConfig

#: Bytes moved per read or write while streaming a body.
CHUNK_BYTES = 1024 * 1024
#: The part size of a multipart upload (bodies above the configured threshold).
PART_BYTES = 16 * 1024 * 1024


class ObjectStoreSetupError(Exception):
    """The tier cannot be set up (no credentials): the node must not start."""


class StoreError(Exception):
    """A store request failed (unreachable, refused, throttled, timed out)."""


class ObjectMissing(StoreError):
    """The object does not exist."""


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


@attrs.frozen
class Fetched:
    """An object read into a local file by :meth:`S3Store.get_to_file`.

    Attributes:
        metadata: its user metadata (``x-amz-meta-*``, names lowercased).
        size: bytes written.
        sha256: hex SHA-256 of those bytes, computed as they were written.
    """

    metadata: dict[str, str]
    size: int
    sha256: str


class S3Store:
    """Blocking S3 calls on one bucket (call from the tier's threads only).

    Every method raises :class:`StoreError` (or :class:`ObjectMissing`) for a
    failed request, never botocore's exceptions.
    """

    def __init__(self, client: Any, bucket: str, multipart_threshold: int) -> None:
        self._client = client
        self.bucket = bucket
        self._threshold = multipart_threshold

    def _call(self, operation: Callable[..., Any], **params: Any) -> Any:
        try:
            return operation(Bucket=self.bucket, **params)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissing(params.get("Key", "")) from None
            raise StoreError(f"{code}: {error}") from None
        except BotoCoreError as error:
            raise StoreError(str(error)) from None

    def put_bytes(self, key: str, data: bytes, sha256: str, metadata: Mapping[str, str]) -> None:
        """Store ``data`` (small bodies, tombstones) with its checksum header."""
        self._call(
            self._client.put_object,
            Key=key,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64(sha256),
            Metadata=dict(metadata),
        )

    def put_file(self, key: str, path: str, sha256: str, metadata: Mapping[str, str]) -> None:
        """Store the file at ``path`` (single PUT up to the threshold, else multipart).

        Raises:
            OSError: the file cannot be read (gone: the caller decides).
            StoreError: the store refused or did not answer.
        """
        with open(path, "rb") as body:
            size = os.fstat(body.fileno()).st_size
            if size <= self._threshold:
                self._call(
                    self._client.put_object,
                    Key=key,
                    Body=body,
                    ContentLength=size,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(sha256),
                    Metadata=dict(metadata),
                )
                return
            self._multipart(key, body, metadata)

    def _multipart(self, key: str, body: Any, metadata: Mapping[str, str]) -> None:
        upload = self._call(
            self._client.create_multipart_upload,
            Key=key,
            Metadata=dict(metadata),
            ChecksumAlgorithm="SHA256",
        )
        upload_id = upload["UploadId"]
        parts = []
        try:
            for number, part in enumerate(iter(lambda: body.read(PART_BYTES), b""), start=1):
                checksum = _b64(hashlib.sha256(part).hexdigest())
                answer = self._call(
                    self._client.upload_part,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=part,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
                )
                parts.append(
                    {"ETag": answer["ETag"], "PartNumber": number, "ChecksumSHA256": checksum}
                )
            self._call(
                self._client.complete_multipart_upload,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Parts of an abandoned upload are billed until aborted; if the
            # abort fails too, the bucket's lifecycle rule for incomplete
            # uploads takes them (docs/operations.md).
            with contextlib.suppress(StoreError):
                self._call(self._client.abort_multipart_upload, Key=key, UploadId=upload_id)
            raise

    def head(self, key: str) -> dict[str, str]:
        """The object's user metadata.

        Raises:
            ObjectMissing: there is no such object.
        """
        answer = self._call(self._client.head_object, Key=key)
        return {k.lower(): v for k, v in answer.get("Metadata", {}).items()}

    def get_to_file(self, key: str, path: str) -> Fetched:
        """Write the object's body to a new durable file at ``path``, hashing it.

        The file is fsynced before this returns; on any failure it is removed.

        Raises:
            ObjectMissing: there is no such object.
            StoreError: the read failed part way or never started.
        """
        answer = self._call(self._client.get_object, Key=key)
        hasher = hashlib.sha256()
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            stream = answer["Body"]
            try:
                for chunk in _chunks(stream):
                    hasher.update(chunk)
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            except BotoCoreError as error:  # the connection broke or timed out mid-body
                raise StoreError(f"read of {key} failed: {error}") from None
            finally:
                stream.close()
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        metadata = {k.lower(): v for k, v in answer.get("Metadata", {}).items()}
        return Fetched(metadata, size, hasher.hexdigest())

    def get_bytes(self, key: str) -> tuple[dict[str, str], bytes]:
        """A small object's metadata and body (no verification here)."""
        answer = self._call(self._client.get_object, Key=key)
        try:
            data = answer["Body"].read()
        except BotoCoreError as error:
            raise StoreError(f"read of {key} failed: {error}") from None
        return {k.lower(): v for k, v in answer.get("Metadata", {}).items()}, data

    def delete(self, key: str) -> None:
        self._call(self._client.delete_object, Key=key)

    def list_keys(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Every key under ``prefix`` strictly after ``start_after``, in key order."""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Prefix": prefix}
            if token is not None:
                params["ContinuationToken"] = token
            elif start_after:
                params["StartAfter"] = start_after
            answer = self._call(self._client.list_objects_v2, **params)
            for item in answer.get("Contents", ()):
                yield str(item["Key"])
            if not answer.get("IsTruncated"):
                return
            token = answer["NextContinuationToken"]


def _chunks(stream: Any) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def connect(config: ObjectStoreConfig) -> S3Store:
    """Build the client for ``config`` and resolve credentials once (blocking).

    Region and credentials come from botocore's standard chain (the AWS
    variables and files, web identity, container and instance roles);
    ``AWS_REGION`` unset means ``us-east-1``. The store itself is not
    contacted: an unreachable store must not stop the node.

    Raises:
        ObjectStoreSetupError: no credentials anywhere in the chain.
    """
    assert config.bucket is not None
    session = botocore.session.get_session()
    try:
        credentials = session.get_credentials()
    except BotoCoreError as error:
        raise ObjectStoreSetupError(f"AWS credentials could not be loaded: {error}") from None
    if credentials is None:
        raise ObjectStoreSetupError(
            "KURA_OBJECT_STORE_URL is set but no AWS credentials were found: set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a shared credentials file, or "
            "AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN (IRSA)"
        )
    client = session.create_client(
        "s3",
        region_name=session.get_config_variable("region") or "us-east-1",
        endpoint_url=config.endpoint,
        config=Config(
            # Path style: MinIO, Ceph and most compatible stores need it.
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=config.threads,
            # The checksum is ours (SHA-256, the artifact's digest); no CRC32 on top.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    return S3Store(client, config.bucket, config.multipart_threshold_bytes)

"""A real S3 API on loopback: moto's standalone server, for tests and benchmarks.

The server runs in the calling process (``ThreadedMotoServer``, werkzeug on
a thread); kura nodes are real ``twistd kura`` processes that reach it over
TCP with botocore, exactly as they would reach MinIO or AWS.
"""

from __future__ import annotations

from typing import Any

import botocore.session
from moto.server import ThreadedMotoServer

from tests.support.real import free_port

#: Credentials the nodes and the test client present (moto accepts any).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "kura-test",
    "AWS_SECRET_ACCESS_KEY": "kura-test-secret",
    "AWS_REGION": "us-east-1",
}


class MotoS3:
    """One moto server: its endpoint, and a botocore client for assertions."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        session = botocore.session.get_session()
        self.client: Any = session.create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def start(self) -> MotoS3:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        answer = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for item in answer.get("Contents", ())]


def tier_environ(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    """The variables of a node whose tier uses ``bucket`` at ``endpoint``."""
    return {
        **CREDENTIALS,
        "KURA_OBJECT_STORE_URL": f"s3://{bucket}/cache",
        "KURA_OBJECT_STORE_ENDPOINT": endpoint,
        **extra,
    }

"""A real S3 API for the object-store tests: moto's standalone server on loopback
(:mod:`tests.support.s3`), one per session; each test gets its own bucket.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.s3 import MotoS3


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    name = f"kura-{uuid.uuid4().hex[:12]}"
    moto_s3.client.create_bucket(Bucket=name)
    return name

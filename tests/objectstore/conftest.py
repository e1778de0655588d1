"""A real S3 API for the object-store tests: moto's standalone server on loopback
(:mod:`tests.support.s3`), one per session; each test gets its own bucket.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.real import RealNode
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


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., RealNode]]:
    """Starts nodes (``make(name, **environ)``); every one is killed at the end."""
    started: list[RealNode] = []

    def make(name: str, **environ: str) -> RealNode:
        node = RealNode(str(tmp_path / name), **environ)
        started.append(node)
        return node.start()

    yield make
    for node in started:
        node.kill()

"""The object-store tier against a second S3 implementation: s3rver (Node.js).

moto is the suite's S3 API; s3rver, a separate implementation, checks that
kura does not lean on one server's leniency (signatures, metadata, listing,
multipart). Skipped unless s3rver is installed: ``npm install s3rver@3.7.1``
and put its ``node_modules/.bin`` on ``PATH``, or point ``S3RVER`` at the
executable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.objectstore.test_tier_real import cas, drained, get, put
from tests.support.mesh import request, wait_for
from tests.support.real import RealNode, free_port

pytestmark = pytest.mark.realnode

#: s3rver's fixed credentials.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "S3RVER",
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_REGION": "us-east-1",
}
BUCKET = "kura-s3rver"


def s3rver_executable() -> str | None:
    return os.environ.get("S3RVER") or shutil.which("s3rver")


@pytest.fixture
def s3rver(tmp_path: Path) -> Iterator[str]:
    """A running s3rver on loopback with one bucket; yields its endpoint."""
    executable = s3rver_executable()
    if executable is None:
        pytest.skip("s3rver is not installed (npm install s3rver@3.7.1; S3RVER=<path>)")
    port = free_port()
    process = subprocess.Popen(
        [
            executable,
            "--directory",
            str(tmp_path / "s3rver"),
            "--address",
            "127.0.0.1",
            "--port",
            str(port),
            "--silent",
            "--configure-bucket",
            BUCKET,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for("s3rver to listen", lambda: _answers(endpoint))
        yield endpoint
    finally:
        process.terminate()
        process.wait(10)


def _answers(endpoint: str) -> bool:
    return request("GET", f"{endpoint}/{BUCKET}", timeout=2)[0] == 200


def test_a_fresh_node_reads_through_what_another_wrote_on_s3rver(
    s3rver: str, nodes: Callable[..., RealNode]
) -> None:
    """A small and a multipart artifact go up and come back whole; a clean is honoured."""
    env = {
        **CREDENTIALS,
        "KURA_OBJECT_STORE_URL": f"s3://{BUCKET}/cache",
        "KURA_OBJECT_STORE_ENDPOINT": s3rver,
        "KURA_OBJECT_STORE_MULTIPART_THRESHOLD_BYTES": "5MiB",
        "KURA_OBJECT_STORE_TOMBSTONE_POLL_MS": "100",
        "KURA_ALLOW_ANONYMOUS_DELETE": "true",
    }
    writer = nodes("writer", **env)
    small, large = b"s" * 100, os.urandom(1024) * (18 * 1024)  # 18 MiB: two parts
    assert put(writer, "small", small) == 204
    assert put(writer, "large", large) == 204
    wait_for("the uploads", lambda: drained(writer), timeout=60)

    reader = nodes("reader", **env)
    assert get(reader, "small") == (200, small)
    assert get(reader, "large") == (200, large)
    clean = "/api/cache/clean?tenant_id=default&namespace_id=app"
    assert request("DELETE", writer.url + clean)[0] == 204
    wait_for("the clean to reach the reader", lambda: get(reader, "small")[0] == 404)
    assert request("GET", reader.url + cas("large"))[0] == 404
